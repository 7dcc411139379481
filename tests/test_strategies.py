"""Named strategies build the transformations they say."""

import jax.numpy as jnp
import numpy as np
import optax
import pytest

import adaptive_optax as ao
from adaptive_optax import strategies


@pytest.mark.parametrize("name", strategies.STRATEGIES)
def test_every_strategy_builds_and_exposes_the_state_fields(name):
    tx = strategies.make_optimizer(name, 1e-3, total_steps=20, patience=0, cooldown=0)
    params = {"w": jnp.ones(3)}
    state = tx.init(params)
    for _ in range(3):
        _, state = tx.update({"w": jnp.full(3, 0.01)}, state, params, value=jnp.float32(1.0))
    assert optax.tree.get(state, "loss_weights") is not None
    count = int(optax.tree.get(state, "intervention_count"))
    assert count == (2 if name in ("adaptive", "adaptive-guard", "legacy") else 0)


def test_schedules_change_the_base_rate():
    tx = strategies.make_optimizer("cosine", 1e-2, total_steps=10)
    params = {"w": jnp.ones(3)}
    state = tx.init(params)
    for _ in range(9):
        _, state = tx.update({"w": jnp.ones(3)}, state, params, value=1.0)
    assert float(optax.tree.get(state, "learning_rate")) < 2e-3


def test_reduce_on_plateau_is_optax_contrib():
    tx = strategies.make_optimizer("reduce-on-plateau", 1e-3, total_steps=10, patience=0)
    state = tx.init({"w": jnp.ones(3)})
    assert optax.tree.get(state, "ReduceLROnPlateauState") is not None


def test_unknown_strategy():
    with pytest.raises(ValueError, match="strategy"):
        strategies.make_optimizer("magic", 1e-3, total_steps=10)


def test_reduce_on_plateau_train_step_reads_our_fields_and_its_scale():
    from helpers import tiny_data, tiny_run

    from adaptive_optax import data

    run = tiny_run("reduce-on-plateau", patience=0, accumulation_steps=1, rtol=0.5)
    tr, _ = tiny_data()
    batch = data.SegmentationData(*(jnp.asarray(a[:8]) for a in tr))
    state = run["state"]
    lrs = []
    for _ in range(3):
        state, metrics = run["train_step"](state, batch)
        lrs.append(float(metrics.readings["learning_rate"]))
    # patience=0: optax's plateau_count reaches 1 on the first bad window -> scale 0.1.
    assert lrs[0] == pytest.approx(3e-3)
    assert lrs[1] == pytest.approx(3e-4)
    assert int(metrics.readings["intervention_count"]) == 0


def _rates_at_interventions(tx, steps=3):
    params = {"w": jnp.ones(4)}
    state, rates = tx.init(params), []
    for _ in range(steps):  # a flat loss at gradient norm 0.04: boost 10 from the table
        _, state = tx.update({"w": jnp.full(4, 0.02)}, state, params, value=jnp.float32(1.0))
        rates.append(float(optax.tree.get(state, "learning_rate")))
    return rates


def test_custom_policy_is_used():
    from adaptive_optax.policy import adaptive_policy

    kwargs = dict(total_steps=10, patience=0, cooldown=0)
    custom = strategies.make_optimizer("adaptive", 1e-3, policy=adaptive_policy(damping=(1.0, 0.5)),
                                       **kwargs)
    default = strategies.make_optimizer("adaptive", 1e-3, **kwargs)
    # Interventions at steps 1 and 2: boosts 10 x 1, then 10 x 0.5 (the default damps by 0.7).
    assert _rates_at_interventions(custom)[1:] == pytest.approx([1e-2, 5e-3])
    assert _rates_at_interventions(default)[1:] == pytest.approx([1e-2, 7e-3])


def test_sgdr_restarts_the_rate_every_quarter_of_the_run():
    tx = strategies.make_optimizer("sgdr", 1e-2, total_steps=8)
    params = {"w": jnp.ones(3)}
    state, rates = tx.init(params), []
    for _ in range(8):
        _, state = tx.update({"w": jnp.ones(3)}, state, params, value=jnp.float32(1.0))
        rates.append(float(ao.state_field(state, "base_learning_rate")))
    expected = optax.sgdr_schedule([dict(init_value=1e-2, peak_value=1e-2, decay_steps=2,
                                         warmup_steps=0, end_value=1e-4)] * 4)
    np.testing.assert_allclose(rates, [float(expected(t)) for t in range(8)], rtol=1e-6)
    assert rates[2] == pytest.approx(1e-2) and rates[1] < 1e-2  # decays, then restarts


def test_reduce_on_plateau_refuses_a_maximised_score():
    # optax's reduce_on_plateau would cut the rate while a Dice score improves.
    with pytest.raises(ValueError, match="mode = 'max', allowed: 'min'"):
        strategies.make_optimizer("reduce-on-plateau", 1e-3, total_steps=10, mode="max")


def test_reduce_on_plateau_gets_atol():
    tx = strategies.make_optimizer("reduce-on-plateau", 1e-2, total_steps=10, patience=0,
                                   cooldown=0, rtol=0.0, atol=0.5)
    params = {"w": jnp.ones(3)}
    state = tx.init(params)
    # Each value improves by 0.1 < atol: optax counts it as a plateau and cuts.
    for value in (1.0, 0.9, 0.8):
        _, state = tx.update({"w": jnp.ones(3)}, state, params, value=jnp.float32(value))
    assert float(optax.tree.get(state, "ReduceLROnPlateauState").scale) < 1.0


def test_adaptive_guard_keeps_a_given_rollback_guard(monkeypatch):
    from adaptive_optax.rollback import RollbackGuard

    seen = {}
    real = strategies.plateau_escape

    def spy(*args, **kwargs):
        seen["rollback"] = kwargs.get("rollback")
        return real(*args, **kwargs)

    monkeypatch.setattr(strategies, "plateau_escape", spy)
    guard = RollbackGuard(guard_windows=5)
    strategies.make_optimizer("adaptive-guard", 1e-3, total_steps=10, rollback=guard)
    assert seen["rollback"] is guard
    strategies.make_optimizer("adaptive-guard", 1e-3, total_steps=10)
    assert seen["rollback"] == RollbackGuard()
