"""Intervention policy: the seed's table, damping, mix picks, presets, validation."""

import os
import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from adaptive_optax.policy import InterventionPolicy, InterventionState
from adaptive_optax.segmentation.policies import (
    BALANCED_MIX,
    INITIAL_MIX,
    MIX_TABLE,
    adaptive_mix_policy,
    scripted_policy,
)


def state(policy, count=0, mix_index=None, seed=0, conservatism=1.0, force_final=False,
          max_interventions=3):
    current = policy.initial_index if mix_index is None else mix_index
    plan = policy.plan_mixes(jax.random.PRNGKey(seed), max_interventions)
    return InterventionState(
        intervention_count=jnp.int32(count),
        lr_multiplier=jnp.float32(1.0),
        boost_from=jnp.float32(1.0),
        boost_to=jnp.float32(1.0),
        boost_step=jnp.int32(-1),
        mix_index=jnp.int32(current),
        planned_mix_index=plan,
        rng_key=jax.random.PRNGKey(seed),
        conservatism=jnp.float32(conservatism),
        force_final_mix=jnp.bool_(force_final),
    )


@pytest.mark.parametrize(
    "norm, boost",
    [(0.0, 15.0), (0.005, 15.0), (0.01, 10.0), (0.04, 10.0), (0.099, 10.0),
     (0.1, 5.0), (0.3, 5.0), (0.5, 3.0), (0.51, 3.0), (100.0, 3.0)],
)
def test_seed_boost_table(norm, boost):
    p = adaptive_mix_policy()
    d = p.decide(state(p), jnp.float32(norm), max_interventions=3)
    chex.assert_trees_all_close(d.boost, boost)


def test_progressive_damping_for_norm_004_gives_10_7_5():
    p = adaptive_mix_policy()
    boosts = [float(p.decide(state(p, count=k), jnp.float32(0.04), 3).boost) for k in range(3)]
    np.testing.assert_allclose(boosts, [10.0, 7.0, 5.0], rtol=1e-6)


def test_damping_repeats_last_entry_beyond_its_length():
    p = adaptive_mix_policy()
    chex.assert_trees_all_close(p.decide(state(p, count=4), jnp.float32(0.04), 6).boost, 5.0)


def test_fallback_without_grad_norm_uses_fixed_boosts_damped():
    p = adaptive_mix_policy(use_grad_norm=False)
    boosts = [float(p.decide(state(p, count=k), jnp.float32(0.001), 3).boost) for k in range(3)]
    np.testing.assert_allclose(boosts, [5.0, 3.5, 2.5], rtol=1e-6)


def test_last_intervention_uses_the_balanced_mix_others_random():
    p = adaptive_mix_policy()
    final = p.decide(state(p, count=2), jnp.float32(0.04), 3)
    assert int(final.mix_index) == p.final_index
    w = p.weights(final.mix_index)
    chex.assert_trees_all_close(w, {k: np.float32(v) for k, v in BALANCED_MIX.items()})
    first = p.decide(state(p, count=0), jnp.float32(0.04), 3)
    assert 0 <= int(first.mix_index) < len(MIX_TABLE)


def plans(policy, seeds, max_interventions=3):
    return [policy.plan_mixes(jax.random.PRNGKey(s), max_interventions).tolist() for s in seeds]


def test_random_picks_are_uniform_and_reproducible():
    p = adaptive_mix_policy()
    firsts = [plan[0] for plan in plans(p, range(400))]
    counts = np.bincount(firsts, minlength=len(MIX_TABLE))
    assert counts.min() > 50  # 80 expected per mix
    assert plans(p, range(20)) == plans(p, range(20))


def test_avoid_repeat_never_repicks_current_mix():
    p = adaptive_mix_policy(mix_plan=("random",))
    for plan in plans(p, range(60), max_interventions=6):
        assert all(a != b for a, b in zip(plan, plan[1:]))
    # Every other mix is reachable from every mix.
    pairs = {(a, b) for plan in plans(p, range(200), 6) for a, b in zip(plan, plan[1:])}
    assert len(pairs) == len(MIX_TABLE) * (len(MIX_TABLE) - 1)


