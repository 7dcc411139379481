"""A limit on a boost from the size of the update it would scale.

A boost that multiplies a rate already near its stability limit does not
show it at once: on the learning-rate grid a x10 boost of schedule-free Adam
at its top rate kept the loss flat for the 33 steps of its ramp, then one step
took it from 0.2 to 120 (docs/benchmarks.md, "the update-ratio limit"). Neither
the lookahead's 4-step trial nor the guard's per-step check can see that
coming; the loss alone does not tell a stuck run from a fragile one.

The size of the step does. With ``max_update_ratio=r`` the boost is capped so
that the inner optimizer's update at the boosted rate stays within ``r`` times
the parameters' norm: ``boost <= max(1, r * ||params|| / ||u||)``, where ``u``
is the update the inner optimizer would make on this step at the bare base
rate (its own state, these gradients). This is the trust ratio of LARS/LAMB
(You et al., 2017; 2019) used as a bound, not as a per-layer rescaling: a run
whose steps are already large relative to its weights gets no boost; a run at
a rate 10-30x too low, whose steps are tiny, keeps the policy's full boost.
The cap never lowers the rate below the base (it is floored at 1), so it only
ever removes boosts.

The update is computed only on the steps that may intervene, under a
``jax.lax.cond`` on every backend (as the lookahead's trials are): the
elementwise select that :mod:`adaptive_optax.conditional` uses off CPU would
run a second inner update on every step.

Example:
    >>> import optax, jax.numpy as jnp
    >>> inner = optax.sgd(1.0)
    >>> params, grads = {"w": jnp.ones(4)}, {"w": jnp.full(4, 0.01)}
    >>> limit = update_ratio_limit(jnp.bool_(True), 0.05, lambda g, s, p: inner.update(g, s, p),
    ...                            grads, inner.init(params), params)
    >>> round(float(limit), 3)  # the update is 1% of the weights: a boost up to x5
    5.0
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from adaptive_optax.grad_norm import global_norm

__all__ = ["update_ratio_limit"]


def update_ratio_limit(
    needed: jax.Array,
    max_ratio: float,
    step: Callable[[optax.Updates, Any, optax.Params], tuple[optax.Updates, Any]],
    grads: optax.Updates,
    inner_state: Any,
    params: optax.Params,
) -> jax.Array:
    """The largest boost whose update stays within ``max_ratio * ||params||``.

    Args:
        needed: bool scalar: whether this step may intervene; otherwise the
            update is not computed and the limit is ``+inf``.
        max_ratio: The bound on ``||update|| / ||params||`` at the boosted rate, > 0.
        step: ``step(grads, inner_state, params) -> (updates, new_state)``: the
            inner optimizer's update with its rate set to the bare base rate.
        grads: This step's gradients.
        inner_state: The inner optimizer's state before this step.
        params: The current parameters.

    Returns:
        A float32 scalar ``>= 1``: ``max(1, max_ratio * ||params|| / ||u||)``
        (``+inf`` for a zero update or when not ``needed``; 1, no boost, when
        the ratio is not finite: a non-finite update, or zero parameters).
    """
    def limit():
        updates, _ = step(grads, inner_state, params)
        ratio = global_norm(updates) / global_norm(params)  # inf for zero params: no boost
        bound = jnp.where(ratio > 0, jnp.float32(max_ratio) / ratio, jnp.inf)
        return jnp.where(jnp.isfinite(ratio), jnp.maximum(bound, 1.0), 1.0).astype(jnp.float32)

    return jax.lax.cond(needed, limit, lambda: jnp.full([], jnp.inf, jnp.float32))
