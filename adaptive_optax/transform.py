"""``plateau_escape``: the transformation that joins detector, policy and optimizer.

Data path of one ``update(grads, state, params, value=monitor)``:

1. the global norm of the incoming gradients folds into the EMA
   (:mod:`adaptive_optax.grad_norm`); non-finite gradients are counted;
2. ``value`` feeds the windowed plateau detector (:mod:`adaptive_optax.plateau`);
3. if a rollback guard is on and the window is worse than the best before the
   last intervention, the step restores the snapshot
   (:mod:`adaptive_optax.rollback`);
4. on a plateau, below ``max_interventions``, the policy
   (:mod:`adaptive_optax.policy`) picks a boost, a loss mix and a reset;
5. the effective learning rate ``base_schedule(step) * multiplier``
   (:mod:`adaptive_optax.boost`), capped by ``max_learning_rate``, is injected
   into the inner optimizer's ``hyperparams["learning_rate"]``
   (``optax.inject_hyperparams``), which computes the updates.

Every decision is a ``jnp.where`` on scalars or an elementwise select that XLA
fuses into the optimizer's own loops, no Python branch on an array, no host
transfer. The one ``lax.cond`` (skipping the inner update on non-finite
gradients) is used on CPU only, where its predicate is host memory already; on
GPU/TPU, where a conditional's predicate goes through the host, the same skip
is a select (:func:`update_unless_skipped`). An intervention changes array
values only, so a training run compiles once. The state's scalars are stored
packed into two vectors (:mod:`adaptive_optax.state`); the update reads and
writes them as records.
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
from adaptive_optax.boost import boost_multiplier
from adaptive_optax.grad_norm import global_norm, init_grad_norm, update_grad_norm
from adaptive_optax.inner_optimizer import (
    as_schedule,
    inject_learning_rate,
    unexpected_keywords_error,
    with_learning_rate,
)
from adaptive_optax.plateau import PlateauDetector
from adaptive_optax.policy import InterventionPolicy, InterventionState
from adaptive_optax.rollback import RollbackGuard, RollbackState
from adaptive_optax.state import PlateauEscapeState

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
    rollback: RollbackGuard | None = DEFAULT_GUARD,
    skip_nonfinite_updates: bool = True,
    optimizer_kwargs: Mapping[str, Any] | None = None,
) -> optax.GradientTransformationExtraArgs:
    """An optimizer that escapes loss plateaus by adaptive interventions.

    Wraps ``optimizer`` (a factory taking ``learning_rate``, such as
    ``optax.adam``) and drives its learning rate. The optimizer's own
    arguments go in ``optimizer_kwargs`` (or a ``functools.partial`` of the
    factory), apart from these options: ``seed`` seeds the mix plan, while
    ``optimizer_kwargs={"seed": 1}`` seeds ``optax.noisy_sgd``'s noise.
    Call ``update`` with the monitored value:
    ``tx.update(grads, state, params, value=loss)``
    (``flax.nnx.Optimizer.update(model, grads, value=loss)`` forwards it).

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
        policy: Boosts, mixes and resets; default :func:`adaptive_policy`.
        grad_norm_decay: Decay of the gradient-norm EMA, in ``[0, 1)``.
        boost_warmup_steps: Linear ramp into each boost (>= 0 steps); ``None``
            (default): one window, ``accumulation_steps``. ``0`` is the seed's
            immediate boost.
        boost_decay_steps: ``None`` holds each boost until the next
            intervention; an int >= 1 decays it linearly back to the base.
        max_learning_rate: Optional cap on the effective learning rate (> 0).
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

    Returns:
        An ``optax.GradientTransformationExtraArgs`` whose state is a
        :class:`PlateauEscapeState`.

    Raises:
        ValueError: On an invalid argument; the message names it and its range.
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
    if max_learning_rate is not None:
        max_learning_rate = check_float("max_learning_rate", max_learning_rate, low=0.0,
                                        high=math.inf, low_open=True, high_open=True)
    skip_nonfinite_updates = check_bool("skip_nonfinite_updates", skip_nonfinite_updates)
    if policy is None:
        policy = InterventionPolicy()
    elif not isinstance(policy, InterventionPolicy):
        raise TypeError(f"policy must be an InterventionPolicy, got {type(policy).__name__}.")
    if rollback is not None and not isinstance(rollback, RollbackGuard):
        raise TypeError(f"rollback must be a RollbackGuard or None, got {type(rollback).__name__}.")
    schedule = as_schedule(learning_rate)
    inner = inject_learning_rate(optimizer, optimizer_kwargs)
    may_reset = bool(policy.plan(max_interventions)[3].any() and max_interventions > 0) or bool(
        rollback is not None and rollback.reset_optimizer)
    track_norm = policy.use_grad_norm or skip_nonfinite_updates
    restores = rollback is not None and rollback.restore_params

    def effective_lr(base: jax.Array, multiplier: jax.Array) -> jax.Array:
        lr = base * multiplier
        return lr if max_learning_rate is None else jnp.minimum(lr, max_learning_rate)

    def init_fn(params) -> PlateauEscapeState:
        base = jnp.asarray(schedule(jnp.zeros([], jnp.int32)), jnp.float32)
        inner_state = _unaliased(inner.init(params), params)
        inner_state = with_learning_rate(inner_state, effective_lr(base, jnp.ones([], jnp.float32)))
        # The key and the plan depend on the seed and the policy only: computed
        # op by op even inside jax.jit(init), they enter its program as
        # constants, so its compile time does not grow with max_interventions
        # (staged, the draws unroll into the program; docs/design.md, item 17).
        with jax.ensure_compile_time_eval():
            key = jax.random.PRNGKey(seed & 0xFFFFFFFF)
            if seed >> 32:  # without x64, PRNGKey would drop the high word of the seed
                key = jax.random.fold_in(key, seed >> 32)
            if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
                key = jax.random.key_data(key)
            planned_mix_index = policy.plan_mixes(key, max_interventions)
        intervention = InterventionState(
            intervention_count=jnp.zeros([], jnp.int32),
            lr_multiplier=jnp.ones([], jnp.float32),
            boost_from=jnp.ones([], jnp.float32),
            boost_to=jnp.ones([], jnp.float32),
            boost_step=jnp.full([], -1, jnp.int32),
            mix_index=jnp.asarray(policy.initial_index, jnp.int32),
            planned_mix_index=planned_mix_index,
            rng_key=key,
            conservatism=jnp.ones([], jnp.float32),
            force_final_mix=jnp.zeros([], jnp.bool_),
        )
        return PlateauEscapeState.from_records(
            step=jnp.zeros([], jnp.int32),
            base_learning_rate=base,
            plateau=detector.init(),
            grad_norm=init_grad_norm(),
            intervention=intervention,
            rollback=(optax.EmptyState() if rollback is None
                      else rollback.init(params, policy.initial_index)),
            loss_weights=policy.weights(intervention.mix_index),
            optimizer_state=inner_state,
        )

    def update_fn(updates, state: PlateauEscapeState, params=None, *, value=None, **extra_args):
        if value is None:
            raise ValueError(
                "plateau_escape needs the monitored value: call "
                "tx.update(grads, state, params, value=loss) "
                "(flax: optimizer.update(model, grads, value=loss)).")
        value = jnp.asarray(value)
        if value.shape != ():
            raise ValueError(f"value must be a scalar, got shape {value.shape}; reduce it "
                             "(e.g. with jnp.mean) before passing it.")
        if params is None and (may_reset or restores):
            raise ValueError("plateau_escape with an optimizer reset or a rollback guard that "
                             "restores parameters needs params: call "
                             "tx.update(grads, state, params, value=...).")

        # The records are views of the packed vectors: XLA fuses their slices
        # into the ops that read them.
        step = state.step
        grad_state = state.grad_norm
        grads_finite = jnp.ones([], jnp.bool_)
        if track_norm:
            norm = global_norm(updates)
            grads_finite = jnp.isfinite(norm)
            grad_state = update_grad_norm(grad_state, norm, grad_norm_decay)

        # A step whose update is skipped must not feed the detector: its loss
        # repeats the frozen model's, which would look like a plateau.
        monitored = jnp.where(grads_finite, value, jnp.nan) if skip_nonfinite_updates else value
        plateau_state, event = detector.update(state.plateau, monitored)
        old = state.intervention
        current_multiplier = boost_multiplier(
            step - old.boost_step, old.boost_from, old.boost_to,
            warmup_steps=boost_warmup_steps, decay_steps=boost_decay_steps)

        guard_state = state.rollback
        rolled_back = jnp.zeros([], jnp.bool_)
        limit = old.intervention_count >= max_interventions
        if rollback is not None:
            watching = guard_state.guard_windows_left > 0
            probe_sum, probe_count = rollback.probe(guard_state, monitored, watching)
            rolled_back = watching & rollback.fails(guard_state, plateau_state, event, detector,
                                                    probe_sum, probe_count)
            if rollback.stop_after_rollback:
                limit = limit | (guard_state.rollback_count > 0) | rolled_back
        intervene = event.plateau & ~limit & ~rolled_back
        decision = policy.decide(old, grad_state.grad_norm_ema, max_interventions)

        def pick(on_intervene, on_rollback, keep):
            return jnp.where(intervene, on_intervene, jnp.where(rolled_back, on_rollback, keep))

        if rollback is not None:
            # A rollback puts back the boost in force before the intervention,
            # ramp or decay included, as if the intervention had not happened.
            snap_from, snap_to = guard_state.snapshot_boost_from, guard_state.snapshot_boost_to
            snap_step, snap_mix = guard_state.snapshot_boost_step, guard_state.snapshot_mix_index
            shrink = rollback.shrink
        else:  # never rolled back: any values of the right type
            snap_from, snap_to, snap_step = old.boost_from, old.boost_to, old.boost_step
            snap_mix, shrink = old.mix_index, 1.0
        new = InterventionState(
            intervention_count=old.intervention_count + intervene.astype(jnp.int32),
            lr_multiplier=old.lr_multiplier,  # set below
            boost_from=pick(current_multiplier, snap_from, old.boost_from),
            boost_to=pick(decision.boost, snap_to, old.boost_to),
            boost_step=pick(step, snap_step, old.boost_step),
            mix_index=pick(decision.mix_index, snap_mix, old.mix_index),
            planned_mix_index=old.planned_mix_index,
            rng_key=old.rng_key,
            conservatism=jnp.where(rolled_back, old.conservatism * shrink, old.conservatism),
            force_final_mix=pick(False, True, old.force_final_mix),
        )
        multiplier = boost_multiplier(
            step - new.boost_step, new.boost_from, new.boost_to,
            warmup_steps=boost_warmup_steps, decay_steps=boost_decay_steps)
        new = new._replace(lr_multiplier=multiplier)
        base = jnp.asarray(schedule(step), jnp.float32)
        lr = effective_lr(base, multiplier)

        inner_in = with_learning_rate(state.optimizer_state, lr)
        if may_reset:
            reset = intervene & decision.reset
            init_params = params
            if rollback is not None and rollback.reset_optimizer:
                reset = reset | rolled_back
            if restores and rollback.reset_optimizer:
                # A rollback returns the model to the snapshot; an optimizer whose
                # state holds parameter values (schedule-free's z) must start there,
                # or its next step moves the model back. XLA drops this select for
                # optimizers whose init reads only shapes (Adam, SGD).
                init_params = jax.tree.map(
                    lambda s, p: jnp.where(rolled_back, s.astype(p.dtype), p),
                    guard_state.snapshot_params, params)
            fresh = inner.init(init_params)
            fresh = fresh._replace(hyperparams=inner_in.hyperparams)
            inner_in = optax.tree.where(reset, fresh, inner_in)

        def inner_update():
            return inner.update(updates, inner_in, params, value=value, **extra_args)

        if skip_nonfinite_updates or restores:
            keep = (~rolled_back if restores else True) & (
                grads_finite if skip_nonfinite_updates else True)
            inner_updates, inner_out = update_unless_skipped(keep, inner_update, inner_in)
        else:
            inner_updates, inner_out = inner_update()

        rollback_state = guard_state
        if rollback is not None:
            # A branch that passes the old snapshot through lets XLA:CPU write a
            # new one in place; a select over all parameters, with the restore
            # reading the old snapshot, makes it copy params and snapshot every
            # step (2 parameter copies). On GPU/TPU `_either` is that select.
            snapshot = guard_state.snapshot_params
            if restores:
                snapshot = _either(intervene,
                                   lambda: _typed_like(guard_state.snapshot_params, params),
                                   lambda typed: _typed_like(typed, guard_state.snapshot_params))
                # On a rollback there is no intervention: this is the old snapshot.
                restore = jax.tree.map(lambda s, p: (s - p).astype(p.dtype), snapshot, params)
                inner_updates = optax.tree.where(rolled_back, restore, inner_updates)
            windows_left = jnp.where(event.valid & watching, guard_state.guard_windows_left - 1,
                                     guard_state.guard_windows_left)
            rollback_state = RollbackState(
                snapshot_params=snapshot,
                snapshot_boost_from=jnp.where(intervene, old.boost_from,
                                              guard_state.snapshot_boost_from),
                snapshot_boost_to=jnp.where(intervene, old.boost_to,
                                            guard_state.snapshot_boost_to),
                snapshot_boost_step=jnp.where(intervene, old.boost_step,
                                              guard_state.snapshot_boost_step),
                snapshot_mix_index=jnp.where(intervene, old.mix_index,
                                             guard_state.snapshot_mix_index),
                snapshot_value=jnp.where(intervene, plateau_state.best_value,
                                         guard_state.snapshot_value),
                snapshot_sd=jnp.where(intervene, plateau_state.window_sd,
                                      guard_state.snapshot_sd),
                probe_sum=jnp.where(intervene | rolled_back, 0.0, probe_sum),
                probe_count=jnp.where(intervene | rolled_back, 0, probe_count),
                guard_windows_left=jnp.where(
                    intervene, rollback.guard_windows,
                    jnp.where(rolled_back, 0, windows_left)).astype(jnp.int32),
                rollback_count=guard_state.rollback_count + rolled_back.astype(jnp.int32),
            )
            restarted = detector.restart_patience(plateau_state)
            plateau_state = optax.tree.where(rolled_back, restarted, plateau_state)

        new_state = PlateauEscapeState.from_records(
            step=increment_if(step),
            base_learning_rate=base,
            plateau=plateau_state,
            grad_norm=grad_state,
            intervention=new,
            rollback=rollback_state,
            loss_weights=policy.weights(new.mix_index),
            optimizer_state=inner_out,
        )
        return inner_updates, new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def update_unless_skipped(
    keep: jax.Array,
    update: Callable[[], tuple[optax.Updates, optax.OptState]],
    state: optax.OptState,
) -> tuple[optax.Updates, optax.OptState]:
    """``update()`` if ``keep``, else zero updates and ``state`` unchanged (bit-identical).

    Two lowerings of the same semantics, picked per backend when the step is
    compiled (``jax.lax.platform_dependent``):

    * CPU: a ``lax.cond``. The predicate is already in host memory, and the
      optimizer's update runs as it would alone. With selects, XLA:CPU
      recomputes the new moments in two fusions that both read the old ones,
      and copies Adam's ``mu`` and ``nu`` every step to keep their donated
      buffers safe (2 parameter-sized copies; docs/design.md, item 15).
    * GPU/TPU: elementwise selects, which XLA fuses into the moment updates. A
      conditional's predicate would be copied to the host every step.

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
    return _either(keep, update, _skipped(state))


def _skipped(state):
    """The fallback of :func:`update_unless_skipped`: zero updates and ``state``."""
    def fallback(typed):
        new_updates, new_state = typed
        return optax.tree.zeros_like(new_updates), _typed_like(new_state, state)

    return fallback


def _either(keep: jax.Array, taken: Callable[[], Any], fallback: Callable[[Any], Any]) -> Any:
    """``taken()`` if ``keep`` else ``fallback(typed)``: a cond on CPU, selects elsewhere.

    ``typed`` is ``taken()``'s output, for ``fallback`` to type its own by
    (its values must not be used: in the cond they are dead code). See
    :func:`update_unless_skipped` for why the lowering depends on the backend.
    """
    return jax.lax.platform_dependent(
        keep,
        cpu=lambda keep: _either_with_cond(keep, taken, fallback),
        default=lambda keep: _either_with_select(keep, taken, fallback))


def _either_with_cond(keep, taken, fallback):
    # XLA drops the taken() inside the fallback branch as dead code.
    return jax.lax.cond(keep, taken, lambda: fallback(taken()))


def _either_with_select(keep, taken, fallback):
    out = taken()
    return optax.tree.where(keep, out, fallback(out))


def _unaliased(inner_state, params):
    """``inner_state`` with its leaves that *are* parameter arrays copied.

    Optimizers that keep parameter values (prodigy's ``params0``, schedule-free's
    ``z``) return the parameter arrays themselves from ``init``; a train step
    that donates both the parameters and the state would then donate one
    buffer twice, which XLA refuses at the first step.
    """
    ids = {id(p) for p in jax.tree.leaves(params)}
    return jax.tree.map(lambda x: jnp.copy(x) if id(x) in ids else x, inner_state)


def _typed_like(new, old):
    """``old``, typed like ``new`` (dtypes, and the varying axes inside shard_map, which
    cond checks); XLA folds the select away."""
    return jax.tree.map(lambda n, o: jnp.where(False, n, o), new, old)
