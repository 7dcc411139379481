"""The rollback guard: undo an intervention that made things worse.

The seed's own failure was a loss jump from 0.32 to 0.65 right after an
intervention. With a guard, each intervention first snapshots the parameters,
the boost in force (its ramp or decay: start, target and step) and the loss
mix. For the next ``guard_windows``
valid windows, a window mean worse than the pre-intervention best by more than
``rtol * |best| + atol`` triggers a rollback, and so does a watched window
with no finite value at all (``rollback_on_nonfinite``: a boost that made the
run diverge to NaN/Inf at once leaves no finite mean to compare, and with
``skip_nonfinite_updates`` every later step would be skipped, freezing the
model where the boost took it): the update returned on that step
moves the parameters back to the snapshot (up to float rounding: the update is
``snapshot - params``, added by ``optax.apply_updates``), the multiplier and
mix are restored, and later interventions become more conservative (every
later boost shrinks towards 1 by ``shrink`` per rollback, and the next
intervention uses the final, balanced mix; the ones after it follow the plan
again) or stop altogether (``stop_after_rollback``).

Besides the windows, every watched step is checked (:meth:`RollbackGuard.step_worse`):
the running mean since the intervention against the best before it, so a boost
that blows up is undone within steps.

The guard owns its transitions: :meth:`RollbackGuard.check` gives the step's
:class:`Verdict`, :meth:`~RollbackGuard.revert` puts the intervention record
back on a rollback, and :meth:`~RollbackGuard.update` writes the next snapshot
and counters (and, when it restores, the restoring update). Without a guard,
:data:`NO_GUARD` (a :class:`NoGuard`) answers the same calls with "no
rollback", so the update has no branch for it.

Memory: one copy of the parameters, in their own dtype (none with
``restore_params=False``, which reverts only the rate and the mix). The inner optimizer
state is not snapshotted (that would cost Adam two more copies); it can be
re-initialised on rollback with ``reset_optimizer``. Per step, the snapshot
is rewritten only when the step intervenes on CPU (a ``lax.cond``), and by
a select fused into the update loops on GPU/TPU.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from adaptive_optax._validation import check_bool, check_float, check_int
from adaptive_optax.conditional import either, typed_like

__all__ = ["NO_GUARD", "NoGuard", "NoSnapshot", "RollbackGuard", "RollbackState", "Verdict"]


class NoSnapshot(NamedTuple):
    """The snapshot of a guard with ``restore_params=False``: no parameter copy."""


class RollbackState(NamedTuple):
    """The snapshot and the guard's counters."""

    snapshot_params: Any  # pytree like params: the parameters before the intervention
    # The boost in force before the intervention (see boost.boost_multiplier): a
    # rollback resumes its ramp or decay where it would be without the intervention.
    snapshot_boost_from: jax.Array  # float32 []
    snapshot_boost_to: jax.Array  # float32 []
    snapshot_boost_step: jax.Array  # int32 []
    snapshot_mix_index: jax.Array  # int32 [], mix before the intervention
    snapshot_value: jax.Array  # float32 [], best monitored value before it
    snapshot_sd: jax.Array  # float32 [], spread of the per-step values in the window that fired
    probe_sum: jax.Array  # float32 [], sum of (value - snapshot_value) over watched steps
    probe_count: jax.Array  # int32 [], finite values in probe_sum
    guard_windows_left: jax.Array  # int32 [], windows still watched
    rollback_count: jax.Array  # int32 [], rollbacks so far


class Verdict(NamedTuple):
    """What the guard found on one step (:meth:`RollbackGuard.check`)."""

    rolled_back: jax.Array  # bool [], the intervention under watch is undone on this step
    watching: jax.Array  # bool [], an intervention was under watch before this step
    probe_sum: jax.Array  # float32 [], RollbackState.probe_sum after this step
    probe_count: jax.Array  # int32 [], RollbackState.probe_count after this step