def test_repeat_allowed_when_configured():
    p = adaptive_mix_policy(mix_plan=("random",), avoid_repeat=False)
    assert any(a == b for plan in plans(p, range(60), 6) for a, b in zip(plan, plan[1:]))


def test_mix_plan_keep_and_index():
    p = adaptive_mix_policy(mix_plan=("keep", 3, "final"))
    assert plans(p, [0])[0] == [p.initial_index, 3, p.final_index]


def test_decide_reads_the_planned_mix():
    p = adaptive_mix_policy()
    s = state(p, count=1)
    d = p.decide(s, jnp.float32(0.04), 3)
    assert int(d.mix_index) == int(s.planned_mix_index[1])


def test_force_final_and_conservatism_after_rollback():
    p = adaptive_mix_policy()
    d = p.decide(state(p, conservatism=0.5, force_final=True), jnp.float32(0.04), 3)
    chex.assert_trees_all_close(d.boost, 1.0 + (10.0 - 1.0) * 0.5)
    assert int(d.mix_index) == p.final_index


def test_legacy_preset_is_the_seeds_old_strategy():
    p = scripted_policy()
    ds = [p.decide(state(p, count=k), jnp.float32(0.04), 3) for k in range(3)]
    np.testing.assert_allclose([float(d.boost) for d in ds], [10.0, 5.0, 3.0])
    assert [bool(d.reset) for d in ds] == [False, False, True]
    weights = [{k: float(v) for k, v in p.weights(d.mix_index).items()} for d in ds]
    assert weights[0] == {"bce": 0.0, "dice": 0.5, "focal": 0.5, "variance": 0.0}
    assert weights[1] == {"bce": 0.0, "dice": 0.0, "focal": 1.0, "variance": 0.0}
    assert weights[2] == {"bce": 0.0, "dice": 1.0, "focal": 0.0, "variance": 0.0}


def test_decide_traces_under_jit():
    p = adaptive_mix_policy()
    d = jax.jit(lambda s, n: p.decide(s, n, 3))(state(p), jnp.float32(0.2))
    chex.assert_trees_all_close(d.boost, 5.0)


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(grad_norm_thresholds=(0.1, 0.01, 0.5)), "grad_norm_thresholds"),
        (dict(grad_norm_thresholds=(0.0, 0.1, 0.5)), "grad_norm_thresholds"),
        (dict(grad_norm_boosts=(15.0, 10.0, 5.0)), "grad_norm_boosts"),
        (dict(grad_norm_boosts=(15.0, -1.0, 5.0, 3.0)), "grad_norm_boosts"),
        (dict(damping=(1.0, 0.0)), "damping"),
        (dict(damping=()), "damping"),
        (dict(fixed_boosts=(float("nan"),)), "fixed_boosts"),
        (dict(mixes=(), mix_plan=("random",)), "mixes is empty"),
        (dict(mixes="dice"), "mixes"),
        (dict(mixes=({"dice": -0.1, "focal": 1.0, "variance": 0.0, "bce": 0.0},)), "mixes"),
        (dict(mixes=({"dice": 0.0, "focal": 0.0, "variance": 0.0, "bce": 0.0},)), "mixes"),
        (dict(mixes=({"dice": 1.0, "focal": 0.0},)), "missing"),
        (dict(final_mix={"dice": 1.0, "focal": 0.0, "variance": 0.0, "bce": 0.0, "x": 1.0}), "extra"),
        (dict(mix_plan=("random", "sometimes")), "mix_plan"),
        (dict(mix_plan=(7,)), "mix_plan"),
        (dict(reset_optimizer=("yes",)), "reset_optimizer"),
    ],
)
def test_invalid_policy_raises_naming_argument(kwargs, name):
    with pytest.raises(ValueError, match=name):
        adaptive_mix_policy(**kwargs)  # the core's checks, on a policy with the seed's mixes


def test_module_mixes_are_read_only():
    # An edit would otherwise change the defaults of every later policy.
    with pytest.raises(TypeError):
        BALANCED_MIX["dice"] = 0.99
    with pytest.raises(TypeError):
        MIX_TABLE[0]["dice"] = 0.99
    with pytest.raises(TypeError):
        INITIAL_MIX["dice"] = 0.99


