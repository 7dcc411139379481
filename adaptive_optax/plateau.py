"""Plateau detection on a monitored value, as pure in-graph state updates.

The detector averages the monitored value over a window of
``accumulation_steps`` updates (one epoch of steps, say), compares each
window's mean with the best window mean so far, and declares a plateau when
more than ``patience`` consecutive windows failed to improve.

Definitions (each is tested):

* **Window.** Every call to :meth:`PlateauDetector.update` is one step; a
  window closes on its ``accumulation_steps``-th step. Its value is the mean of
  the *finite* values seen in it. Non-finite values (NaN/Inf) are skipped and
  counted in ``nonfinite_count``; ``window_sd`` is the standard deviation of
  those values (what the rollback guard's per-step check compares with). A window whose values were all non-finite,
  or whose finite values sum past the float32 range (``|v| ~ 1e38``), is
  *invalid* and changes neither the best value, the plateau count nor the
  cooldown. A diverging run therefore never looks like a plateau, unlike
  ``optax.contrib.reduce_on_plateau``, PyTorch and Keras, which all count NaN as
  "no improvement" and so answer divergence with a plateau action.
* **Improvement.** With ``s = +1`` for ``mode="min"`` and ``s = -1`` for
  ``mode="max"``, a window mean ``v`` improves on ``best`` when
  ``s * v < s * best - (rtol * |best| + atol)``. The first valid window always
  improves (``best`` starts at ``+inf``/``-inf``). Unlike optax's
  ``(1 - rtol) * best - atol``, this is right for negative values and for
  ``mode="max"``, and it is never NaN while ``best`` is infinite.
* **Patience** (PyTorch's convention). ``plateau_count`` is the number of
  consecutive valid windows without improvement. A plateau is declared when a
  window makes ``plateau_count > patience``: ``patience=0`` declares one on the
  first window that does not improve, ``patience=2`` on the third in a row.
* **Cooldown.** Declaring a plateau resets ``plateau_count`` to 0 and starts
  ``cooldown`` valid windows during which non-improving windows are not
  counted (improvements still update ``best``).
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from adaptive_optax._counters import increment_if
from adaptive_optax._validation import check_float, check_int

_MODES = ("min", "max")


class PlateauState(NamedTuple):
    """Plateau-detector state: scalars only, so it jits, shards and checkpoints."""

    window_sum: jax.Array  # float32 [], sum of finite values in the open window
    window_m2: jax.Array  # float32 [], squared deviations in the open window (Welford)
    window_finite: jax.Array  # int32 [], finite values in the open window
    window_step: jax.Array  # int32 [], steps taken in the open window
    windows_completed: jax.Array  # int32 [], windows closed so far
    window_value: jax.Array  # float32 [], mean of the last valid window (NaN before)
    window_sd: jax.Array  # float32 [], standard deviation of the values in that window
    best_value: jax.Array  # float32 [], best valid window mean (+inf/-inf before)
    plateau_count: jax.Array  # int32 [], consecutive non-improving valid windows
    cooldown_count: jax.Array  # int32 [], valid windows left in cooldown
    nonfinite_count: jax.Array  # int32 [], non-finite values skipped in total


class WindowEvent(NamedTuple):
    """What one step of the detector concluded (all boolean scalars)."""

    closed: jax.Array  # a window closed on this step
    valid: jax.Array  # ... and it held at least one finite value
    improved: jax.Array  # ... and its mean improved on the best
    plateau: jax.Array  # ... and it completed a plateau


@dataclasses.dataclass(frozen=True)
class PlateauDetector:
    """Windowed plateau detection with explicit, tested semantics.

    Args:
        patience: Non-improving windows tolerated before a plateau (>= 0).
        accumulation_steps: Steps averaged into one window (>= 1).
        cooldown: Windows after a plateau in which none is counted (>= 0).
        mode: ``"min"`` for a loss, ``"max"`` for a score such as Dice.
        rtol: Relative improvement threshold, in ``[0, 1)``.
        atol: Absolute improvement threshold, ``>= 0``.

    Raises:
        ValueError: If an argument is out of its range; the message names it.

    Example:
        >>> det = PlateauDetector(patience=0, accumulation_steps=2)
        >>> state = det.init()
        >>> for v in [1.0, 1.0, 1.0, 1.0]:
        ...     state, event = det.update(state, jnp.float32(v))
        >>> bool(event.plateau)
        True
    """

    patience: int = 2
    accumulation_steps: int = 1
    cooldown: int = 0
    mode: str = "min"
    rtol: float = 1e-4
    atol: float = 0.0

    def __post_init__(self):
        check_int("patience", self.patience, minimum=0)
        check_int("accumulation_steps", self.accumulation_steps, minimum=1)
        check_int("cooldown", self.cooldown, minimum=0)
        if self.mode not in _MODES:
            raise ValueError(f"mode must be one of {_MODES}, got mode = {self.mode!r}.")
        check_float("rtol", self.rtol, low=0.0, high=1.0, high_open=True)
        check_float("atol", self.atol, low=0.0, high=math.inf, high_open=True)

    @property
    def sign(self) -> float:
        """+1 when lower is better, -1 when higher is better."""
        return 1.0 if self.mode == "min" else -1.0

    def init(self) -> PlateauState:
        """Returns the state before any step."""
        # One fresh array per field: a shared buffer could not be donated to a jitted step.
        zero_i = lambda: jnp.zeros([], jnp.int32)  # noqa: E731
        return PlateauState(
            window_sum=jnp.zeros([], jnp.float32),
            window_m2=jnp.zeros([], jnp.float32),
            window_finite=zero_i(),
            window_step=zero_i(),
            windows_completed=zero_i(),
            window_value=jnp.full([], jnp.nan, jnp.float32),
            window_sd=jnp.zeros([], jnp.float32),
            best_value=jnp.full([], self.sign * jnp.inf, jnp.float32),
            plateau_count=zero_i(),
            cooldown_count=zero_i(),
            nonfinite_count=zero_i(),
        )

    def is_better(self, value: jax.Array, reference: jax.Array) -> jax.Array:
        """Whether ``value`` improves on ``reference`` beyond the tolerances."""
        margin = self.rtol * jnp.abs(reference) + self.atol
        beats = self.sign * value < self.sign * reference - margin
        return jnp.isfinite(value) & (~jnp.isfinite(reference) | beats)

    def update(
        self, state: PlateauState, value: jax.Array
    ) -> tuple[PlateauState, WindowEvent]:
        """Feeds one monitored value; closes the window on its last step.

        Args:
            state: The detector state.
            value: A scalar; non-finite values are skipped and counted.

        Returns:
            The new state and the :class:`WindowEvent` of this step.
        """
        value = jnp.asarray(value, jnp.float32)
        finite = jnp.isfinite(value)
        window_sum = state.window_sum + jnp.where(finite, value, 0.0)
        # Welford's update of the squared deviations: a sum of squares minus the
        # squared mean would cancel for a loss far from 0 (1000 +- 0.1 in float32).
        old_count = state.window_finite.astype(jnp.float32)
        old_mean = jnp.where(old_count > 0, state.window_sum / jnp.maximum(old_count, 1.0), value)
        new_mean = old_mean + (value - old_mean) / (old_count + 1.0)
        window_m2 = state.window_m2 + jnp.where(
            finite, (value - old_mean) * (value - new_mean), 0.0)
        window_finite = state.window_finite + finite.astype(jnp.int32)
        window_step = state.window_step + 1
        nonfinite_count = increment_if(state.nonfinite_count, ~finite)

        closed = window_step >= self.accumulation_steps
        mean = window_sum / jnp.maximum(window_finite, 1).astype(jnp.float32)
        # A sum of finite values can overflow float32 (|values| ~ 1e38): such a
        # window is skipped like an all-non-finite one, so an overflowing,
        # diverging loss is never a "non-improving window" answered with a boost.
        valid = closed & (window_finite > 0) & jnp.isfinite(mean)
        sd = jnp.sqrt(jnp.maximum(window_m2, 0.0) / jnp.maximum(window_finite, 1).astype(jnp.float32))
        improved = valid & self.is_better(mean, state.best_value)
        in_cooldown = state.cooldown_count > 0
        # A non-improving window counts towards patience only outside cooldown.
        bad = valid & ~improved & ~in_cooldown
        plateau_count = jnp.where(
            improved, 0, increment_if(state.plateau_count, bad)
        )
        plateau = bad & (plateau_count > self.patience)
        cooldown_count = jnp.where(
            valid & in_cooldown, state.cooldown_count - 1, state.cooldown_count
        )
        new_state = PlateauState(
            window_sum=jnp.where(closed, 0.0, window_sum),
            window_m2=jnp.where(closed, 0.0, window_m2),
            window_finite=jnp.where(closed, 0, window_finite),
            window_step=jnp.where(closed, 0, window_step),
            windows_completed=increment_if(state.windows_completed, closed),
            window_value=jnp.where(valid, mean, state.window_value),
            window_sd=jnp.where(valid, jnp.where(jnp.isfinite(sd), sd, 0.0), state.window_sd),
            best_value=jnp.where(improved, mean, state.best_value),
            plateau_count=jnp.where(plateau, 0, plateau_count),
            cooldown_count=jnp.where(plateau, self.cooldown, cooldown_count),
            nonfinite_count=nonfinite_count,
        )
        return new_state, WindowEvent(closed, valid, improved, plateau)

    def restart_patience(self, state: PlateauState) -> PlateauState:
        """Clears the plateau count and cooldown (used after a rollback)."""
        zero = jnp.zeros_like(state.plateau_count)
        return state._replace(plateau_count=zero, cooldown_count=zero)