@dataclasses.dataclass(frozen=True)
class RollbackGuard:
    """Configuration of the rollback guard.

    ``plateau_escape`` uses ``RollbackGuard(restore_params=False)`` unless given
    another guard or ``rollback=None``.

    Args:
        guard_windows: Valid windows after an intervention that are watched (>= 1).
        rtol: Relative worsening tolerated, ``>= 0``.
        atol: Absolute worsening tolerated, ``>= 0``.
        shrink: Factor in ``[0, 1]`` on ``boost - 1`` of later interventions,
            per rollback. Boosts are relative to the base schedule, so 0 makes
            their boost 1: they set the rate to the bare base schedule (lower
            than a boost still in force) and change the loss mix.
        stop_after_rollback: Make no further interventions after a rollback.
        reset_optimizer: Re-initialise the inner optimizer on rollback (its
            ``init`` gets the restored parameters).
        rollback_on_nonfinite: A watched window whose monitored values were
            all NaN/Inf (or whose mean overflows float32) also triggers a
            rollback. With ``skip_nonfinite_updates`` a step with non-finite
            gradients has its value skipped too, so such a window may have had
            finite losses: with ``accumulation_steps=1`` one batch of NaN
            gradients right after an intervention rolls it back. ``False`` ignores such windows, as outside the watch
            (for data with whole windows of NaN that are not the model's
            doing). Restoring needs finite parameters: updates are added, so
            with ``skip_nonfinite_updates=False`` NaN parameters stay NaN.
        abort_z: The per-step check (:meth:`step_worse`): from the
            intervention on, the running mean of the monitored values must
            not exceed the pre-intervention best by more than the window
            margin plus ``abort_z`` standard errors. ``None`` turns it off.
        restore_params: Restore the parameters on a rollback (one parameter
            copy). ``False`` reverts only the rate and the mix: no copy, and
            ``update`` needs no params.
        require_improvement: The last watched window must also *improve* on
            the pre-intervention best (the detector's test): an intervention
            that has not got the run off its plateau by then is undone. This
            is what tells a converged run (a boost makes it no better) from a
            stuck one.

    Raises:
        ValueError: If an argument is out of range; the message names it.

    Example:
        >>> RollbackGuard(guard_windows=2, rtol=0.2).rtol
        0.2
    """

    guard_windows: int = 2
    rtol: float = 0.1
    atol: float = 0.0
    shrink: float = 0.5
    stop_after_rollback: bool = False
    reset_optimizer: bool = False
    rollback_on_nonfinite: bool = True
    abort_z: float | None = 3.0
    restore_params: bool = True
    require_improvement: bool = False

    def __post_init__(self):
        check_int("guard_windows", self.guard_windows, minimum=1)
        check_float("rtol", self.rtol, low=0.0, high=math.inf, high_open=True)
        check_float("atol", self.atol, low=0.0, high=math.inf, high_open=True)
        check_float("shrink", self.shrink, low=0.0, high=1.0)
        check_bool("stop_after_rollback", self.stop_after_rollback)
        check_bool("reset_optimizer", self.reset_optimizer)
        check_bool("rollback_on_nonfinite", self.rollback_on_nonfinite)
        if self.abort_z is not None:
            check_float("abort_z", self.abort_z, low=0.0, high=math.inf, high_open=True)
        check_bool("restore_params", self.restore_params)
        check_bool("require_improvement", self.require_improvement)

    def init(self, params, initial_mix_index: int) -> RollbackState:
        """The guard's state before any intervention."""
        return RollbackState(
            snapshot_params=(jax.tree.map(jnp.array, params) if self.restore_params
                             else NoSnapshot()),
            snapshot_boost_from=jnp.ones([], jnp.float32),
            snapshot_boost_to=jnp.ones([], jnp.float32),
            snapshot_boost_step=jnp.full([], -1, jnp.int32),
            snapshot_mix_index=jnp.asarray(initial_mix_index, jnp.int32),
            snapshot_value=jnp.zeros([], jnp.float32),  # read only while watching
            snapshot_sd=jnp.zeros([], jnp.float32),
            probe_sum=jnp.zeros([], jnp.float32),
            probe_count=jnp.zeros([], jnp.int32),
            guard_windows_left=jnp.zeros([], jnp.int32),
            rollback_count=jnp.zeros([], jnp.int32),
        )

    def check(self, state: RollbackState, plateau, event, detector, value: jax.Array) -> Verdict:
        """This step's verdict on the intervention under watch.

        Args:
            state: The guard's state before this step.
            plateau: The detector's state after this step.
            event: This step's :class:`~adaptive_optax.plateau.WindowEvent`.
            detector: The :class:`~adaptive_optax.plateau.PlateauDetector`.
            value: This step's monitored value (NaN for a skipped step).

        Returns:
            The :class:`Verdict`; ``rolled_back`` is :meth:`fails` while watching.
        """
        watching = state.guard_windows_left > 0
        probe_sum, probe_count = self.probe(state, value, watching)
        rolled_back = watching & self.fails(state, plateau, event, detector, probe_sum,
                                            probe_count)
        return Verdict(rolled_back, watching, probe_sum, probe_count)

    def permits(self, state: RollbackState, verdict: Verdict) -> jax.Array:
        """Whether an intervention may happen on this step: never on a rollback's
        step, and with ``stop_after_rollback`` never after one."""
        allowed = ~verdict.rolled_back
        if self.stop_after_rollback:
            allowed = allowed & (state.rollback_count == 0)
        return allowed

    def revert(self, intervention, state: RollbackState, verdict: Verdict):
        """The intervention record after this step's rollback, if any.

        A rollback puts back the boost in force before the intervention (ramp
        or decay included, as if it had not happened) and its mix, shrinks
        later boosts by ``shrink`` and sends the next intervention to the
        final mix.

        Args:
            intervention: The :class:`~adaptive_optax.policy.InterventionState`
                after this step's policy (unchanged by it on a rollback's step).
            state: The guard's state before this step.
            verdict: This step's :meth:`check`.

        Returns:
            The record, reverted where ``verdict.rolled_back``.
        """
        back = verdict.rolled_back
        return intervention._replace(
            boost_from=jnp.where(back, state.snapshot_boost_from, intervention.boost_from),
            boost_to=jnp.where(back, state.snapshot_boost_to, intervention.boost_to),
            boost_step=jnp.where(back, state.snapshot_boost_step, intervention.boost_step),
            mix_index=jnp.where(back, state.snapshot_mix_index, intervention.mix_index),
            conservatism=jnp.where(back, intervention.conservatism * self.shrink,
                                   intervention.conservatism),
            force_final_mix=intervention.force_final_mix | back,
        )

    def keeps_update(self, verdict: Verdict) -> jax.Array | bool:
        """Whether the inner optimizer steps: not when this step restores the parameters."""
        return ~verdict.rolled_back if self.restore_params else True

    def reset_params(self, state: RollbackState, params, verdict: Verdict):
        """The parameters an optimizer reset starts from: the snapshot on a restoring rollback.

        An optimizer whose state holds parameter values (schedule-free's
        ``z``) must restart where the rollback puts the model, or its next
        step moves the model back. XLA drops the select for optimizers whose
        ``init`` reads only shapes (Adam, SGD).
        """
        if not (self.restore_params and self.reset_optimizer):
            return params
        return jax.tree.map(lambda s, p: jnp.where(verdict.rolled_back, s.astype(p.dtype), p),
                            state.snapshot_params, params)

    def update(self, state: RollbackState, verdict: Verdict, intervene: jax.Array,
               before, plateau, event, params, updates) -> tuple[Any, RollbackState]:
        """The step's updates and the guard's next state.

        An intervention snapshots what it changes (the boost in force, the mix,
        the best value and the window's spread; the parameters when restoring)
        and starts the watch; a rollback ends it, and when restoring replaces
        the updates by ``snapshot - params``.

        Args:
            state: The guard's state before this step.
            verdict: This step's :meth:`check`.
            intervene: bool []: this step intervenes.
            before: The :class:`~adaptive_optax.policy.InterventionState` before this step.
            plateau: The detector's state after this step.
            event: This step's :class:`~adaptive_optax.plateau.WindowEvent`.
            params: The parameters before this step's update.
            updates: The inner optimizer's updates.

        Returns:
            ``(updates, new_state)``.
        """
        back = verdict.rolled_back
        snapshot = state.snapshot_params
        if self.restore_params:
            # A branch that passes the old snapshot through lets XLA:CPU write a
            # new one in place; a select over all parameters, with the restore
            # reading the old snapshot, makes it copy params and snapshot every
            # step (2 parameter copies). On GPU/TPU `either` is that select.
            snapshot = either(intervene, lambda: typed_like(state.snapshot_params, params),
                              lambda typed: typed_like(typed, state.snapshot_params))
            # On a rollback there is no intervention: this is the old snapshot.
            restore = jax.tree.map(lambda s, p: (s - p).astype(p.dtype), snapshot, params)
            updates = optax.tree.where(back, restore, updates)
        left = jnp.where(event.valid & verdict.watching, state.guard_windows_left - 1,
                         state.guard_windows_left)
        new_state = RollbackState(
            snapshot_params=snapshot,
            snapshot_boost_from=jnp.where(intervene, before.boost_from, state.snapshot_boost_from),
            snapshot_boost_to=jnp.where(intervene, before.boost_to, state.snapshot_boost_to),
            snapshot_boost_step=jnp.where(intervene, before.boost_step, state.snapshot_boost_step),
            snapshot_mix_index=jnp.where(intervene, before.mix_index, state.snapshot_mix_index),
            snapshot_value=jnp.where(intervene, plateau.best_value, state.snapshot_value),
            snapshot_sd=jnp.where(intervene, plateau.window_sd, state.snapshot_sd),
            probe_sum=jnp.where(intervene | back, 0.0, verdict.probe_sum),
            probe_count=jnp.where(intervene | back, 0, verdict.probe_count),
            guard_windows_left=jnp.where(intervene, self.guard_windows,
                                         jnp.where(back, 0, left)).astype(jnp.int32),
            rollback_count=state.rollback_count + back.astype(jnp.int32),
        )
        return updates, new_state

    def is_worse(self, value: jax.Array, reference: jax.Array, sign: float) -> jax.Array:
        """Whether ``value`` is worse than ``reference`` beyond the tolerance."""
        margin = self.rtol * jnp.abs(reference) + self.atol
        return jnp.isfinite(reference) & (sign * value > sign * reference + margin)

    def fails(self, state: RollbackState, plateau, event, detector, probe_sum: jax.Array,
              probe_count: jax.Array) -> jax.Array:
        """Whether the intervention under watch fails on this step (the caller ANDs ``watching``).

        A closed valid window worse than the best before the intervention
        (:meth:`is_worse`), a closed window without a finite value
        (``rollback_on_nonfinite``), the per-step check (:meth:`step_worse`),
        and with ``require_improvement`` a last watched window that does not
        improve on that best (the detector's own test).

        Args:
            state: The guard's state before this step.
            plateau: The detector's state after this step
                (:class:`~adaptive_optax.plateau.PlateauState`).
            event: This step's :class:`~adaptive_optax.plateau.WindowEvent`.
            detector: The :class:`~adaptive_optax.plateau.PlateauDetector`.
            probe_sum: :meth:`probe`'s sum after this step.
            probe_count: :meth:`probe`'s count after this step.

        Returns:
            A bool scalar.
        """
        worse = event.valid & self.is_worse(plateau.window_value, state.snapshot_value,
                                            detector.sign)
        if self.rollback_on_nonfinite:
            worse = worse | (event.closed & ~event.valid)  # no finite value: diverged
        # Checked every step, so a boost that blows up is undone within a few steps.
        worse = worse | self.step_worse(probe_sum, probe_count, state, detector.sign)
        if self.require_improvement:  # the watch's last window must beat the old best
            last = event.valid & (state.guard_windows_left == 1)
            worse = worse | (last & ~detector.is_better(plateau.window_value,
                                                        state.snapshot_value))
        return worse

    def probe(self, state: RollbackState, value: jax.Array, watching: jax.Array
              ) -> tuple[jax.Array, jax.Array]:
        """Folds one monitored value into the watched steps' excess sum.

        Returns:
            ``(probe_sum, probe_count)`` after this step (unchanged off the watch
            and for a non-finite value).
        """
        take = watching & jnp.isfinite(value) & jnp.isfinite(state.snapshot_value)
        excess = jnp.where(take, value - state.snapshot_value, 0.0)
        return state.probe_sum + excess, state.probe_count + take.astype(jnp.int32)

    def step_worse(self, probe_sum: jax.Array, probe_count: jax.Array, state: RollbackState,
                   sign: float) -> jax.Array:
        """The per-step check: the mean since the intervention is significantly worse.

        The mean ``m`` of the ``k`` finite monitored values since the intervention
        fails when ``sign * (m - best) > rtol * |best| + atol + abort_z * sd / sqrt(k)``,
        with ``best`` the best window mean before the intervention and ``sd``
        the spread of the per-step values in the window that fired it: the
        window test's margin plus a one-sided z-test on ``k`` noisy values.
        Always False with ``abort_z=None``.
        """
        if self.abort_z is None:
            return jnp.zeros([], jnp.bool_)
        k = jnp.maximum(probe_count, 1).astype(jnp.float32)
        margin = (self.rtol * jnp.abs(state.snapshot_value) + self.atol
                  + self.abort_z * state.snapshot_sd / jnp.sqrt(k))
        return (probe_count > 0) & (sign * probe_sum / k > margin)


