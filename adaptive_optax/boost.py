"""How a boost plays out over time: optional warm-up ramp, then hold or decay.

The effective learning rate is ``base_schedule(step) * multiplier`` with the
multiplier a function of the steps since the latest intervention ``t``:

* warm-up (``warmup_steps = W > 0``): linear from the multiplier in force
  just before the intervention to the boost, reaching it at ``t = W``. The
  ramp starts from the old rate, not from 0, so the learning rate never drops
  at a boost (a lookahead's cut, a boost below 1, ramps down the same way).
  Recommended with an optimizer reset: a fresh Adam state at a high rate is
  the classic loss-spike recipe.
* then hold (``decay_steps=None``): the boost stays until the next
  intervention; or decay: linear from the boost back to 1 (the bare base
  schedule) over ``decay_steps`` steps.

Boosts are always relative to the base schedule, never compounded; a
lookahead's cut (:class:`~adaptive_optax.lookahead.Candidate` ``cut``) is
taken of the multiplier in force, so cuts compound, and with ``decay_steps``
a cut relaxes back to the base schedule like a boost.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

__all__ = ["BoostRamp", "boost_multiplier"]


def boost_multiplier(
    steps_since: jax.Array,
    boost_from: jax.Array,
    boost_to: jax.Array,
    *,
    warmup_steps: int = 0,
    decay_steps: int | None = None,
) -> jax.Array:
    """The learning-rate multiplier ``t = steps_since`` steps after an intervention.

    Args:
        steps_since: Steps since the intervention (0 on its own step).
        boost_from: The multiplier just before the intervention.
        boost_to: The intervention's boost.
        warmup_steps: Length of the linear ramp from ``boost_from`` to ``boost_to``.
        decay_steps: If set, length of the linear decay from ``boost_to`` to 1
            after the ramp; if ``None`` the boost is held.

    Returns:
        A float32 scalar multiplier.

    Example:
        >>> float(boost_multiplier(jnp.int32(4), 1.0, 10.0, warmup_steps=4))
        10.0
        >>> float(boost_multiplier(jnp.int32(6), 1.0, 10.0, warmup_steps=4, decay_steps=4))
        5.5
    """
    t = jnp.asarray(steps_since, jnp.float32)
    boost_from = jnp.asarray(boost_from, jnp.float32)
    boost_to = jnp.asarray(boost_to, jnp.float32)
    if warmup_steps > 0:
        ramp = jnp.clip((t + 1.0) / (warmup_steps + 1.0), 0.0, 1.0)
        multiplier = boost_from + (boost_to - boost_from) * ramp
    else:
        multiplier = boost_to
    if decay_steps is not None:
        fall = jnp.clip((t - warmup_steps) / float(decay_steps), 0.0, 1.0)
        multiplier = jnp.where(t < warmup_steps, multiplier, boost_to + (1.0 - boost_to) * fall)
    return multiplier


@dataclasses.dataclass(frozen=True)
class BoostRamp:
    """The ramp of :func:`boost_multiplier`, read off an intervention record.

    Args:
        warmup_steps: Length of the ramp into each boost (>= 0).
        decay_steps: Length of the decay back to 1, or ``None`` to hold.

    Example:
        >>> from adaptive_optax.policy import InterventionPolicy
        >>> record = InterventionPolicy().init(0, 3)._replace(boost_to=jnp.float32(4.0),
        ...                                                   boost_step=jnp.int32(0))
        >>> float(BoostRamp(warmup_steps=3).multiplier(record, jnp.int32(3)))
        4.0
    """

    warmup_steps: int = 0
    decay_steps: int | None = None

    def multiplier(self, intervention, step: jax.Array) -> jax.Array:
        """The multiplier at ``step`` of the boost recorded in ``intervention``
        (an :class:`~adaptive_optax.policy.InterventionState`)."""
        return boost_multiplier(step - intervention.boost_step, intervention.boost_from,
                                intervention.boost_to, warmup_steps=self.warmup_steps,
                                decay_steps=self.decay_steps)