@pytest.mark.parametrize("kwargs, match", [
    (dict(damping=(1e-50,)), r"damping\[0\] must be a finite number in \(0, .* after rounding "
                             r"to float32, got damping\[0\] = 1e-50, which is 0.0"),
    (dict(grad_norm_boosts=(3e38, 10.0, 5.0, 3.0), damping=(2.0,)), r"a damped boost"),
    (dict(initial_mix={"dice": 1e39, "focal": 0.3, "variance": 0.1, "bce": 0.2}),
     r"initial_mix\['dice'\] must be a finite weight in \[0, 3.40282e\+38\]"),
])
def test_values_that_would_overflow_or_vanish_in_float32_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        adaptive_mix_policy(**kwargs)


def test_mix_plan_takes_numpy_integers():
    policy = adaptive_mix_policy(mix_plan=(np.int64(1), "final"))
    key = jax.random.key_data(jax.random.PRNGKey(0))
    assert policy.plan_mixes(key, 2).tolist() == [1, policy.final_index]


def test_a_policy_keeps_its_own_copy_of_the_mixes():
    initial = {"dice": 0.4, "focal": 0.3, "variance": 0.1, "bce": 0.2}
    table = [dict(m) for m in MIX_TABLE]
    policy = InterventionPolicy(initial_mix=initial, mixes=table, final_mix=BALANCED_MIX)
    initial["dice"], table[0]["extra"] = float("nan"), 1.0  # edits after validation
    assert policy.initial_mix["dice"] == 0.4
    assert np.isfinite(policy.all_mixes).all() and policy.all_mixes.shape == (7, 4)


def test_a_policy_keeps_its_own_copy_of_its_sequences():
    damping, resets = [1.0, 0.7], [False]
    policy = InterventionPolicy(damping=damping, reset_optimizer=resets)
    damping[1], resets[0] = -3.0, "yes"  # edits after validation
    assert policy.damping == (1.0, 0.7) and policy.reset_optimizer == (False,)
    d = policy.decide(state(policy, count=1), jnp.float32(0.04), 3)
    chex.assert_trees_all_close(d.boost, 10.0 * 0.7)


def test_thresholds_equal_in_float32_are_refused():
    # 0.1 and 0.1 + 1e-12 differ as floats but are one edge in float32: a bin
    # that no norm could reach.
    with pytest.raises(ValueError, match="grad_norm_thresholds must be strictly increasing"):
        InterventionPolicy(grad_norm_thresholds=(0.01, 0.1, 0.1 + 1e-12),
                           grad_norm_boosts=(15.0, 10.0, 5.0, 3.0))


def test_keep_keeps_the_mix_in_use_not_the_planned_one():
    # After a rollback the mix in use is no longer the plan's (here: final
    # instead of mixes[0]); "keep" must keep what is in use.
    p = adaptive_mix_policy(mix_plan=(0, "keep", "keep"))
    s = state(p, count=2, mix_index=p.final_index)
    assert int(s.planned_mix_index[2]) == 0
    assert int(p.decide(s, jnp.float32(0.04), 3).mix_index) == p.final_index
    # Without a rollback the two agree.
    assert int(p.decide(state(p, count=2, mix_index=0), jnp.float32(0.04), 3).mix_index) == 0


def test_the_mix_plan_does_not_depend_on_x64():
    code = ("import jax\n"
            "from adaptive_optax.segmentation.policies import adaptive_mix_policy\n"
            "key = jax.random.key_data(jax.random.PRNGKey(0))\n"
            "print(adaptive_mix_policy(mix_plan=('random',) * 6).plan_mixes(key, 6).tolist())\n")
    outs = []
    for x64 in ("0", "1"):
        env = {**os.environ, "JAX_ENABLE_X64": x64, "JAX_PLATFORMS": "cpu"}
        run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             env=env, timeout=120)
        assert run.returncode == 0, run.stderr
        outs.append(run.stdout.strip())
    assert outs[0] == outs[1], outs