@dataclasses.dataclass(frozen=True)
class NoGuard:
    """The absent guard: the same calls as :class:`RollbackGuard`, never a rollback.

    ``plateau_escape(..., rollback=None)`` uses :data:`NO_GUARD`. Its state is
    ``optax.EmptyState()``, its verdict a constant "no rollback" that XLA
    folds away, so an unguarded update compiles to what it would be without
    any guard code.

    Example:
        >>> NO_GUARD.restore_params, NO_GUARD.reset_optimizer
        (False, False)
    """

    restore_params = False
    reset_optimizer = False

    def init(self, params, initial_mix_index: int) -> optax.EmptyState:
        """No state."""
        del params, initial_mix_index
        return optax.EmptyState()

    def check(self, state, plateau, event, detector, value) -> Verdict:
        """Never a rollback."""
        del state, plateau, event, detector, value
        false = jnp.zeros([], jnp.bool_)
        return Verdict(false, false, jnp.zeros([], jnp.float32), jnp.zeros([], jnp.int32))

    def permits(self, state, verdict: Verdict) -> jax.Array:
        """Always."""
        del state, verdict
        return jnp.ones([], jnp.bool_)

    def revert(self, intervention, state, verdict: Verdict):
        """``intervention``, unchanged."""
        del state, verdict
        return intervention

    def keeps_update(self, verdict: Verdict) -> bool:
        """Always."""
        del verdict
        return True

    def reset_params(self, state, params, verdict: Verdict):
        """``params``."""
        del state, verdict
        return params

    def update(self, state, verdict, intervene, before, plateau, event, params, updates):
        """``(updates, state)``, unchanged."""
        del verdict, intervene, before, plateau, event, params
        return updates, state


NO_GUARD = NoGuard()
