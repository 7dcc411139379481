"""Saturating counters: a long run never wraps a count of the state to negative."""

import jax.numpy as jnp
import optax

import adaptive_optax as ao
from adaptive_optax._counters import increment_if
from adaptive_optax.state import INT_FIELDS

INT32_MAX = 2**31 - 1


def test_increment_if_counts_where_flagged_and_stops_at_the_int32_maximum():
    assert int(increment_if(jnp.int32(4))) == 5
    assert int(increment_if(jnp.int32(4), jnp.bool_(False))) == 4
    assert int(increment_if(jnp.int32(INT32_MAX), jnp.bool_(True))) == INT32_MAX
    assert increment_if(jnp.int32(0)).dtype == jnp.int32


def test_the_state_counters_saturate_instead_of_wrapping():
    # Wrapped, the step would restart the base schedule at its first value and
    # grad_norm_steps would read as "no norm yet" (EMA 0: the biggest boost).
    tx = ao.plateau_escape(optax.sgd, optax.linear_schedule(0.1, 0.001, 1000), patience=0)
    params = {"w": jnp.zeros(3)}
    state = tx.init(params)
    counters = ("step", "grad_norm_steps", "windows_completed", "nonfinite_count",
                "nonfinite_grad_count")
    ints = state.packed_ints
    for name in counters:
        ints = ints.at[INT_FIELDS.index(name)].set(INT32_MAX)
    state = state._replace(packed_ints=ints, plateau_count=jnp.int32(INT32_MAX))
    for grads, value in (({"w": jnp.ones(3)}, 1.0), ({"w": jnp.full(3, jnp.inf)}, jnp.nan),
                         ({"w": jnp.ones(3)}, 2.0)):
        _, state = tx.update(grads, state, params, value=value)
    for name in counters:
        assert int(ao.state_field(state, name)) == INT32_MAX, name
    assert float(ao.state_field(state, "base_learning_rate")) == float(jnp.float32(0.001))
    assert float(optax.tree.get(state, "grad_norm_ema")) > 0
