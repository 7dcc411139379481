"""Named strategies build the transformations they say."""

import jax.numpy as jnp
import optax
import pytest

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
