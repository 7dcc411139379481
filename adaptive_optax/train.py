"""One jitted segmentation train step that reads its loss mix from the optimizer state.

The data path, in order: loss components (computed once) -> weighted loss with
the mix ``optax.tree.get(opt_state, "loss_weights")`` -> gradients ->
``optimizer.update(model, grads, value=monitor)`` (the plateau-escape
transformation updates its EMA, plateau state and, on a plateau, the mix and
learning rate) -> the next step reads the new mix. A new mix is a new array
value in the state, never a new trace.

**What is monitored.** By default the plateau detector watches a
*fixed-weight reference loss* (``reference_weights``, the policy's initial
mix), not the loss being optimised: after a mix change the optimised loss is
on a different scale, and comparing it with the best value of the old mix
would declare false plateaus or false improvements.

For speed with small models the step follows Flax's performance guide: the
model and optimizer are split once into a static graph definition and a state
pytree, and the jitted function merges them inside, so Python graph traversal
happens only while tracing.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from adaptive_optax.data import SegmentationData
from adaptive_optax.losses import loss_components, mixed_loss
from adaptive_optax.metrics import confusion_counts
from adaptive_optax.state import find_state


# Fields read from the optimizer state after each step (names unique in the state).
STATE_FIELDS = ("learning_rate", "base_learning_rate", "lr_multiplier", "intervention_count",
                "grad_norm_ema", "plateau_count", "best_value", "window_value",
                "windows_completed", "mix_index", "nonfinite_count", "nonfinite_grad_count",
                "rollback_count")


class StepMetrics(NamedTuple):
    """What one train step reports (device scalars; no host sync)."""

    loss: jax.Array  # float32 [], the loss that was differentiated
    monitor: jax.Array  # float32 [], the value given to the optimizer
    components: dict[str, jax.Array]  # float32 [] each
    readings: dict[str, jax.Array]  # state_readings() of the new optimizer state


def state_readings(opt_state: optax.OptState) -> dict[str, jax.Array]:
    """The scalars of :data:`STATE_FIELDS` and ``weight/<name>`` per loss weight.

    Fields absent from the state (``rollback_count`` without a guard) are left
    out. A chained ``optax.contrib.reduce_on_plateau`` scales the updates after
    ``plateau_escape``, so its ``scale`` is folded into ``learning_rate``.
    """
    # Fields are read inside the plateau-escape state: a chained optax
    # reduce_on_plateau has its own best_value, plateau_count and cooldown_count.
    fields = find_state(opt_state).fields()
    out = {name: fields[name] for name in STATE_FIELDS if name in fields}
    for name, weight in fields["loss_weights"].items():
        out[f"weight/{name}"] = weight
    # Looked up by class name: a bare "scale" would also match GroupNorm params in mu/nu.
    reduce_state = optax.tree.get(opt_state, "ReduceLROnPlateauState")
    if reduce_state is not None:
        out["learning_rate"] = out["learning_rate"] * reduce_state.scale
    return out


def init_train_state(model: nnx.Module, tx: optax.GradientTransformation):
    """Wraps ``model`` in an ``nnx.Optimizer`` and splits both for jitting.

    Args:
        model: A Flax NNX model, e.g. :class:`adaptive_optax.unet.UNet`.
        tx: The optax transformation, e.g. :func:`adaptive_optax.plateau_escape`.

    Returns:
        ``(graphdef, state)``: the static graph and the pytree of arrays that
        :func:`make_train_step` steps.

    Example:
        >>> import optax
        >>> model = nnx.Linear(2, 1, rngs=nnx.Rngs(0))
        >>> graphdef, state = init_train_state(model, optax.sgd(0.1))
    """
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    return nnx.split((model, optimizer))


def opt_state_of(graphdef, state) -> optax.OptState:
    """The plain optax state inside a train state (for ``optax.tree.get``).

    Example:
        >>> import optax
        >>> graphdef, state = init_train_state(nnx.Linear(2, 1, rngs=nnx.Rngs(0)), optax.adam(1e-3))
        >>> int(optax.tree.get(opt_state_of(graphdef, state), "count"))
        0
    """
    _, optimizer = nnx.merge(graphdef, state)
    return nnx.pure(optimizer.opt_state)


def make_train_step(
    graphdef,
    *,
    loss_names: Sequence[str] = ("dice", "focal", "variance", "bce"),
    reference_weights: Mapping[str, float] | None = None,
    monitor: str = "reference",
    donate: bool = True,
):
    """Builds the jitted ``train_step(state, batch) -> (state, StepMetrics)``.

    Args:
        graphdef: The graph definition from :func:`init_train_state`.
        loss_names: Loss components to compute; must equal the keys of the
            optimizer state's ``loss_weights``.
        reference_weights: Fixed mix for the monitored reference loss.
        monitor: ``"reference"`` (fixed-weight loss, default) or ``"loss"``
            (the optimised, mix-dependent loss; see the module docstring).
        donate: Donate the state buffers to the step (saves a copy).

    Returns:
        The jitted train step. It compiles once per batch shape.

    Raises:
        ValueError: If ``monitor`` is unknown, or ``reference_weights`` is
            missing while ``monitor="reference"``.
    """
    if monitor not in ("reference", "loss"):
        raise ValueError(f"monitor must be 'reference' or 'loss', got monitor = {monitor!r}.")
    if monitor == "reference" and reference_weights is None:
        raise ValueError("monitor='reference' needs reference_weights (e.g. policy.initial_mix).")
    names = tuple(loss_names)
    reference = None if reference_weights is None else {
        k: float(v) for k, v in reference_weights.items()}

    @functools.partial(jax.jit, donate_argnums=(0,) if donate else ())
    def train_step(state, batch: SegmentationData):
        model, optimizer = nnx.merge(graphdef, state)
        model.train()
        weights = optax.tree.get(nnx.pure(optimizer.opt_state), "loss_weights")

        def loss_fn(model):
            logits = model(batch.images)
            components = loss_components(logits, batch.masks, batch.instances, names=names)
            return mixed_loss(components, weights), components

        (loss, components), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
        value = loss if monitor == "loss" else mixed_loss(components, reference)
        optimizer.update(model, grads, value=value)
        readings = state_readings(nnx.pure(optimizer.opt_state))
        return nnx.state((model, optimizer)), StepMetrics(loss, value, components, readings)

    return train_step


def make_eval_step(graphdef):
    """Builds the jitted ``eval_step(state, batch) -> [C, 3]`` confusion counts.

    Sum the counts over a data set and pass them to
    :func:`adaptive_optax.metrics.dice_iou` for per-class Dice and IoU.
    """

    @jax.jit
    def eval_step(state, batch: SegmentationData) -> jax.Array:
        model, _ = nnx.merge(graphdef, state)
        model.eval()
        return confusion_counts(model(batch.images), batch.masks)

    return eval_step


def evaluate(eval_step, state, data: SegmentationData, batch_size: int) -> jax.Array:
    """Sums confusion counts over ``data`` in fixed-size batches (remainder dropped)."""
    n = data.images.shape[0] // batch_size
    if n == 0:
        raise ValueError(f"batch_size = {batch_size} is larger than the {data.images.shape[0]} "
                         "evaluation images.")
    total = None
    for i in range(n):
        sl = slice(i * batch_size, (i + 1) * batch_size)
        counts = eval_step(state, SegmentationData(*(jnp.asarray(a[sl]) for a in data)))
        total = counts if total is None else total + counts
    return total
