"""One semantics, two lowerings: ``taken()`` if a predicate holds, else a fallback.

The update skips the inner optimizer on non-finite gradients and the guard
rewrites its parameter snapshot only when a step intervenes. Both are "do
this, or keep that", and the best lowering depends on the backend, picked
when the step is compiled (``jax.lax.platform_dependent``):

* CPU: a ``lax.cond``. The predicate is already in host memory, and the
  taken branch runs as it would alone. With selects, XLA:CPU recomputes
  Adam's new moments in two fusions that both read the old ones, and copies
  ``mu`` and ``nu`` every step to keep their donated buffers safe (2
  parameter-sized copies; docs/design.md, item 15).
* GPU/TPU: elementwise selects, which XLA fuses into the moment updates. A
  conditional's predicate would be copied to the host every step.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

__all__ = ["either", "typed_like", "update_unless_skipped"]


def update_unless_skipped(
    keep: jax.Array,
    update: Callable[[], tuple[optax.Updates, optax.OptState]],
    state: optax.OptState,
) -> tuple[optax.Updates, optax.OptState]:
    """``update()`` if ``keep``, else zero updates and ``state`` unchanged (bit-identical).

    A ``lax.cond`` on CPU, selects on GPU/TPU (see the module docstring).

    Args:
        keep: bool scalar: apply the update.
        update: Computes ``(updates, new_state)``.
        state: The state to keep on a skipped step.

    Returns:
        ``(updates, state)``; skipped updates are zeros of the updates' dtypes.

    Example:
        >>> step = lambda: (jnp.ones(2), jnp.float32(2.0))
        >>> u, s = update_unless_skipped(jnp.bool_(False), step, jnp.float32(0.0))
        >>> u.tolist(), float(s)
        ([0.0, 0.0], 0.0)
    """
    return either(keep, update, _skipped(state))


def either(keep: jax.Array, taken: Callable[[], Any], fallback: Callable[[Any], Any]) -> Any:
    """``taken()`` if ``keep`` else ``fallback(typed)``: a cond on CPU, selects elsewhere.

    Args:
        keep: bool scalar.
        taken: Computes the kept value.
        fallback: Computes the other value from ``typed``, ``taken()``'s
            output, which it may use for dtypes and shapes only (in the cond
            its values are dead code).

    Returns:
        A pytree like ``taken()``'s.

    Example:
        >>> float(either(jnp.bool_(False), lambda: jnp.float32(1.0), lambda t: t * 0))
        0.0
    """
    return jax.lax.platform_dependent(
        keep,
        cpu=lambda keep: _either_with_cond(keep, taken, fallback),
        default=lambda keep: _either_with_select(keep, taken, fallback))


def typed_like(new, old):
    """``old``, typed like ``new`` (dtypes, and the varying axes inside shard_map, which
    cond checks); XLA folds the select away."""
    return jax.tree.map(lambda n, o: jnp.where(False, n, o), new, old)


def _skipped(state):
    """The fallback of :func:`update_unless_skipped`: zero updates and ``state``."""
    def fallback(typed):
        new_updates, new_state = typed
        return optax.tree.zeros_like(new_updates), typed_like(new_state, state)

    return fallback


def _either_with_cond(keep, taken, fallback):
    # XLA drops the taken() inside the fallback branch as dead code.
    return jax.lax.cond(keep, taken, lambda: fallback(taken()))


def _either_with_select(keep, taken, fallback):
    out = taken()
    return optax.tree.where(keep, out, fallback(out))