@pytest.mark.parametrize("tiny", [1e-8, 1e-30, float(np.finfo(np.float32).tiny)])
def test_a_tiny_boost_survives_conservatism(tiny):
    # 1 + (boost - 1) * c cancels to exactly 0 in float32 for a boost below ~6e-8.
    p = adaptive_mix_policy(grad_norm_boosts=(tiny, 10.0, 5.0, 3.0), damping=(1.0,))
    decide = jax.jit(lambda c: p.decide(state(p, conservatism=c), jnp.float32(0.0), 3).boost)
    assert decide(jnp.float32(1.0)) == np.float32(tiny)
    assert decide(jnp.float32(0.0)) == np.float32(1.0)
    half = float(decide(jnp.float32(0.5)))
    assert tiny < half < 1.0
    np.testing.assert_allclose(half, 0.5, rtol=1e-6)


@pytest.mark.parametrize("boost", [1e-8, 0.3, 1.0 - 2**-24, 1.0, 1.0 + 2**-23, 3.0, 1e30])
def test_conservatism_moves_a_boost_to_1_monotonically_and_exactly_at_both_ends(boost):
    p = adaptive_mix_policy(grad_norm_boosts=(boost, 10.0, 5.0, 3.0), damping=(1.0,))
    cs = np.concatenate([np.linspace(0.0, 1.0, 101, dtype=np.float32),
                         np.nextafter(np.float32(1.0), np.float32(0.0), dtype=np.float32)[None],
                         np.float32(2.0**-24)[None]])
    cs = np.sort(cs)
    boosts = np.asarray(jax.vmap(
        lambda c: p.decide(state(p, conservatism=c), jnp.float32(0.0), 3).boost)(cs))
    b = np.float32(boost)
    assert boosts[0] == np.float32(1.0) and boosts[-1] == b
    steps = np.diff(boosts)
    assert (steps >= 0).all() if b >= 1 else (steps <= 0).all()
    assert ((boosts >= min(b, 1.0)) & (boosts <= max(b, 1.0))).all()


def test_a_damped_boost_that_would_be_flushed_to_0_is_refused():
    # Accepted by the float32 rounding check, but a subnormal that XLA flushes to 0.
    with pytest.raises(ValueError, match=r"a damped boost .* must be at least 1.17549e-38"):
        InterventionPolicy(grad_norm_boosts=(1e-40, 10.0, 5.0, 3.0))
    with pytest.raises(ValueError, match=r"a damped boost"):
        InterventionPolicy(grad_norm_boosts=(1e-30, 10.0, 5.0, 3.0), damping=(1.0, 1e-10))


# -- the core policy knows no loss names ----------------------------------------------------


def test_the_default_policy_has_no_mixes_and_empty_loss_weights():
    p = InterventionPolicy()
    assert p.loss_names == () and p.mixes == () and p.all_mixes.shape == (2, 0)
    assert p.weights(jnp.int32(p.initial_index)) == {}
    key = jax.random.key_data(jax.random.PRNGKey(0))
    # No table to pick from: the mix is kept, and the last intervention's "final" is {} too.
    assert p.plan_mixes(key, 3).tolist() == [p.initial_index, p.initial_index, p.final_index]
    d = p.decide(state(p), jnp.float32(0.04), 3)
    assert float(d.boost) == 10.0  # the seed's boost rules are the core's


def test_a_table_needs_an_initial_mix_and_random_picks_need_a_table():
    mix = {"a": 1.0}
    with pytest.raises(ValueError, match="initial_mix must be given with mixes"):
        InterventionPolicy(mixes=(mix,))
    with pytest.raises(ValueError, match=r"mix_plan\[1\] = 'random' needs a table"):
        InterventionPolicy(mix_plan=("keep", "random"))
    with pytest.raises(ValueError, match="final_mix must have the keys of initial_mix"):
        InterventionPolicy(mixes=(mix,), initial_mix=mix)


def test_a_constant_mix_without_a_table_is_valid():
    p = InterventionPolicy(initial_mix={"a": 0.5, "b": 0.5}, final_mix={"a": 1.0, "b": 0.0})
    key = jax.random.key_data(jax.random.PRNGKey(0))
    assert p.plan_mixes(key, 2).tolist() == [p.initial_index, p.final_index]
    assert {k: float(v) for k, v in p.weights(jnp.int32(p.final_index)).items()} == {
        "a": 1.0, "b": 0.0}
