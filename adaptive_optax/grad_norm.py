"""A bias-corrected exponential moving average of the global gradient norm.

The seed trainer averages the gradient norm over an epoch
("avg_gradient_norm") to choose how hard to boost the learning rate. Here the
average is an EMA kept in the optimizer state. Like Adam's moments it is
bias-corrected, ``ema = acc / (1 - decay**n)``, so the first windows are not
pulled towards the zero it starts from. Non-finite norms are skipped and
counted, never averaged in.

Cost: the norm reads the gradients once, the work of
``optax.clip_by_global_norm``, in fewer reductions (small leaves are reduced
together, see :func:`global_norm`); the EMA itself is scalar arithmetic.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from adaptive_optax._counters import increment_if


class GradNormState(NamedTuple):
    """Gradient-norm statistics (scalars only)."""

    grad_norm_ema: jax.Array  # float32 [], bias-corrected EMA (0 before any finite norm)
    grad_norm_acc: jax.Array  # float32 [], the biased accumulator behind it
    grad_norm_steps: jax.Array  # int32 [], finite norms folded in
    last_grad_norm: jax.Array  # float32 [], the latest finite norm
    nonfinite_grad_count: jax.Array  # int32 [], steps whose gradients were not finite


# Leaves up to this many elements are reduced together (see global_norm).
SMALL_LEAF_SIZE = 4096
# Leaves per joint reduction: stays below XLA:GPU's operand limit of a fusion.
_LEAVES_PER_REDUCTION = 64


def global_norm(tree) -> jax.Array:
    """The L2 norm of all leaves of ``tree``, accumulated in float32.

    Casting first keeps bfloat16 gradients from losing the sum of squares to
    rounding; XLA fuses the cast into the reduction.

    Leaves of up to :data:`SMALL_LEAF_SIZE` elements (biases, norm scales,
    small kernels) are concatenated and reduced together, 64 at a time;
    larger ones are reduced one by one, as ``optax.tree.norm`` reduces every
    leaf. A reduction of a small leaf costs its launch, not its data: on a
    GPU each is a kernel, so joining them cuts the reduction kernels of a
    model with many small leaves to a few, and XLA fuses the concatenation
    into the reduction (nothing is copied). Large leaves are not joined
    because XLA:CPU writes a concatenation out before reducing it, which
    costs more than the launches it saves past a few thousand elements
    (``docs/design.md``, item 20, has the measurements). Small leaves
    sharded over devices would be gathered to be joined; at 16 KiB a leaf
    that costs little. The result equals ``optax.tree.norm`` up to float
    rounding (another summation order).

    Args:
        tree: A pytree of arrays (gradients or updates).

    Returns:
        A float32 scalar.

    Example:
        >>> float(global_norm({"w": jnp.full(3, 2.0), "b": jnp.zeros(2, jnp.bfloat16)}))
        3.46...
    """
    leaves = [jnp.asarray(x, jnp.float32) for x in jax.tree.leaves(tree)]
    small = [jnp.ravel(x) for x in leaves if x.size <= SMALL_LEAF_SIZE]
    squares = [jnp.sum(jnp.square(x)) for x in leaves if x.size > SMALL_LEAF_SIZE]
    for i in range(0, len(small), _LEAVES_PER_REDUCTION):
        squares.append(jnp.sum(jnp.square(jnp.concatenate(small[i:i + _LEAVES_PER_REDUCTION]))))
    return jnp.sqrt(sum(squares, jnp.zeros([], jnp.float32)))


def init_grad_norm() -> GradNormState:
    """Returns the state before any gradient was seen."""
    # One fresh array per field: a shared buffer could not be donated to a jitted step.
    zero_f = lambda: jnp.zeros([], jnp.float32)  # noqa: E731
    zero_i = lambda: jnp.zeros([], jnp.int32)  # noqa: E731
    return GradNormState(zero_f(), zero_f(), zero_i(), zero_f(), zero_i())


def update_grad_norm(state: GradNormState, norm: jax.Array, decay: float) -> GradNormState:
    """Folds one global gradient norm into the EMA.

    Args:
        state: The current statistics.
        norm: The global L2 norm of this step's gradients (a float32 scalar).
        decay: EMA decay in ``[0, 1)``; 0 keeps only the latest norm.

    Returns:
        The new statistics; a non-finite ``norm`` only bumps
        ``nonfinite_grad_count``, so the state stays finite.

    Example:
        >>> s = init_grad_norm()
        >>> s = update_grad_norm(s, jnp.float32(0.04), decay=0.9)
        >>> round(float(s.grad_norm_ema), 6)  # bias-corrected: the first norm itself
        0.04
    """
    norm = jnp.asarray(norm, jnp.float32)
    finite = jnp.isfinite(norm)
    # One float32 decay for the accumulator and its bias correction: with
    # (1 - decay) rounded separately, a decay near 1 biased the EMA (16% low
    # at 0.9999999). expm1/log1p keep 1 - decay**steps exact near 1.
    d = jnp.float32(decay)
    acc = jnp.where(finite, d * state.grad_norm_acc + (1.0 - d) * norm, state.grad_norm_acc)
    steps = increment_if(state.grad_norm_steps, finite)
    correction = -jnp.expm1(steps.astype(jnp.float32) * jnp.log1p(-(1.0 - d)))
    ema = jnp.where(steps > 0, acc / jnp.maximum(correction, 1e-30), 0.0)
    return GradNormState(
        grad_norm_ema=ema,
        grad_norm_acc=acc,
        grad_norm_steps=steps,
        last_grad_norm=jnp.where(finite, norm, state.last_grad_norm),
        nonfinite_grad_count=increment_if(state.nonfinite_grad_count, ~finite),
    )
