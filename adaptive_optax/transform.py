"""``plateau_escape``: the transformation that joins detector, guard, policy and optimizer.

``update_fn`` is the wiring of one ``update(grads, state, params, value=monitor)``;
each part owns its record and its transition:

1. the global norm of the gradients folds into the EMA
   (:mod:`adaptive_optax.grad_norm`); a step with non-finite gradients is
   skipped, and its value is not monitored;
2. ``value`` feeds the windowed plateau detector (:mod:`adaptive_optax.plateau`);
3. the rollback guard (:mod:`adaptive_optax.rollback`; :data:`~adaptive_optax.rollback.NO_GUARD`
   without one) checks the intervention under watch and gives a verdict;
4. on a plateau, below ``max_interventions`` and unless the guard forbids it,
   the policy (:mod:`adaptive_optax.policy`) applies its decision: a boost, a
   loss mix, maybe an optimizer reset; with a lookahead
   (:mod:`adaptive_optax.lookahead`; :data:`~adaptive_optax.lookahead.NO_LOOKAHEAD`
   without one) the boost and mix are those of the candidate that did best
   in a few trial steps, and a lookahead with an early trial may also
   intervene without a plateau, on a slow start that a boost wins;
   on a rollback, the guard reverts them;
5. the effective learning rate ``base_schedule(step) * multiplier`` (the
   boost's ramp, :mod:`adaptive_optax.boost`), capped by
   ``max_learning_rate``, is injected into the inner optimizer's
   ``hyperparams["learning_rate"]`` (``optax.inject_hyperparams``), which
   computes the updates (:mod:`adaptive_optax.inner_optimizer`);
6. the guard writes its next snapshot (and, restoring, the restoring update).

Every decision is a ``jnp.where`` on scalars or an elementwise select that XLA
fuses into the optimizer's own loops: no Python branch on an array, no host
transfer. The skips are a ``lax.cond`` on CPU and selects on GPU/TPU
(:mod:`adaptive_optax.conditional`). An intervention changes array values
only, so a training run compiles once. The state's scalars are stored packed
into two vectors (:mod:`adaptive_optax.state`); the update reads and writes
them as records.
"""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax

from adaptive_optax._counters import increment_if
from adaptive_optax._validation import check_bool, check_float, check_int
from adaptive_optax.boost import BoostRamp
from adaptive_optax.boost_limit import update_ratio_limit
from adaptive_optax.conditional import update_unless_skipped
from adaptive_optax.grad_norm import global_norm, init_grad_norm, update_grad_norm
from adaptive_optax.inner_optimizer import (
    as_schedule,
    inject_learning_rate,
    reset_where,
    unaliased,
    unexpected_keywords_error,
    with_learning_rate,
)
from adaptive_optax.lookahead import NO_LOOKAHEAD, Lookahead
from adaptive_optax.plateau import PlateauDetector
from adaptive_optax.policy import InterventionPolicy
from adaptive_optax.rollback import NO_GUARD, RollbackGuard
from adaptive_optax.state import PlateauEscapeState

__all__ = ["MAX_INTERVENTIONS_BOUND", "plateau_escape"]

# Bound on max_interventions: the per-intervention plan is an array of this length in the state.
MAX_INTERVENTIONS_BOUND = 10_000
# The default guard: a boost that makes the monitored value worse is reverted
# (rate and mix) within steps, without a parameter copy. See docs/design.md
# ("First, do no harm") for why the seed's unguarded boosts are not the default.
DEFAULT_GUARD = RollbackGuard(restore_params=False)


def _optimizer_keywords_apart(function):
    """``function``, whose unknown keywords raise a TypeError that points to ``optimizer_kwargs``.

    Python's own error would only say the keyword is unexpected; the one
    unknown keyword most callers pass is an optimizer's own (``b1=0.95``).
    """
    parameters = inspect.signature(function).parameters

    @functools.wraps(function)
    def checked(*args, **kwargs):
        unexpected = {k: v for k, v in kwargs.items() if k not in parameters}
        if unexpected:
            optimizer = args[0] if args else kwargs.get("optimizer")
            raise unexpected_keywords_error(function.__name__, unexpected, optimizer, parameters)
        return function(*args, **kwargs)

    return checked


