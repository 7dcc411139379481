"""Schedule-free optimizers whose averaging ignores plateau-escape boosts.

``optax.contrib.schedule_free_adamw(learning_rate)`` uses its rate twice: as
the step of the ``z`` sequence and, through the running maximum of the rate
raised to ``weight_lr_power`` (2 by default), as the weight of each iterate
in the average ``x`` that is evaluated. Wrapped in
:func:`~adaptive_optax.plateau_escape`, a x5 boost is therefore also a x25
weight on every later iterate, for the rest of the run (the running maximum
never comes back down): within a few dozen steps the iterates after the boost
outweigh all those before it, and the evaluated average follows the noisy
boosted ``z``. On the learning-rate grid that cost a 5.65x jump of the
monitored loss and Dice .25 against schedule-free's .75 (docs/benchmarks.md,
"schedule-free's averaging").

:func:`boost_neutral_schedule_free` builds the same optimizer with the two
uses apart: the injected (boosted) rate drives ``z``'s steps, and the weights
follow the base schedule given here, the rate without any boost. With no
intervention it is optax's optimizer, update for update (tested).

Example:
    >>> import optax
    >>> from adaptive_optax import plateau_escape, presets
    >>> rate = optax.warmup_constant_schedule(0.0, 3e-3, 50)
    >>> tx = plateau_escape(boost_neutral_schedule_free(rate), rate,
    ...                     **presets.recommended_options(33))
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import optax

from adaptive_optax.inner_optimizer import as_schedule

__all__ = ["boost_neutral_schedule_free"]

_VARIANTS = ("adamw", "sgd")


def boost_neutral_schedule_free(
    base_learning_rate: float | optax.Schedule,
    variant: str = "adamw",
) -> Callable[..., optax.GradientTransformationExtraArgs]:
    """A schedule-free optimizer factory for ``plateau_escape`` whose average ignores boosts.

    Args:
        base_learning_rate: The rate without boosts, a float > 0 or the
            schedule given to ``plateau_escape`` as its ``learning_rate``.
            Only its shape matters: it sets the relative weights of the
            averaged iterates, as the rate does in optax's schedule-free.
        variant: ``"adamw"`` (as ``optax.contrib.schedule_free_adamw``) or
            ``"sgd"`` (as ``optax.contrib.schedule_free_sgd``).

    Returns:
        A factory ``(learning_rate, **keywords) -> GradientTransformation``
        taking the variant's keywords (``b1``, ``weight_lr_power``,
        ``weight_decay``, ``state_dtype``; ``b2`` and ``eps`` for adamw; not
        ``warmup_steps``: put a warm-up in ``base_learning_rate``). Its
        ``learning_rate`` (the one ``plateau_escape`` injects) scales the
        steps of ``z`` only.

    Raises:
        ValueError: If ``variant`` is not ``"adamw"`` or ``"sgd"``, or
            ``base_learning_rate`` is a number that is not > 0.
        TypeError: If ``base_learning_rate`` is neither a number nor callable.

    Example:
        >>> import optax
        >>> import jax.numpy as jnp
        >>> from adaptive_optax import plateau_escape
        >>> tx = plateau_escape(boost_neutral_schedule_free(0.1, "sgd"), 0.1)
        >>> state = tx.init({"w": jnp.ones(2)})
    """
    if not isinstance(variant, str) or variant not in _VARIANTS:
        raise ValueError(f"variant must be one of {_VARIANTS}, got variant = {variant!r}.")
    try:
        base = as_schedule(base_learning_rate)
    except (TypeError, ValueError) as err:  # as_schedule names plateau_escape's learning_rate
        raise type(err)(str(err).replace("learning_rate", "base_learning_rate")) from None

    def weight_rate(step_count: jax.Array) -> jax.Array:
        # schedule_free counts its updates from 1; plateau_escape's schedule
        # (and so the rate it injects into update k) counts from 0.
        return base(step_count - 1)

    # optax's schedule_free_{adamw,sgd} pass one rate to both the base
    # optimizer and the averaging; these build the same base optimizers
    # (copied from optax, checked against it update for update in
    # tests/test_schedule_free.py) and give the averaging its own rate.
    if variant == "adamw":
        def schedule_free_adamw(learning_rate, *, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0,
                                weight_lr_power=2.0, state_dtype=None):
            steps = optax.chain(
                optax.scale_by_rms(decay=b2, eps=eps, eps_in_sqrt=False, bias_correction=True),
                optax.add_decayed_weights(weight_decay),
                optax.scale_by_learning_rate(learning_rate))
            return optax.contrib.schedule_free(steps, learning_rate=weight_rate, b1=b1,
                                               weight_lr_power=weight_lr_power,
                                               state_dtype=state_dtype)
        return schedule_free_adamw

    def schedule_free_sgd(learning_rate, *, b1=0.9, weight_decay=None, weight_lr_power=2.0,
                          state_dtype=None):
        steps = optax.sgd(learning_rate)
        if weight_decay is not None:
            steps = optax.chain(optax.add_decayed_weights(weight_decay), steps)
        return optax.contrib.schedule_free(steps, learning_rate=weight_rate, b1=b1,
                                           weight_lr_power=weight_lr_power,
                                           state_dtype=state_dtype)
    return schedule_free_sgd
