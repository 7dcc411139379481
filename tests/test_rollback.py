"""Rollback guard: restore the snapshot after a bad intervention, then be conservative."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import adaptive_optax as ao
from adaptive_optax.segmentation.policies import adaptive_mix_policy
from helpers import compiled_update_entry

BASE = 1e-2


def run(tx, values, norm=0.04):
    params = {"w": jnp.arange(4.0), "b": jnp.ones((2, 2))}
    state = tx.init(params)

    @jax.jit
    def step(params, state, value):
        grads = jax.tree.map(lambda p: jnp.full_like(p, norm / np.sqrt(8)), params)
        updates, state = tx.update(grads, state, params, value=value)
        return optax.apply_updates(params, updates), state

    history = []
    for v in values:
        before = params
        params, state = step(params, state, jnp.float32(v))
        history.append(dict(
            before=before, after=params, state=state,
            count=int(optax.tree.get(state, "intervention_count")),
            rollbacks=int(ao.state_field(state, "rollback_count")),
            lr=float(optax.tree.get(state, "learning_rate")),
            mix=int(ao.state_field(state, "mix_index")),
        ))
    return history


def test_rollback_restores_parameters_rate_and_mix():
    tx = ao.plateau_escape(optax.sgd, BASE, patience=0, rollback=ao.RollbackGuard(guard_windows=2, rtol=0.1))
    # step 0: best 1.0; step 1: plateau -> intervention 1 (snapshot = params before step 1);
    # step 2: 1.5 > 1.0 * 1.1 -> rollback.
    h = run(tx, [1.0, 1.0, 1.5, 1.2])
    assert h[1]["count"] == 1 and h[1]["rollbacks"] == 0
    assert h[2]["rollbacks"] == 1
    chex.assert_trees_all_close(h[2]["after"], h[1]["before"], atol=1e-6)  # back to the snapshot
    assert h[2]["lr"] == pytest.approx(BASE)  # multiplier restored to 1
    assert h[2]["mix"] == h[0]["mix"]  # initial mix restored
    chex.assert_trees_all_close(ao.state_field(h[2]["state"], "conservatism"), 0.5)


def test_after_rollback_next_intervention_is_more_conservative():
    policy = adaptive_mix_policy()
    tx = ao.plateau_escape(optax.sgd, BASE, patience=0, policy=policy, boost_warmup_steps=0,
                           rollback=ao.RollbackGuard(guard_windows=1, rtol=0.1, shrink=0.5))
    h = run(tx, [1.0, 1.0, 1.5, 1.0, 1.0])
    # rollback at step 2 restarts patience; step 3 is non-improving -> intervention 2.
    assert [r["count"] for r in h] == [0, 1, 1, 2, 3]
    # intervention 2: norm 0.04 -> 10 x 0.7 = 7, shrunk: 1 + 6 * 0.5 = 4; with the final mix.
    assert h[3]["lr"] == pytest.approx(BASE * 4.0, rel=1e-5)
    assert h[3]["mix"] == policy.final_index


def test_after_the_forced_final_mix_later_interventions_follow_the_plan_again():
    # The documented choice: a rollback forces the final mix once, not for the rest of the run.
    tx = ao.plateau_escape(optax.sgd, BASE, patience=0, max_interventions=6, seed=3,
                           boost_warmup_steps=0, policy=adaptive_mix_policy(),
                           rollback=ao.RollbackGuard(guard_windows=1, rtol=0.1))
    h = run(tx, [1.0, 1.0, 1.5, 1.0, 1.0, 1.0, 1.0])
    assert [r["count"] for r in h] == [0, 1, 1, 2, 3, 4, 5]
    plan = np.asarray(ao.state_field(h[0]["state"], "planned_mix_index"))
    final = adaptive_mix_policy().final_index
    assert h[3]["mix"] == final  # the intervention right after the rollback
    assert [r["mix"] for r in h[4:]] == plan[2:5].tolist()  # then the plan's entries
    assert final not in plan[2:5]  # (so the check above can tell the two apart)
    # Every later boost is still shrunk: 1 + (10 * 0.5 - 1) * 0.5 = 3 at intervention 3.
    assert h[4]["lr"] == pytest.approx(BASE * 3.0, rel=1e-5)


def test_a_reset_on_rollback_starts_the_optimizer_from_the_restored_parameters():
    # Schedule-free keeps a parameter-valued sequence z in its state: a reset
    # built from the bad (pre-restore) parameters would pull the model back.
    guard = ao.RollbackGuard(guard_windows=2, reset_optimizer=True)
    tx = ao.plateau_escape(optax.contrib.schedule_free_sgd, 0.1, patience=0, rollback=guard)
    params = {"w": jnp.zeros(2)}
    state = tx.init(params)
    step = jax.jit(lambda g, s, p, v: tx.update(g, s, p, value=v))
    seen = []
    for value in (1.0, 1.0, 2.0):  # step 2 intervenes, step 3 is worse: rollback
        seen.append(params)
        updates, state = step({"w": jnp.ones(2)}, state, params, value)
        params = optax.apply_updates(params, updates)
    assert int(ao.state_field(state, "rollback_count")) == 1
    snapshot = seen[1]  # what the intervening step was given
    assert float(jnp.abs(seen[2]["w"] - snapshot["w"]).max()) > 0.1  # the boost moved it
    chex.assert_trees_all_close(params, snapshot, atol=1e-6)
    chex.assert_trees_all_close(state.optimizer_state.inner_state.z, params, atol=1e-6)
    updates, state = step({"w": jnp.zeros(2)}, state, params, 1.0)  # zero gradient
    chex.assert_trees_all_close(optax.apply_updates(params, updates), params, atol=1e-6)


@pytest.mark.parametrize("decay_steps", [None, 6])
def test_a_rollback_resumes_the_boost_in_force_before_the_intervention(decay_steps):
    # Intervention 1 (step 1, 10x) is still ramping up when intervention 2
    # (step 2) is rolled back at step 3: the rate must go on as if intervention
    # 2 had never happened (a first version held the mid-ramp value forever, or
    # restarted the decay from it).
    tx = ao.plateau_escape(optax.sgd, BASE, patience=0, boost_warmup_steps=4,
                           boost_decay_steps=decay_steps, rollback=ao.RollbackGuard(guard_windows=1))
    h = run(tx, [1.0, 1.0, 1.0, 5.0] + [0.9 - 0.01 * k for k in range(10)])
    assert [r["count"] for r in h[:4]] == [0, 1, 2, 2] and h[3]["rollbacks"] == 1
    for step in range(3, len(h)):
        expected = ao.boost_multiplier(jnp.int32(step - 1), 1.0, 10.0, warmup_steps=4,
                                       decay_steps=decay_steps)
        assert h[step]["lr"] == pytest.approx(BASE * float(expected), rel=1e-5), step


def test_rollback_returns_the_parameters_to_the_snapshot_up_to_rounding():
    tx = ao.plateau_escape(optax.sgd, BASE, patience=0,
                           rollback=ao.RollbackGuard(guard_windows=2, rtol=0.1))
    h = run(tx, [1.0, 1.0, 1.5])
    for after, snapshot in zip(jax.tree.leaves(h[2]["after"]), jax.tree.leaves(h[1]["before"])):
        np.testing.assert_array_max_ulp(np.asarray(after), np.asarray(snapshot), maxulp=2)


def test_no_rollback_when_the_intervention_helps():
    tx = ao.plateau_escape(optax.sgd, BASE, patience=0, rollback=ao.RollbackGuard(guard_windows=3))
    h = run(tx, [1.0, 1.0, 0.9, 0.8, 0.7])
    assert h[-1]["rollbacks"] == 0
    assert h[2]["lr"] == pytest.approx(BASE * 10, rel=1e-5)


def test_guard_only_watches_guard_windows():
    tx = ao.plateau_escape(optax.sgd, BASE, patience=5, max_interventions=1,
                           rollback=ao.RollbackGuard(guard_windows=2))
    # plateau at step 6; watched windows at steps 7, 8; a bad value at step 9 is ignored.
    h = run(tx, [1.0] * 7 + [1.0, 1.0, 5.0])
    assert h[6]["count"] == 1
    assert h[-1]["rollbacks"] == 0


def test_stop_after_rollback_makes_no_more_interventions():
    tx = ao.plateau_escape(optax.sgd, BASE, patience=0,
                           rollback=ao.RollbackGuard(guard_windows=1, stop_after_rollback=True))
    h = run(tx, [1.0, 1.0, 2.0] + [1.0] * 6)
    assert h[-1]["count"] == 1 and h[-1]["rollbacks"] == 1
    assert h[-1]["lr"] == pytest.approx(BASE)


def test_rollback_in_max_mode():
    tx = ao.plateau_escape(optax.sgd, BASE, patience=0, mode="max",
                           rollback=ao.RollbackGuard(guard_windows=1, rtol=0.1))
    h = run(tx, [0.8, 0.8, 0.5])
    assert h[2]["rollbacks"] == 1


def test_a_watched_window_without_a_finite_value_rolls_back():
    tx = ao.plateau_escape(optax.sgd, BASE, patience=0, rollback=ao.RollbackGuard(guard_windows=1))
    h = run(tx, [1.0, 1.0, np.nan, 1.0])
    assert [r["rollbacks"] for r in h] == [0, 0, 1, 1]
    chex.assert_trees_all_close(h[2]["after"], h[1]["before"], atol=1e-6)
    assert h[2]["lr"] == pytest.approx(BASE)


def test_nan_windows_are_ignored_with_rollback_on_nonfinite_off():
    guard = ao.RollbackGuard(guard_windows=1, rollback_on_nonfinite=False)
    h = run(ao.plateau_escape(optax.sgd, BASE, patience=0, rollback=guard),
            [1.0, 1.0, np.nan, 1.0])
    assert h[-1]["rollbacks"] == 0


def test_a_nan_window_outside_the_watch_never_rolls_back():
    # Intervention at step 1; its one watched window (step 2) is fine; the NaN
    # window at step 3 comes after the watch.
    h = run(ao.plateau_escape(optax.sgd, BASE, patience=0, rollback=ao.RollbackGuard(guard_windows=1)),
            [1.0, 1.0, 0.5, np.nan, 0.4])
    assert [r["count"] for r in h] == [0, 1, 1, 1, 1]
    assert int(ao.state_field(h[2]["state"], "guard_windows_left")) == 0
    assert h[-1]["rollbacks"] == 0


def test_a_boost_that_diverges_to_nan_is_rolled_back():
    # After the intervention, loss and gradients are NaN (a boost too big for
    # the step). Skipped updates freeze the model where the boost took it; with
    # no finite mean to compare, only the non-finite rule can undo the boost.
    tx = ao.plateau_escape(optax.sgd, BASE, patience=0, rollback=ao.RollbackGuard(guard_windows=2))
    params = {"w": jnp.arange(3.0)}
    state = tx.init(params)
    step = jax.jit(lambda g, s, p, v: tx.update(g, s, p, value=v))
    seen = []
    for value in (1.0, 1.0, np.nan, np.nan):
        seen.append(params)
        grads = {"w": jnp.full(3, value if np.isnan(value) else 0.3)}
        updates, state = step(grads, state, params, jnp.float32(value))
        params = optax.apply_updates(params, updates)
    assert int(optax.tree.get(state, "intervention_count")) == 1
    assert int(ao.state_field(state, "rollback_count")) == 1
    chex.assert_trees_all_close(params, seen[1], atol=1e-6)  # before the intervening step
    assert float(optax.tree.get(state, "learning_rate")) == pytest.approx(BASE)


def test_snapshot_costs_one_parameter_copy():
    params = {"w": jnp.zeros((100, 10)), "b": jnp.zeros(10, jnp.bfloat16)}
    plain = ao.plateau_escape(optax.adam, BASE).init(params)
    guarded = ao.plateau_escape(optax.adam, BASE, rollback=ao.RollbackGuard()).init(params)
    nbytes = lambda t: sum(x.nbytes for x in jax.tree.leaves(t))  # noqa: E731
    param_bytes = nbytes(params)
    extra = nbytes(guarded) - nbytes(plain)
    assert param_bytes <= extra <= param_bytes + 64


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the CPU lowering")
def test_guarded_update_copies_no_parameters_on_cpu():
    # The snapshot is replaced under a cond that passes the old one through: with
    # a select, XLA:CPU copied params and snapshot every step (2 parameter copies).
    params = {"w": jnp.ones((64, 64)), "b": jnp.zeros(64)}
    tx = ao.plateau_escape(optax.adam, BASE, rollback=ao.RollbackGuard())
    entry = compiled_update_entry(tx, params, params)
    assert "f32[64,64]{1,0} copy(" not in entry and "f32[64]{0} copy(" not in entry
    assert entry.count(" conditional(") == 2  # the skip and the snapshot


def test_guarded_update_lowers_without_a_conditional_on_gpu_and_tpu():
    # Each platform_dependent adds constant-index cases that XLA inlines (2 per call,
    # on every platform); on CPU each also holds a real cond (the skip, the snapshot).
    params = {"w": jnp.ones(3)}
    tx = ao.plateau_escape(optax.adam, BASE, rollback=ao.RollbackGuard())
    state = tx.init(params)
    update = jax.jit(lambda p, s, g: tx.update(g, s, p, value=jnp.float32(1.0)))

    def cases(platform):
        exported = jax.export.export(update, platforms=[platform])(params, state, params)
        return exported.mlir_module().count("stablehlo.case")

    assert cases("cuda") == cases("tpu") == cases("cpu") - 2


@pytest.mark.parametrize("kwargs, name", [
    (dict(guard_windows=0), "guard_windows"), (dict(rtol=-1.0), "rtol"),
    (dict(atol=float("inf")), "atol"), (dict(shrink=1.5), "shrink"),
    (dict(abort_z=-1.0), "abort_z"), (dict(abort_z=float("nan")), "abort_z"),
])
def test_invalid_guard_arguments(kwargs, name):
    with pytest.raises(ValueError, match=name):
        ao.RollbackGuard(**kwargs)


def test_invalid_restore_params_is_a_type_error():
    with pytest.raises(TypeError, match="restore_params"):
        ao.RollbackGuard(restore_params="no")


# Windows of 8 steps: a plateau at the close of window 2 (step 15) starts the watch.
NOISY = [1.0, 1.2, 0.8, 1.1, 0.9, 1.0, 1.05, 0.95] * 2


def test_the_per_step_check_rolls_back_a_blow_up_before_the_window_closes():
    tx = ao.plateau_escape(optax.sgd, BASE, patience=0, accumulation_steps=8,
                           rollback=ao.RollbackGuard(guard_windows=2, rtol=0.1))
    h = run(tx, NOISY + [5.0, 5.0, 5.0, 1.0])
    assert h[15]["count"] == 1 and h[15]["rollbacks"] == 0
    # Step 16: one value of 5 against best 1.0 and the firing window's sd ~0.12:
    # 4.0 > 0.1 + 3 * 0.12, rolled back at once (the window closes at step 23).
    assert h[16]["rollbacks"] == 1
    chex.assert_trees_all_close(h[16]["after"], h[15]["before"], atol=1e-6)
    assert h[16]["lr"] == pytest.approx(BASE)


def test_the_per_step_check_tolerates_noise_like_the_firing_window():
    tx = ao.plateau_escape(optax.sgd, BASE, patience=0, accumulation_steps=8,
                           rollback=ao.RollbackGuard(guard_windows=2, rtol=0.1))
    # After the intervention, values as noisy as before (first one 1.3: 0.3 above
    # the best, within 0.1 + 3 sd at k=1); their running mean stays within the margin.
    h = run(tx, NOISY + [1.3, 0.9, 1.1, 0.95, 1.05, 1.0, 0.9, 1.0])
    assert h[15]["count"] == 1
    assert h[-1]["rollbacks"] == 0


def test_without_the_per_step_check_only_the_window_rolls_back():
    tx = ao.plateau_escape(optax.sgd, BASE, patience=0, accumulation_steps=8,
                           rollback=ao.RollbackGuard(guard_windows=2, rtol=0.1, abort_z=None))
    h = run(tx, NOISY + [5.0] * 8)
    assert [r["rollbacks"] for r in h[16:]] == [0] * 7 + [1]  # at the window's close


def test_a_guard_without_a_parameter_copy_reverts_the_rate_and_mix_only():
    guard = ao.RollbackGuard(guard_windows=2, rtol=0.1, restore_params=False)
    tx = ao.plateau_escape(optax.sgd, BASE, patience=0, rollback=guard)
    params = {"w": jnp.arange(4.0), "b": jnp.ones((2, 2))}
    state = tx.init(params)
    assert jax.tree.leaves(state.rollback_snapshot) == []  # no copy
    assert len(jax.tree.leaves(state)) == len(jax.tree.leaves(
        ao.plateau_escape(optax.sgd, BASE).init(params)))
    h = run(tx, [1.0, 1.0, 1.5, 1.2])
    assert h[1]["count"] == 1 and h[2]["rollbacks"] == 1
    assert h[2]["lr"] == pytest.approx(BASE) and h[2]["mix"] == h[0]["mix"]
    # The rolled-back step applies the inner update at the restored rate (no restore).
    grads = jax.tree.map(lambda p: jnp.full_like(p, 0.04 / np.sqrt(8)), params)
    expected = jax.tree.map(lambda b, g: b - BASE * g, h[2]["before"], grads)
    chex.assert_trees_all_close(h[2]["after"], expected, rtol=1e-6)
    # ... and needs no params.
    updates, _ = tx.update(grads, state, value=jnp.float32(1.0))
    chex.assert_trees_all_close(updates, jax.tree.map(lambda g: -BASE * g, grads), rtol=1e-6)


@pytest.mark.parametrize("require", [False, True])
def test_require_improvement_undoes_a_boost_that_leaves_the_run_on_its_plateau(require):
    guard = ao.RollbackGuard(guard_windows=2, rtol=0.1, require_improvement=require)
    tx = ao.plateau_escape(optax.sgd, BASE, patience=0, cooldown=3, boost_warmup_steps=0,
                           rollback=guard)
    # Intervention at step 1; the two watched windows (steps 2, 3) are no better
    # than the best (1.0) but within its 10% tolerance.
    h = run(tx, [1.0, 1.0, 1.05, 1.02])
    assert h[1]["count"] == 1
    assert h[2]["rollbacks"] == 0  # the first watched window only has to be not much worse
    assert h[3]["rollbacks"] == int(require)
    if require:
        assert h[3]["lr"] == pytest.approx(BASE)


def test_require_improvement_keeps_a_boost_that_got_the_run_moving():
    guard = ao.RollbackGuard(guard_windows=2, rtol=0.1, require_improvement=True)
    tx = ao.plateau_escape(optax.sgd, BASE, patience=0, cooldown=3, boost_warmup_steps=0,
                           rollback=guard)
    h = run(tx, [1.0, 1.0, 1.02, 0.9, 0.85])
    assert h[-1]["count"] >= 1 and h[-1]["rollbacks"] == 0
