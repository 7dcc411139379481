"""plateau_escape end to end: the seed's rules by number, the state contract, jit hygiene."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st

import adaptive_optax as ao
from adaptive_optax.segmentation.policies import BALANCED_MIX, INITIAL_MIX, MIX_TABLE, adaptive_mix_policy
from helpers import compiled_update_entry

BASE = 1e-3
SEED = ao.presets.unguarded_options()  # the seed's boosts, at once and unguarded, for the rule-by-number tests


def grads_with_norm(norm, size=4):
    return {"w": jnp.full((size,), norm / np.sqrt(size), jnp.float32)}


def drive(tx, values, norm=0.04, params=None, jit=True):
    """Runs update over `values` with constant gradients; returns per-step readings."""
    params = params if params is not None else {"w": jnp.ones(4)}
    state = tx.init(params)
    update = jax.jit(tx.update) if jit else tx.update
    grads = grads_with_norm(norm)
    rows = []
    for v in values:
        _, state = update(grads, state, params, value=jnp.float32(v))
        rows.append(dict(
            lr=float(optax.tree.get(state, "learning_rate")),
            count=int(optax.tree.get(state, "intervention_count")),
            weights={k: float(w) for k, w in optax.tree.get(state, "loss_weights").items()},
        ))
    return state, rows


def lrs_at_interventions(rows):
    out, last = [], 0
    for r in rows:
        if r["count"] != last:
            out.append(r["lr"])
            last = r["count"]
    return out


def test_norm_004_flat_loss_gives_base_x10_x7_x5_then_none():
    tx = ao.plateau_escape(optax.adam, BASE, patience=1, accumulation_steps=3, **SEED)
    state, rows = drive(tx, [1.0] * 60)
    np.testing.assert_allclose(lrs_at_interventions(rows), [BASE * 10, BASE * 7, BASE * 5], rtol=1e-6)
    assert rows[-1]["count"] == 3
    np.testing.assert_allclose(rows[-1]["lr"], BASE * 5, rtol=1e-6)
    # patience=1: window 0 sets best, windows 1 and 2 do not improve -> plateau at step 8.
    assert [r["count"] for r in rows].index(1) == 8


def test_last_intervention_switches_to_balanced_mix():
    tx = ao.plateau_escape(optax.adam, BASE, patience=0, policy=adaptive_mix_policy())
    _, rows = drive(tx, [1.0] * 6)
    assert rows[0]["weights"] == pytest.approx(INITIAL_MIX)
    assert rows[1]["weights"] in [pytest.approx(m) for m in MIX_TABLE]
    assert rows[3]["weights"] == pytest.approx(BALANCED_MIX)


def test_boosts_are_relative_to_the_schedule_not_compounded():
    schedule = optax.linear_schedule(1e-2, 1e-3, transition_steps=20)
    tx = ao.plateau_escape(optax.sgd, schedule, patience=0, max_interventions=2, **SEED)
    _, rows = drive(tx, [1.0] * 10)
    # step 1: first intervention (x10); step 2: second (x10 * 0.7 = 7), relative to base(step).
    np.testing.assert_allclose(rows[1]["lr"], float(schedule(1)) * 10, rtol=1e-5)
    np.testing.assert_allclose(rows[2]["lr"], float(schedule(2)) * 7, rtol=1e-5)
    np.testing.assert_allclose(rows[9]["lr"], float(schedule(9)) * 7, rtol=1e-5)


def test_boost_uses_grad_norm_bins():
    for norm, boost in [(0.001, 15.0), (0.2, 5.0), (2.0, 3.0)]:
        tx = ao.plateau_escape(optax.adam, BASE, patience=0, max_interventions=1, **SEED)
        _, rows = drive(tx, [1.0, 1.0], norm=norm)
        np.testing.assert_allclose(rows[1]["lr"], BASE * boost, rtol=1e-5)


def test_mode_max_intervenes_when_score_stalls():
    tx = ao.plateau_escape(optax.adam, BASE, patience=1, mode="max", max_interventions=1)
    _, rows = drive(tx, [0.5, 0.6, 0.7, 0.8, 0.8, 0.8])
    assert [r["count"] for r in rows] == [0, 0, 0, 0, 0, 1]


def test_cooldown_delays_next_intervention():
    tx = ao.plateau_escape(optax.adam, BASE, patience=0, cooldown=3)
    _, rows = drive(tx, [1.0] * 12)
    assert [r["count"] for r in rows][:10] == [0, 1, 1, 1, 1, 2, 2, 2, 2, 3]


def test_diverging_run_is_never_answered_with_a_boost():
    tx = ao.plateau_escape(optax.adam, BASE, patience=0)
    state, rows = drive(tx, [1.0] + [np.nan] * 30 + [np.inf] * 10)
    assert rows[-1]["count"] == 0
    assert rows[-1]["lr"] == pytest.approx(BASE)
    assert int(ao.state_field(state, "nonfinite_count")) == 40
    chex.assert_trees_all_close(optax.tree.get(state, "best_value"), 1.0)


def test_nonfinite_gradients_skip_the_update_and_keep_inner_state_clean():
    tx = ao.plateau_escape(optax.adam, BASE, patience=5)
    params = {"w": jnp.ones(4)}
    state = tx.init(params)
    update = jax.jit(tx.update)
    _, state = update(grads_with_norm(0.1), state, params, value=jnp.float32(1.0))
    mu_before = optax.tree.get(state, "mu")
    bad = {"w": jnp.array([1.0, np.nan, 0.0, np.inf])}
    updates, state = update(bad, state, params, value=jnp.float32(np.nan))
    chex.assert_trees_all_equal(updates, {"w": jnp.zeros(4)})
    chex.assert_trees_all_equal(optax.tree.get(state, "mu"), mu_before)
    assert int(ao.state_field(state, "nonfinite_grad_count")) == 1
    chex.assert_tree_all_finite(state)
    updates, state = update(grads_with_norm(0.1), state, params, value=jnp.float32(1.0))
    chex.assert_tree_all_finite((updates, state))


def test_optimizer_reset_reinitialises_inner_state_in_graph():
    policy = adaptive_mix_policy(reset_optimizer=(False, True))
    tx = ao.plateau_escape(optax.adam, BASE, patience=0, policy=policy, max_interventions=2)
    params = {"w": jnp.ones(4)}
    state = tx.init(params)
    update = jax.jit(tx.update)
    g = grads_with_norm(0.04)
    mus, counts = [], []
    for _ in range(3):
        _, state = update(g, state, params, value=jnp.float32(1.0))
        mus.append(float(optax.tree.get(state, "mu")["w"][0]))
        counts.append(int(optax.tree.get(state, "intervention_count")))
    # Step 1: first intervention, no reset: mu keeps accumulating.
    # Step 2: second intervention resets, so mu is one fresh step of the gradient.
    g0 = float(g["w"][0])
    np.testing.assert_allclose(mus[0], 0.1 * g0, rtol=1e-5)
    np.testing.assert_allclose(mus[1], 0.1 * g0 + 0.9 * 0.1 * g0, rtol=1e-5)
    np.testing.assert_allclose(mus[2], 0.1 * g0, rtol=1e-5)
    assert counts == [0, 1, 2]


def test_max_learning_rate_caps_the_boost():
    tx = ao.plateau_escape(optax.adam, BASE, patience=0, max_learning_rate=4e-3)
    _, rows = drive(tx, [1.0] * 5)
    assert max(r["lr"] for r in rows) == pytest.approx(4e-3)


def test_boost_decay_returns_to_base():
    tx = ao.plateau_escape(optax.adam, BASE, patience=0, max_interventions=1, boost_decay_steps=4,
                           **SEED)
    _, rows = drive(tx, [1.0] * 8)
    np.testing.assert_allclose([r["lr"] for r in rows],
                               [BASE, BASE * 10, BASE * 7.75, BASE * 5.5, BASE * 3.25, BASE, BASE, BASE],
                               rtol=1e-5)


def test_boost_warmup_ramps_in():
    tx = ao.plateau_escape(optax.adam, BASE, patience=0, max_interventions=1, boost_warmup_steps=3)
    _, rows = drive(tx, [1.0] * 6)
    np.testing.assert_allclose([r["lr"] for r in rows],
                               [BASE, BASE * 3.25, BASE * 5.5, BASE * 7.75, BASE * 10, BASE * 10],
                               rtol=1e-5)


def test_max_interventions_zero_only_monitors():
    tx = ao.plateau_escape(optax.adam, BASE, patience=0, max_interventions=0)
    state, rows = drive(tx, [1.0] * 10)
    assert rows[-1]["count"] == 0 and rows[-1]["lr"] == pytest.approx(BASE)


def test_same_seed_same_mixes_different_seed_differs():
    def mixes(seed):
        tx = ao.plateau_escape(optax.adam, BASE, patience=0, max_interventions=3, seed=seed,
                               policy=adaptive_mix_policy(mix_plan=("random",)))
        return [tuple(sorted(r["weights"].items())) for r in drive(tx, [1.0] * 4)[1]]
    assert mixes(1) == mixes(1)
    assert any(mixes(s) != mixes(1) for s in range(2, 8))


def test_jitted_init_holds_the_plan_as_a_constant_whatever_the_cap():
    # Staged, the per-intervention draws made jit(init) take ~20 s to compile at 100.
    params = {"w": jnp.ones(2)}
    sizes = {}
    for cap in (3, 300):
        tx = ao.plateau_escape(optax.adam, BASE, max_interventions=cap, seed=5)
        sizes[cap] = len(jax.make_jaxpr(tx.init)(params).eqns)
        jitted = ao.state_field(jax.jit(tx.init)(params), "planned_mix_index")
        np.testing.assert_array_equal(jitted, ao.state_field(tx.init(params), "planned_mix_index"))
    assert sizes[3] == sizes[300]


def test_seeds_past_32_bits_give_their_own_keys():
    # Without x64, jax.random.PRNGKey keeps only the low 32 bits of a seed.
    def key(seed):
        state = ao.plateau_escape(optax.sgd, BASE, seed=seed).init({"w": jnp.ones(2)})
        return tuple(np.asarray(ao.state_field(state, "rng_key")).tolist())
    keys = [key(s) for s in (0, 1, 2**32, 2**32 + 1, 2**40, 2**63 - 1)]
    assert len(set(keys)) == len(keys)
    assert key(7) == tuple(np.asarray(jax.random.key_data(jax.random.PRNGKey(7))).tolist())


def test_seed_seeds_the_mix_plan_and_optimizer_kwargs_seed_the_optimizer():
    # optax.noisy_sgd takes a seed too: each goes where it is passed.
    params = {"w": jnp.ones(3)}
    grads = {"w": jnp.full(3, 0.1)}

    def first(tx):
        state = tx.init(params)
        updates, _ = tx.update(grads, state, params, value=1.0)
        return updates["w"], np.asarray(ao.state_field(state, "rng_key")).tolist()

    updates, key = first(ao.plateau_escape(optax.noisy_sgd, 0.1, seed=7,
                                           optimizer_kwargs={"seed": 1}))
    assert key == np.asarray(jax.random.key_data(jax.random.PRNGKey(7))).tolist()
    alone = optax.noisy_sgd(0.1, seed=1)
    expected, _ = alone.update(grads, alone.init(params), params)
    np.testing.assert_allclose(updates, expected["w"], rtol=1e-6)
    other_noise, same_key = first(ao.plateau_escape(optax.noisy_sgd, 0.1, seed=7,
                                                    optimizer_kwargs={"seed": 2}))
    assert same_key == key and not np.allclose(other_noise, updates)
    same_noise, other_key = first(ao.plateau_escape(optax.noisy_sgd, 0.1, seed=1,
                                                    optimizer_kwargs={"seed": 1}))
    assert other_key != key
    np.testing.assert_array_equal(same_noise, updates)


@pytest.mark.parametrize("name", ["learning_rate", "intervention_count", "grad_norm_ema",
                                  "best_value", "plateau_count", "loss_weights"])
def test_fields_readable_and_unique_inside_chain(name):
    tx = optax.chain(optax.clip_by_global_norm(1.0),
                     ao.plateau_escape(optax.adamw, BASE,
                                       optimizer_kwargs={"weight_decay": 1e-4}))
    params = {"w": jnp.ones(4)}
    state = tx.init(params)
    _, state = tx.update(grads_with_norm(0.1), state, params, value=jnp.float32(1.0))
    assert len(optax.tree.get_all_with_path(state, name)) == 1
    assert optax.tree.get(state, name) is not None


def test_fields_readable_inside_flax_nnx_optimizer():
    model = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
    tx = ao.plateau_escape(optax.adam, BASE, patience=0, policy=adaptive_mix_policy(), **SEED)
    opt = nnx.Optimizer(model, tx, wrt=nnx.Param)

    @nnx.jit
    def train_step(model, opt, x):
        loss, grads = nnx.value_and_grad(lambda m: jnp.mean(m(x) ** 2))(model)
        opt.update(model, grads, value=jnp.float32(1.0))
        return loss

    x = jnp.ones((4, 3))
    for _ in range(3):
        train_step(model, opt, x)
    count = optax.tree.get(nnx.pure(opt.opt_state), "intervention_count")
    assert int(count) == 2
    state = nnx.pure(opt.opt_state)
    norm = float(optax.tree.get(state, "grad_norm_ema"))
    boost = 15.0 if norm < 0.01 else 10.0 if norm < 0.1 else 5.0 if norm < 0.5 else 3.0
    lr = optax.tree.get(state, "learning_rate")
    assert float(lr) == pytest.approx(BASE * boost * 0.7, rel=1e-5)
    weights = optax.tree.get(state, "loss_weights")
    assert set(weights) == {"dice", "focal", "variance", "bce"}


def test_whole_run_with_interventions_compiles_once():
    tx = ao.plateau_escape(optax.adam, BASE, patience=0, cooldown=1,
                           policy=adaptive_mix_policy(reset_optimizer=(False, False, True)),
                           rollback=ao.RollbackGuard())
    params = {"w": jnp.ones(4)}

    @jax.jit
    @chex.assert_max_traces(n=1)
    def step(params, state, grads, value):
        updates, state = tx.update(grads, state, params, value=value)
        return optax.apply_updates(params, updates), state

    state = tx.init(params)
    grads = grads_with_norm(0.04)
    for v in np.linspace(1.0, 1.0, 40):
        params, state = step(params, state, grads, jnp.float32(v))
    assert int(optax.tree.get(state, "intervention_count")) == 3


def test_update_never_transfers_to_host():
    tx = ao.plateau_escape(optax.adam, BASE, patience=0, rollback=ao.RollbackGuard(),
                           policy=adaptive_mix_policy(reset_optimizer=(True,)))
    params = {"w": jnp.ones(4)}
    state = tx.init(params)
    update = jax.jit(tx.update)
    grads, value = grads_with_norm(0.04), jnp.float32(1.0)
    _, state = update(grads, state, params, value=value)  # compile outside the guard
    with jax.transfer_guard("disallow"):
        for _ in range(6):
            _, state = update(grads, state, params, value=value)
    assert int(optax.tree.get(state, "intervention_count")) == 3


def test_state_structure_shape_and_dtype_do_not_drift():
    tx = ao.plateau_escape(optax.adam, BASE, patience=0, rollback=ao.RollbackGuard())
    params = {"w": jnp.ones(4), "b": jnp.zeros(2, jnp.bfloat16)}
    state = tx.init(params)
    grads = {"w": jnp.full(4, 0.01), "b": jnp.full(2, 0.01, jnp.bfloat16)}
    _, new_state = jax.jit(tx.update)(grads, state, params, value=jnp.float32(1.0))
    chex.assert_trees_all_equal_structs(state, new_state)
    chex.assert_trees_all_equal_shapes_and_dtypes(state, new_state)
    # As optax's own tests do: both states must be interchangeable in lax.cond.
    jax.lax.cond(True, lambda: state, lambda: new_state)


def test_state_is_a_pytree_of_arrays_only():
    tx = ao.plateau_escape(optax.adam, BASE, rollback=ao.RollbackGuard())
    state = tx.init({"w": jnp.ones(4)})
    assert isinstance(state, ao.PlateauEscapeState)
    assert all(isinstance(leaf, jax.Array) for leaf in jax.tree.leaves(state))


def test_bfloat16_params_keep_their_dtype():
    tx = ao.plateau_escape(optax.adam, BASE, patience=0)
    params = {"w": jnp.ones(4, jnp.bfloat16)}
    state = tx.init(params)
    updates, _ = tx.update({"w": jnp.full(4, 0.1, jnp.bfloat16)}, state, params, value=1.0)
    assert updates["w"].dtype == jnp.bfloat16


def test_extra_args_are_accepted_and_value_forwarded():
    def value_scaled_sgd(learning_rate):
        """An inner optimizer whose step reads value= and another extra argument."""
        def update(updates, state, params=None, *, value=None, unrelated=1.0, **extra):
            del params, extra
            return jax.tree.map(lambda g: -learning_rate * value * unrelated * g, updates), state
        return optax.GradientTransformationExtraArgs(lambda params: optax.EmptyState(), update)

    tx = ao.plateau_escape(value_scaled_sgd, BASE)
    params = {"w": jnp.ones(4)}
    grads = grads_with_norm(0.1)
    updates, _ = tx.update(grads, tx.init(params), params, value=2.0, unrelated=3.0)
    chex.assert_trees_all_close(updates, jax.tree.map(lambda g: -BASE * 6.0 * g, grads),
                                rtol=1e-6)
    # Adam takes (and ignores) the extra arguments as well.
    adam = ao.plateau_escape(optax.adam, BASE)
    updates, _ = adam.update(grads, adam.init(params), params, value=1.0, unrelated=3)
    chex.assert_tree_all_finite(updates)




def test_jit_and_no_jit_give_same_history():
    tx = ao.plateau_escape(optax.adam, BASE, patience=0, seed=3)
    _, rows = drive(tx, [1.0, 0.9, 0.9, 0.9, 0.8], jit=False)
    _, reference = drive(tx, [1.0, 0.9, 0.9, 0.9, 0.8], jit=True)
    assert max(r["count"] for r in reference) >= 2  # the histories hold interventions
    assert [r["count"] for r in rows] == [r["count"] for r in reference]
    assert [r["weights"] for r in rows] == [r["weights"] for r in reference]
    np.testing.assert_allclose([r["lr"] for r in rows], [r["lr"] for r in reference], rtol=1e-6)


def test_missing_value_is_a_clear_error():
    tx = ao.plateau_escape(optax.adam, BASE)
    params = {"w": jnp.ones(4)}
    with pytest.raises(ValueError, match="value=loss"):
        tx.update(grads_with_norm(0.1), tx.init(params), params)
    with pytest.raises(ValueError, match="scalar"):
        tx.update(grads_with_norm(0.1), tx.init(params), params, value=jnp.ones(2))


def test_reset_or_rollback_needs_params():
    tx = ao.plateau_escape(optax.adam, BASE, rollback=ao.RollbackGuard())
    state = tx.init({"w": jnp.ones(4)})
    with pytest.raises(ValueError, match="needs params"):
        tx.update(grads_with_norm(0.1), state, value=1.0)


def test_works_without_params_when_not_needed():
    tx = ao.plateau_escape(optax.sgd, BASE, patience=0)
    state = tx.init({"w": jnp.ones(4)})
    updates, state = tx.update(grads_with_norm(0.1), state, value=1.0)
    chex.assert_tree_all_finite(updates)


@pytest.mark.parametrize(
    "kwargs, exc, name",
    [
        (dict(patience=-1), ValueError, "patience"),
        (dict(accumulation_steps=0), ValueError, "accumulation_steps"),
        (dict(cooldown=-1), ValueError, "cooldown"),
        (dict(mode="up"), ValueError, "mode"),
        (dict(rtol=2.0), ValueError, "rtol"),
        (dict(atol=-1.0), ValueError, "atol"),
        (dict(max_interventions=-1), ValueError, "max_interventions"),
        (dict(seed=-3), ValueError, "seed"),
        (dict(grad_norm_decay=1.0), ValueError, "grad_norm_decay"),
        (dict(boost_warmup_steps=-1), ValueError, "boost_warmup_steps"),
        (dict(boost_decay_steps=0), ValueError, "boost_decay_steps"),
        (dict(max_learning_rate=0.0), ValueError, "max_learning_rate"),
        (dict(policy="adaptive"), TypeError, "policy"),
        (dict(rollback=True), TypeError, "rollback"),
    ],
)
def test_invalid_configuration_raises_at_construction(kwargs, exc, name):
    with pytest.raises(exc, match=name):
        ao.plateau_escape(optax.adam, BASE, **kwargs)


@pytest.mark.parametrize("kwargs, name", [
    (dict(learning_rate=1e-46), "learning_rate"),  # 0.0 in float32: no update at all
    (dict(max_learning_rate=1e-46), "max_learning_rate"),
    (dict(rtol=1 - 1e-12), "rtol"),  # 1.0 in float32: no window could ever improve
])
def test_values_that_round_out_of_range_in_float32_are_refused(kwargs, name):
    kwargs = {"learning_rate": BASE, **kwargs}
    with pytest.raises(ValueError, match=f"{name} must be .* after rounding to float32, got "
                                         f"{name} = .*, which is"):
        ao.plateau_escape(optax.adam, **kwargs)


@pytest.mark.parametrize("lr", [0.0, -1e-3, float("nan"), jnp.float32(-1.0)])
def test_invalid_learning_rate(lr):
    with pytest.raises(ValueError, match="learning_rate"):
        ao.plateau_escape(optax.adam, lr)


@pytest.mark.parametrize("lr", ["1e-3", None, jnp.ones(2)])
def test_learning_rate_of_another_type(lr):
    with pytest.raises(TypeError, match="learning_rate must be a float > 0 or an optax schedule"):
        ao.plateau_escape(optax.adam, lr)


@pytest.mark.parametrize("lr", [jnp.float32(1e-3), np.float32(1e-3), np.float64(1e-3)])
def test_a_scalar_array_learning_rate_is_a_float(lr):
    state = ao.plateau_escape(optax.adam, lr).init({"w": jnp.ones(2)})
    assert float(optax.tree.get(state, "learning_rate")) == pytest.approx(1e-3)


def test_invalid_optimizer():
    with pytest.raises(TypeError, match="not a built GradientTransformation"):
        ao.plateau_escape(optax.adam(1e-3), BASE)
    with pytest.raises(TypeError, match="learning_rate"):
        ao.plateau_escape(optax.scale_by_adam, BASE)


@settings(max_examples=25, deadline=None)
@given(
    values=st.lists(st.one_of(st.floats(-10, 10), st.just(float("nan"))), min_size=1, max_size=40),
    norm=st.floats(0.0, 5.0),
    max_interventions=st.integers(0, 4),
    patience=st.integers(0, 2),
    cap=st.floats(1e-3, 2e-2),
)
def test_property_count_and_lr_never_exceed_their_caps(values, norm, max_interventions, patience, cap):
    tx = ao.plateau_escape(optax.adam, BASE, patience=patience, max_interventions=max_interventions,
                           max_learning_rate=cap)
    _, rows = drive(tx, values, norm=norm)
    assert all(r["count"] <= max_interventions for r in rows)
    assert all(r["lr"] <= cap * (1 + 1e-6) for r in rows)
    assert all(r["lr"] > 0 for r in rows)


def test_init_state_leaves_are_distinct_buffers_so_the_state_can_be_donated():
    tx = ao.plateau_escape(optax.adam, BASE, rollback=ao.RollbackGuard())
    params = {"w": jnp.ones(4)}
    state = tx.init(params)
    leaves = jax.tree.leaves(state)
    assert len({id(x) for x in leaves}) == len(leaves)
    step = jax.jit(lambda s, g, p: tx.update(g, s, p, value=jnp.float32(1.0))[1], donate_argnums=0)
    state = step(state, grads_with_norm(0.1), params)
    chex.assert_tree_all_finite((state.optimizer_state, state.intervention, state.loss_weights))


# -- update_unless_skipped: one semantics, a cond on CPU and selects elsewhere ---------------

def _adam_step(params, grads):
    tx = optax.adam(0.1)
    state = tx.init(params)
    state = tx.update(grads, state, params)[1]  # non-zero moments
    return (lambda: tx.update(grads, state, params)), state


@pytest.mark.parametrize("keep", [True, False])
def test_skip_lowerings_agree_bit_for_bit(keep):
    params = {"w": jnp.linspace(-1.0, 1.0, 6), "b": jnp.ones(3, jnp.bfloat16)}
    grads = {"w": jnp.full(6, 0.3), "b": jnp.full(3, -0.2, jnp.bfloat16)}
    update, state = _adam_step(params, grads)
    zeros = jax.tree.map(jnp.zeros_like, update()[0])
    from adaptive_optax.conditional import _either_with_cond, _either_with_select, _skipped
    by_cond = jax.jit(lambda k: _either_with_cond(k, update, _skipped(state)))(jnp.bool_(keep))
    by_select = jax.jit(lambda k: _either_with_select(k, update, _skipped(state)))(
        jnp.bool_(keep))
    chex.assert_trees_all_equal(by_cond, by_select)
    expected = update() if keep else (zeros, state)
    chex.assert_trees_all_equal(by_cond, jax.jit(lambda: expected)())
    chex.assert_trees_all_equal_dtypes(by_cond[0], grads)


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the CPU lowering")
def test_cpu_update_uses_a_conditional_and_copies_no_moments():
    # With selects, XLA:CPU copied Adam's mu and nu every step (2 parameter copies).
    params = {"w": jnp.ones((64, 64)), "b": jnp.zeros(64)}
    entry = compiled_update_entry(ao.plateau_escape(optax.adam, BASE), params, params)
    assert entry.count(" conditional(") == 1
    assert "f32[64,64]{1,0} copy(" not in entry and "f32[64]{0} copy(" not in entry


def test_gpu_and_tpu_lower_the_skip_without_a_conditional():
    update, state = _adam_step({"w": jnp.ones(3)}, {"w": jnp.ones(3)})
    f = jax.jit(lambda keep: ao.transform.update_unless_skipped(keep, update, state))

    def cases(platform):
        return jax.export.export(f, platforms=[platform])(jnp.bool_(True)).mlir_module().count(
            "stablehlo.case")

    # platform_dependent itself adds a constant-index case that XLA inlines.
    assert cases("cuda") == cases("tpu") == cases("cpu") - 1


def test_clipping_inside_the_wrapped_optimizer_measures_the_raw_norm():
    # README's advice: clip in the factory, and the EMA still sees the raw gradients.
    tx = ao.plateau_escape(
        lambda learning_rate: optax.chain(optax.clip_by_global_norm(1.0),
                                          optax.sgd(learning_rate)), 1.0)
    params = {"w": jnp.zeros(4)}
    updates, state = tx.update({"w": jnp.full(4, 10.0)}, tx.init(params), params, value=1.0)
    assert float(optax.tree.norm(updates)) == pytest.approx(1.0)
    assert float(ao.state_field(state, "last_grad_norm")) == pytest.approx(20.0)


def test_inside_multisteps_the_detector_sees_one_value_per_real_step():
    # README: MultiSteps runs the update on the last micro-step with its value=.
    tx = optax.MultiSteps(ao.plateau_escape(optax.sgd, 0.1, patience=0, cooldown=5),
                          every_k_schedule=2)
    params = {"w": jnp.ones(4)}
    state = tx.init(params)
    step = jax.jit(lambda s, v: tx.update({"w": jnp.full(4, 0.02)}, s, params, value=v))
    for value in (1.0, 9.0, 1.0, 9.0, 1.0, 9.0):  # 6 micro-steps = 3 real steps
        _, state = step(state, jnp.float32(value))
    assert int(ao.state_field(state, "windows_completed")) == 3
    assert float(ao.state_field(state, "window_value")) == 9.0  # the last micro-step's value


@pytest.mark.parametrize("factory", [optax.contrib.prodigy, optax.contrib.schedule_free_adamw])
def test_inner_state_never_aliases_the_parameters(factory):
    # A donated step with both params and state would donate one buffer twice.
    params = {"w": jnp.ones(4)}
    state = ao.plateau_escape(factory, 1e-2).init(params)
    leaves = {id(x) for x in jax.tree.leaves(state)}
    assert not leaves & {id(p) for p in jax.tree.leaves(params)}

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def step(params, state):
        tx = ao.plateau_escape(factory, 1e-2)
        updates, state = tx.update(grads_with_norm(0.1), state, params, value=jnp.float32(1.0))
        return optax.apply_updates(params, updates), state

    step(params, state)  # raised "Attempt to donate the same buffer twice" before
