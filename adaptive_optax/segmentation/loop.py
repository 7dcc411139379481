"""The training loop: epochs of fixed-shape batches, a history read from the state.

Every number in :class:`History` is read from the optimizer state (or the step
metrics) after each step, as device scalars. They are fetched to the host once
per epoch, so the loop adds no host sync to a step.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from adaptive_optax._validation import check_int
from adaptive_optax.segmentation.data import SegmentationData, batches, num_batches
from adaptive_optax.segmentation.metrics import dice_iou
from adaptive_optax.segmentation.train import StepMetrics, evaluate

@dataclasses.dataclass
class History:
    """Per-step readings, per-epoch evaluations and the intervention log.

    Attributes:
        steps: name -> list of per-step values (``loss``, ``monitor`` and
            :func:`adaptive_optax.segmentation.train.state_readings`).
        evals: name -> list of per-epoch values (``epoch``, ``step``,
            ``dice``, ``iou``: mean over classes).
        interventions: One dict per intervention or rollback (step, epoch,
            window, grad-norm EMA, learning rate before and after, ``boost`` = the
            multiplier the event set on the base schedule (an intervention's
            boost, the target of its warm-up ramp; for a rollback, the
            restored multiplier; before a ``max_learning_rate`` cap), and the
            mix before and after; with a lookahead, an intervention's
            ``trial_values``, each candidate's monitored value after its
            trial, ``trial_curves``, each candidate's value at trial steps
            0..steps, and ``trial_choice``, the committed candidate: -2 when
            every trial was non-finite). The curves are kept only here, not
            per step in ``steps``: ``K * (steps + 1)`` values a step would
            make ``history.json`` grow with the trial length.
    """

    steps: dict[str, list] = dataclasses.field(default_factory=dict)
    evals: dict[str, list] = dataclasses.field(default_factory=dict)
    interventions: list[dict] = dataclasses.field(default_factory=list)

    def array(self, name: str) -> np.ndarray:
        """A per-step series as a numpy array."""
        return np.asarray(self.steps[name])

    def to_json(self) -> str:
        """Serialises the history (used next to checkpoints)."""
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> History:
        """Inverse of :meth:`to_json`."""
        return cls(**json.loads(text))

    def _extend(self, rows: dict[str, np.ndarray]) -> None:
        for name, values in rows.items():
            self.steps.setdefault(name, []).extend(np.asarray(values).tolist())

    def _add_eval(self, **values) -> None:
        for name, value in values.items():
            self.evals.setdefault(name, []).append(value)


def readings(metrics: StepMetrics) -> dict[str, jax.Array]:
    """The per-step scalars that :class:`History` records (device arrays)."""
    return {"loss": metrics.loss, "monitor": metrics.monitor, **metrics.readings}


def fit(
    train_step,
    eval_step,
    state,
    train_data: SegmentationData,
    val_data: SegmentationData,
    *,
    epochs: int,
    batch_size: int,
    seed: int = 0,
    start_epoch: int = 0,
    history: History | None = None,
    steps_per_epoch: int | None = None,
    mix_label: Callable[[int], str] = str,
    on_epoch_end: Callable[[int, Any, History], None] | None = None,
    on_step: Callable[[], None] | None = None,
    put_batch: Callable[[SegmentationData], SegmentationData] | None = None,
) -> tuple[Any, History]:
    """Trains for ``epochs - start_epoch`` epochs and evaluates after each.

    Args:
        train_step: From :func:`adaptive_optax.segmentation.train.make_train_step`.
        eval_step: From :func:`adaptive_optax.segmentation.train.make_eval_step`.
        state: The train state from :func:`adaptive_optax.segmentation.train.init_train_state`.
        train_data: Training images, masks and instances.
        val_data: Validation data, evaluated whole after every epoch in
            ``batch_size`` chunks (the last one padded; see
            :func:`adaptive_optax.segmentation.train.evaluate`); at least one example.
        epochs: Index of the epoch to stop before (the total epoch count).
        batch_size: Fixed batch size (the remainder of each epoch is dropped).
        seed: Shuffling seed; epoch ``e`` always sees the same order.
        start_epoch: First epoch to run (to resume a checkpoint).
        history: History to extend (to resume); a new one if ``None``.
        steps_per_epoch: Cap on the batches per epoch, ``>= 1`` (default: all).
        mix_label: Names a mix index in the intervention log.
        on_epoch_end: Called as ``on_epoch_end(epoch, state, history)``.
        on_step: Called after each step (e.g. a progress bar's ``update``).
        put_batch: Moves a host batch to devices (default ``jnp.asarray``;
            :func:`adaptive_optax.parallel.shard_batch` for data parallelism).

    Returns:
        ``(state, history)``.

    Raises:
        ValueError: If an argument is out of range (checked before the first
            step, so a bad argument never costs an epoch or the donated state).
    """
    epochs = check_int("epochs", epochs, 0)
    start_epoch = check_int("start_epoch", start_epoch, 0, maximum=max(epochs, 0))
    if val_data.images.shape[0] == 0:
        raise ValueError("val_data must hold at least one example, got an empty data set.")
    history = History() if history is None else history
    if put_batch is None:
        put_batch = lambda batch: SegmentationData(*map(jnp.asarray, batch))  # noqa: E731
    per_epoch = num_batches(train_data, batch_size)
    if steps_per_epoch is not None:
        per_epoch = min(per_epoch, check_int("steps_per_epoch", steps_per_epoch, 1))
    for epoch in range(start_epoch, epochs):
        rows = []
        for i, batch in enumerate(batches(train_data, batch_size, seed=seed, epoch=epoch)):
            if i == per_epoch:
                break
            state, metrics = train_step(state, put_batch(batch))
            rows.append(readings(metrics))
            if on_step is not None:
                on_step()
        first_step = len(history.steps.get("loss", []))
        previous = _last_row(history)
        host = jax.device_get(rows)
        history._extend({k: [r[k] for r in host] for k in host[0] if k not in _EVENT_ONLY})
        _log_interventions(history, host, previous, first_step, epoch, mix_label)
        dice, iou = dice_iou(evaluate(eval_step, state, val_data, batch_size))
        history._add_eval(epoch=epoch, step=first_step + len(host), dice=float(dice.mean()),
                          iou=float(iou.mean()), dice_per_class=dice.tolist(),
                          iou_per_class=iou.tolist())
        if on_epoch_end is not None:
            on_epoch_end(epoch, state, history)
    return state, history


# Readings recorded in the intervention log only (see History.interventions).
_EVENT_ONLY = ("trial_curves",)


def _last_row(history: History) -> dict | None:
    if not history.steps:
        return None
    return {k: v[-1] for k, v in history.steps.items()}


def _weights_of(row: dict) -> dict[str, float]:
    """The loss mix of one history row (its ``weight/<name>`` entries)."""
    prefix = "weight/"
    return {k[len(prefix):]: round(float(v), 4) for k, v in row.items() if k.startswith(prefix)}


def _log_interventions(history, rows, previous, first_step, epoch, mix_label) -> None:
    """Appends one record per step whose intervention or rollback count rose."""
    for i, row in enumerate(rows):
        before = previous if i == 0 else rows[i - 1]
        if before is None:
            continue
        kinds = []
        if row["intervention_count"] > before["intervention_count"]:
            kinds.append("intervention")
        if row.get("rollback_count", 0) > before.get("rollback_count", 0):
            kinds.append("rollback")
        for kind in kinds:
            history.interventions.append(dict(
                kind=kind,
                number=int(row["intervention_count"]),
                step=first_step + i,
                epoch=epoch,
                window=int(row["windows_completed"]),
                grad_norm_ema=float(row["grad_norm_ema"]),
                lr_before=float(before["learning_rate"]),
                lr_after=float(row["learning_rate"]),
                # An intervention's target (a warm-up ramp's end); a rollback's
                # restored trajectory may be far along its decay: what it set.
                boost=float(row["boost_to"] if kind == "intervention" else row["lr_multiplier"]),
                mix_before=mix_label(int(before["mix_index"])),
                mix_after=mix_label(int(row["mix_index"])),
                weights_before=_weights_of(before),
                weights_after=_weights_of(row),
                **_trial_of(row, kind),
            ))


def _trial_of(row: dict, kind: str) -> dict:
    """An intervention's lookahead trial (values, curves, the winner); {} without one."""
    if kind != "intervention" or "trial_values" not in row:
        return {}
    return dict(trial_values=[float(v) for v in np.ravel(row["trial_values"])],
                trial_curves=np.asarray(row["trial_curves"], np.float64).tolist(),
                trial_choice=int(row["trial_choice"]))
