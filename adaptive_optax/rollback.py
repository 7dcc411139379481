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

from adaptive_optax._validation import check_bool, check_float, check_int


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
