"""Saturating int32 counters for the state.

A wrapped counter would turn negative: the base schedule would restart from
its first value, and a negative ``grad_norm_steps`` would read as "no norm
yet" (EMA 0, the biggest boost). Like optax's own step counts
(``optax.safe_increment``), the counters stop at the int32 maximum instead.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def increment_if(count: jax.Array, flag: jax.Array | bool = True) -> jax.Array:
    """``count + 1`` where ``flag``, saturating at the int32 maximum.

    Example:
        >>> int(increment_if(jnp.int32(2**31 - 1)))
        2147483647
    """
    return jnp.where(flag, optax.safe_increment(count), count)