@_optimizer_keywords_apart
def plateau_escape(
    optimizer: Callable[..., optax.GradientTransformation],
    learning_rate: float | optax.Schedule,
    *,
    patience: int = 2,
    accumulation_steps: int = 1,
    cooldown: int = 0,
    mode: str = "min",
    rtol: float = 1e-4,
    atol: float = 0.0,
    max_interventions: int = 3,
    seed: int = 0,
    policy: InterventionPolicy | None = None,
    grad_norm_decay: float = 0.9,
    boost_warmup_steps: int | None = None,
    boost_decay_steps: int | None = None,
    max_learning_rate: float | None = None,
    max_update_ratio: float | None = None,
    rollback: RollbackGuard | None = DEFAULT_GUARD,
    skip_nonfinite_updates: bool = True,
    optimizer_kwargs: Mapping[str, Any] | None = None,
    lookahead: Lookahead | None = None,
) -> optax.GradientTransformationExtraArgs:
    """An optimizer that escapes loss plateaus by adaptive interventions.

    Wraps ``optimizer`` (a factory taking ``learning_rate``, such as
    ``optax.adam``) and drives its learning rate. The optimizer's own
    arguments go in ``optimizer_kwargs`` (or a ``functools.partial`` of the
    factory), apart from these options: ``seed`` seeds the mix plan, while
    ``optimizer_kwargs={"seed": 1}`` seeds ``optax.noisy_sgd``'s noise.
    Call ``update`` with the monitored value:
    ``tx.update(grads, state, params, value=loss)``
    (``flax.nnx.Optimizer.update(model, grads, value=loss)`` forwards it);
    with a ``lookahead``, also with
    ``value_fn(params, loss_weights) -> (loss_to_optimise, monitored_value)``
    on the probe batch, as optax's line searches take theirs:
    ``tx.update(grads, state, params, value=loss, value_fn=value_fn)``.

    Args:
        optimizer: Optax optimizer factory with a ``learning_rate`` argument,
            or a ``functools.partial`` of one binding other arguments
            (``functools.partial(optax.adam, b1=0.95)``), not the rate.
        learning_rate: Base learning rate, a float > 0 or an ``optax.Schedule``.
        patience: Non-improving windows tolerated before a plateau (>= 0).
        accumulation_steps: Steps averaged into one window (>= 1), e.g. an epoch.
        cooldown: Windows after an intervention with no plateau counted (>= 0).
        mode: ``"min"`` (a loss) or ``"max"`` (a score such as Dice).
        rtol: Relative improvement threshold in ``[0, 1)``.
        atol: Absolute improvement threshold ``>= 0``.
        max_interventions: Cap on interventions (>= 0; 0 only monitors).
        seed: Seed of the PRNG key kept in the state for random mix picks
            (an optimizer's own seed goes in ``optimizer_kwargs``).
        policy: Boosts, optional loss mixes and resets; default
            ``InterventionPolicy()``: the seed's boosts, no mixes (``loss_weights`` is ``{}``;
            the seed's mixes: ``adaptive_optax.segmentation.adaptive_mix_policy()``).
        grad_norm_decay: Decay of the gradient-norm EMA, in ``[0, 1)``.
        boost_warmup_steps: Linear ramp into each boost (>= 0 steps); ``None``
            (default): one window, ``accumulation_steps``. ``0`` is the seed's
            immediate boost.
        boost_decay_steps: ``None`` holds each boost until the next
            intervention; an int >= 1 decays it linearly back to the base.
        max_learning_rate: Optional cap on the effective learning rate (> 0).
        max_update_ratio: ``None`` (default), or a bound > 0 on each boost
            from the size of the step it scales: the boost stays below
            ``max(1, max_update_ratio * ||params|| / ||u||)``, ``u`` the
            inner optimizer's update at the bare base rate on the
            intervention's step (one extra inner update on that step only;
            :mod:`adaptive_optax.boost_limit`). A run whose steps are already
            large against its weights, near its stability limit, is not
            boosted; a lookahead's candidates are capped alike. ``update``
            then needs ``params``.
        rollback: The :class:`RollbackGuard` that undoes a boost which makes
            the monitored value worse. Default ``RollbackGuard(restore_params=False)``:
            reverts the rate and mix within steps, no parameter copy;
            ``RollbackGuard()`` also restores the parameters (one copy);
            ``None``: no guard (the seed's behaviour).
        skip_nonfinite_updates: On non-finite gradients, return zero updates,
            keep the inner optimizer state, skip the step's monitored value,
            and count the step in ``nonfinite_grad_count``. The test is on
            the global norm (one reduction, already computed for the EMA), so
            finite gradients whose norm overflows float32 (entries ~1e19)
            count as non-finite too: by then the step is diverging anyway.
        optimizer_kwargs: The optimizer's own keyword arguments, e.g.
            ``{"b1": 0.95}`` (they override a partial's); not
            ``learning_rate``, which is injected.
        lookahead: A :class:`~adaptive_optax.lookahead.Lookahead`: at each
            intervention, try its candidate boosts and mixes for a few inner
            steps in-graph and commit the best; ``None`` (default): the
            policy's decision as it is.

    Returns:
        An ``optax.GradientTransformationExtraArgs`` whose state is a
        :class:`PlateauEscapeState`.

    Raises:
        ValueError: On an invalid argument; the message names it and its range.
            ``update`` raises one when a lookahead is on and ``params`` or
            ``value_fn`` is missing.
        TypeError: If ``optimizer`` is not a factory taking ``learning_rate``,
            ``learning_rate`` is bound in it or given in ``optimizer_kwargs``,
            a keyword of ``optimizer_kwargs`` does not fit the optimizer, or
            an unknown keyword is passed here (the message shows how to pass
            it to the optimizer: ``optimizer_kwargs={"b1": 0.95}``).

    Example:
        >>> import optax, jax.numpy as jnp
        >>> tx = plateau_escape(optax.adam, 1e-3, patience=1, accumulation_steps=10,
        ...                     optimizer_kwargs={"b1": 0.95})
        >>> params = {"w": jnp.ones(3)}
        >>> state = tx.init(params)
        >>> updates, state = tx.update({"w": jnp.ones(3)}, state, params, value=0.5)
        >>> float(optax.tree.get(state, "learning_rate"))
        0.001...
    """
    detector = PlateauDetector(patience=patience, accumulation_steps=accumulation_steps,
                               cooldown=cooldown, mode=mode, rtol=rtol, atol=atol)
    max_interventions = check_int("max_interventions", max_interventions, 0,
                                  maximum=MAX_INTERVENTIONS_BOUND)
    seed = check_int("seed", seed, 0, maximum=2**63 - 1)  # what numpy and the data loaders take
    # Checked in float32 too (check_float): a decay that rounds to 1 would freeze the EMA.
    grad_norm_decay = check_float("grad_norm_decay", grad_norm_decay, low=0.0, high=1.0,
                                  high_open=True)
    if boost_warmup_steps is None:  # one window: the guard sees the rate rise before it peaks
        boost_warmup_steps = detector.accumulation_steps
    boost_warmup_steps = check_int("boost_warmup_steps", boost_warmup_steps, minimum=0)
    if boost_decay_steps is not None:
        boost_decay_steps = check_int("boost_decay_steps", boost_decay_steps, minimum=1)
    ramp = BoostRamp(boost_warmup_steps, boost_decay_steps)
    if max_learning_rate is not None:
        max_learning_rate = check_float("max_learning_rate", max_learning_rate, low=0.0,
                                        high=math.inf, low_open=True, high_open=True)
    if max_update_ratio is not None:
        max_update_ratio = check_float("max_update_ratio", max_update_ratio, low=0.0,
                                       high=math.inf, low_open=True, high_open=True)
    skip_nonfinite_updates = check_bool("skip_nonfinite_updates", skip_nonfinite_updates)
    if policy is None:
        policy = InterventionPolicy()
    elif not isinstance(policy, InterventionPolicy):
        raise TypeError(f"policy must be an InterventionPolicy, got {type(policy).__name__}.")
    if rollback is not None and not isinstance(rollback, RollbackGuard):
        raise TypeError(f"rollback must be a RollbackGuard or None, got {type(rollback).__name__}.")
    guard = NO_GUARD if rollback is None else rollback
    schedule = as_schedule(learning_rate)
    inner = inject_learning_rate(optimizer, optimizer_kwargs)
    if lookahead is not None and not isinstance(lookahead, Lookahead):
        raise TypeError(f"lookahead must be a Lookahead or None, got {type(lookahead).__name__}.")
    lookahead = (NO_LOOKAHEAD if lookahead is None else lookahead).bind(
        policy=policy, optimizer=inner, sign=detector.sign, max_interventions=max_interventions)
    # Static facts of the configuration: each drops a part of the program it never needs.
    may_reset = bool(policy.plan(max_interventions)[3].any() and max_interventions > 0) or (
        guard.reset_optimizer)
    may_skip = skip_nonfinite_updates or guard.restore_params
    track_norm = policy.use_grad_norm or skip_nonfinite_updates

    def effective_lr(base: jax.Array, multiplier: jax.Array) -> jax.Array:
        lr = base * multiplier
        return lr if max_learning_rate is None else jnp.minimum(lr, max_learning_rate)

    def committed_rate(before, step, boost, t, ramped=True):
        """The rate ``t`` steps after committing ``boost`` at ``step`` (what a trial takes).

        ``ramped=False``: the boost at once, as if the warm-up ramp had ended.
        """
        base = jnp.asarray(schedule(step + t), jnp.float32)
        if not ramped:
            return effective_lr(base, boost)
        record = before._replace(boost_from=ramp.multiplier(before, step), boost_to=boost,
                                 boost_step=step)
        return effective_lr(base, ramp.multiplier(record, step + t))

    def boost_limit(needed, updates, inner_state, base, params, value, extra_args):
        """The largest boost allowed on this step (``max_update_ratio``)."""
        bare = with_learning_rate(inner_state, effective_lr(base, jnp.ones([], jnp.float32)))
        step = functools.partial(inner_update, value=value, extra_args=extra_args)
        return update_ratio_limit(needed, max_update_ratio, step, updates, bare, params)

    def capped_rate(rate, limit, boost, t, ramped=True):
        """``rate`` with the boost capped at ``limit`` (what a trial takes)."""
        return rate(jnp.minimum(boost, limit), t, ramped)

    def norm_of(updates, grad_state):
        """The EMA with this step's norm, and whether the step's update is applied."""
        if not track_norm:
            return grad_state, jnp.ones([], jnp.bool_)
        norm = global_norm(updates)
        applied = jnp.isfinite(norm) if skip_nonfinite_updates else jnp.ones([], jnp.bool_)
        return update_grad_norm(grad_state, norm, grad_norm_decay), applied

    def inner_update(updates, inner_state, params, *, value, extra_args):
        return inner.update(updates, inner_state, params, value=value, **extra_args)

    def inner_step(keep, updates, inner_state, params, value, extra_args):
        def step():
            return inner_update(updates, inner_state, params, value=value, extra_args=extra_args)

        return update_unless_skipped(keep, step, inner_state) if may_skip else step()

    def init_fn(params) -> PlateauEscapeState:
        base = jnp.asarray(schedule(jnp.zeros([], jnp.int32)), jnp.float32)
        inner_state = with_learning_rate(unaliased(inner.init(params), params),
                                         effective_lr(base, jnp.ones([], jnp.float32)))
        intervention = policy.init(seed, max_interventions)
        return PlateauEscapeState.from_records(
            step=jnp.zeros([], jnp.int32), base_learning_rate=base, plateau=detector.init(),
            grad_norm=init_grad_norm(), intervention=intervention,
            rollback=guard.init(params, policy.initial_index),
            loss_weights=policy.weights(intervention.mix_index), optimizer_state=inner_state,
            lookahead=lookahead.init())

    def update_fn(updates, state: PlateauEscapeState, params=None, *, value=None, value_fn=None,
                  **extra_args):
        value = _monitored_value(value)
        extra_args = lookahead.inner_args(params, value_fn, extra_args)
        if params is None and (may_reset or guard.restore_params
                               or max_update_ratio is not None):
            raise ValueError("plateau_escape with an optimizer reset, a rollback guard that "
                             "restores parameters or max_update_ratio needs params: call "
                             "tx.update(grads, state, params, value=...).")
        # The records are views of the packed vectors: XLA fuses their slices
        # into the ops that read them.
        step, before, guard_state = state.step, state.intervention, state.rollback
        grad_state, applied = norm_of(updates, state.grad_norm)
        # A skipped step's loss repeats the frozen model's: it must not look like a plateau.
        monitored = jnp.where(applied, value, jnp.nan)
        plateau, event = detector.update(state.plateau, monitored)
        verdict = guard.check(guard_state, plateau, event, detector, monitored)
        allowed = ((before.intervention_count < max_interventions)
                   & guard.permits(guard_state, verdict))
        intervene = event.plateau & allowed
        # A slow start may be tried without a plateau; commit says whether a boost won it.
        early = lookahead.early_trial(event, state.plateau, plateau, before) & allowed & ~intervene
        decision = policy.decide(before, grad_state.grad_norm_ema, max_interventions)
        multiplier_now = ramp.multiplier(before, step)
        base = jnp.asarray(schedule(step), jnp.float32)
        rate = functools.partial(committed_rate, before, step)
        if max_update_ratio is not None:
            limit = boost_limit(intervene | early, updates, state.optimizer_state, base,
                                params, value, extra_args)
            decision = decision._replace(boost=jnp.minimum(decision.boost, limit))
            rate = functools.partial(capped_rate, rate, limit)
        decision, trial_record, commit = lookahead.choose(
            intervene, decision, state.lookahead, before=before,
            grad_norm=grad_state.grad_norm_ema, multiplier=multiplier_now, params=params,
            optimizer_state=state.optimizer_state, value_fn=value_fn, extra_args=extra_args,
            rate=rate, early=early)
        if max_update_ratio is not None:  # a candidate past the limit was tried at it
            decision = decision._replace(boost=jnp.minimum(decision.boost, limit))
        after = policy.apply(before, decision, commit, step, multiplier_now)
        after = guard.revert(after, guard_state, verdict)
        after = after._replace(lr_multiplier=ramp.multiplier(after, step))

        inner_state = with_learning_rate(state.optimizer_state,
                                         effective_lr(base, after.lr_multiplier))
        if may_reset:
            reset = (commit & decision.reset) | (verdict.rolled_back & guard.reset_optimizer)
            inner_state = reset_where(inner, inner_state, reset,
                                      guard.reset_params(guard_state, params, verdict))
        keep = applied & guard.keeps_update(verdict)
        inner_updates, inner_state = inner_step(keep, updates, inner_state, params, value,
                                                extra_args)
        inner_updates, guard_state = guard.update(guard_state, verdict, commit, before,
                                                  plateau, event, params, inner_updates)
        # A rollback restarts the detector's patience at the restored point.
        plateau = optax.tree.where(verdict.rolled_back, detector.restart_patience(plateau),
                                   plateau)
        return inner_updates, PlateauEscapeState.from_records(
            step=increment_if(step), base_learning_rate=base, plateau=plateau,
            grad_norm=grad_state, intervention=after, rollback=guard_state,
            loss_weights=policy.weights(after.mix_index), optimizer_state=inner_state,
            lookahead=trial_record)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _monitored_value(value) -> jax.Array:
    """The ``value=`` of an update as a scalar array, with a clear error if missing or not one."""
    if value is None:
        raise ValueError(
            "plateau_escape needs the monitored value: call "
            "tx.update(grads, state, params, value=loss) "
            "(flax: optimizer.update(model, grads, value=loss)).")
    value = jnp.asarray(value)
    if value.shape != ():
        raise ValueError(f"value must be a scalar, got shape {value.shape}; reduce it "
                         "(e.g. with jnp.mean) before passing it.")
    return value
