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
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from adaptive_optax._validation import check_float, check_int
from adaptive_optax.grad_norm import global_norm
from adaptive_optax.segmentation.data import SegmentationData
from adaptive_optax.segmentation.losses import (
    LOSS_NAMES,
    check_loss_names,
    loss_components,
    mixed_loss,
)
from adaptive_optax.segmentation.metrics import confusion_counts
from adaptive_optax.state import find_state


# Fields read from the optimizer state after each step (names unique in the state).
STATE_FIELDS = ("learning_rate", "base_learning_rate", "lr_multiplier", "boost_to",
                "intervention_count", "grad_norm_ema", "plateau_count", "best_value",
                "window_value", "windows_completed", "mix_index", "nonfinite_count",
                "nonfinite_grad_count", "rollback_count", "trial_values", "trial_curves",
                "trial_choice")


class StepMetrics(NamedTuple):
    """What one train step reports (device scalars; no host sync)."""

    loss: jax.Array  # float32 [], the loss that was differentiated
    monitor: jax.Array  # float32 [], the value given to the optimizer
    components: dict[str, jax.Array]  # float32 [] each
    readings: dict[str, jax.Array]  # state_readings() of the new optimizer state


def state_readings(opt_state: optax.OptState) -> dict[str, jax.Array]:
    """The scalars of :data:`STATE_FIELDS` and ``weight/<name>`` per loss weight.

    Fields absent from the state (``rollback_count`` without a guard,
    ``trial_values`` -- float32 ``[K]``, one per candidate --,
    ``trial_curves`` -- float32 ``[K, steps + 1]`` -- and ``trial_choice``
    without a lookahead) are left out. A chained ``optax.contrib.reduce_on_plateau`` scales the updates after
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
        model: A Flax NNX model, e.g. :class:`adaptive_optax.segmentation.unet.UNet`.
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
    lookahead: bool | None = None,
):
    """Builds the jitted ``train_step(state, batch, probe=None) -> (state, StepMetrics)``.

    With a lookahead in the optimizer (``plateau_escape(...,
    lookahead=Lookahead())``), the step also passes the update a
    ``value_fn(params, loss_weights) -> (loss, monitored)``: the model at
    ``params`` on ``probe`` (default: ``batch``), its mixed loss with
    ``loss_weights`` and this step's monitored value (the reference loss, or
    the loss with ``monitor="loss"``). The candidates' trials are scored on
    it; a probe held out of training scores generalisation rather than the
    fit to the batch being trained on.

    Args:
        graphdef: The graph definition from :func:`init_train_state`.
        loss_names: Loss components to compute; must equal the keys of the
            optimizer state's ``loss_weights`` (so the optimizer's policy
            needs loss mixes, e.g. ``adaptive_mix_policy()``).
        reference_weights: Fixed mix for the monitored reference loss.
        monitor: ``"reference"`` (fixed-weight loss, default) or ``"loss"``
            (the optimised, mix-dependent loss; see the module docstring).
        donate: Donate the state buffers to the step (saves a copy).
        lookahead: Pass ``value_fn`` to the update: ``None`` (default) when the
            optimizer state holds a lookahead record, ``True`` always (an
            error if the state holds none), ``False`` never.

    Returns:
        The jitted train step. It compiles once per batch shape.

    Raises:
        ValueError: If ``monitor`` is unknown, ``loss_names`` is a bare string
            or holds an unknown name, or ``reference_weights`` is missing
            while ``monitor="reference"``, has other keys than
            ``loss_names`` or a weight that is not a finite number ``>= 0``
            (a nan weight would make every monitored value nan and silently
            switch plateau detection off). When the step is traced: if
            ``lookahead=True`` and the optimizer has no lookahead.

    Example:
        >>> from adaptive_optax import plateau_escape
        >>> from adaptive_optax.segmentation.policies import adaptive_mix_policy
        >>> tx = plateau_escape(optax.adam, 1e-3, policy=adaptive_mix_policy())
        >>> graphdef, state = init_train_state(nnx.Conv(1, 1, (3, 3), rngs=nnx.Rngs(0)), tx)
        >>> step = make_train_step(graphdef, reference_weights={
        ...     "dice": 0.4, "focal": 0.3, "variance": 0.1, "bce": 0.2})
    """
    if monitor not in ("reference", "loss"):
        raise ValueError(f"monitor must be 'reference' or 'loss', got monitor = {monitor!r}.")
    names = check_loss_names(loss_names, "loss_names")
    if not names:
        raise ValueError(f"loss_names must be a non-empty sequence of names from {LOSS_NAMES}, "
                         f"got loss_names = {loss_names!r}.")
    if monitor == "reference" and reference_weights is None:
        raise ValueError("monitor='reference' needs reference_weights (e.g. policy.initial_mix).")
    reference = None
    if reference_weights is not None:
        if set(reference_weights) != set(names):
            raise ValueError(
                f"reference_weights must have exactly the keys of loss_names {sorted(names)}, "
                f"got {sorted(reference_weights)}.")
        reference = {k: check_float(f"reference_weights[{k!r}]", v, low=0.0)
                     for k, v in reference_weights.items()}

    if lookahead is not None and not isinstance(lookahead, bool):
        raise TypeError(f"lookahead must be None, True or False, got lookahead = {lookahead!r}.")

    def objective(model, data: SegmentationData, weights):
        """``(loss, (monitored, components))`` of ``model`` on ``data`` with ``weights``."""
        components = loss_components(model(data.images), data.masks, data.instances, names=names)
        loss = mixed_loss(components, weights)
        return loss, (loss if monitor == "loss" else mixed_loss(components, reference), components)

    def probe_value_fn(model, probe: SegmentationData):
        """``value_fn(params, loss_weights)`` of the lookahead: ``model`` at ``params`` on ``probe``."""
        model_def, _, rest = nnx.split(model, nnx.Param, ...)

        def value_fn(params, loss_weights):
            loss, (monitored, _) = objective(nnx.merge(model_def, params, rest), probe,
                                             loss_weights)
            return loss, monitored

        return value_fn

    @functools.partial(jax.jit, donate_argnums=(0,) if donate else ())
    def train_step(state, batch: SegmentationData, probe: SegmentationData | None = None):
        model, optimizer = nnx.merge(graphdef, state)
        model.train()
        weights = optax.tree.get(nnx.pure(optimizer.opt_state), "loss_weights")
        if weights is None:
            raise ValueError("make_train_step reads the loss mix from the optimizer state: "
                             "build the optimizer with adaptive_optax.plateau_escape (alone or "
                             "inside optax.chain), whose state holds loss_weights.")
        if not weights:  # a policy without mixes: the core's default
            raise ValueError("make_train_step reads the loss mix from the optimizer state, whose "
                             "loss_weights is empty: the intervention policy has no loss mixes. "
                             "Build plateau_escape with policy=adaptive_optax.segmentation."
                             "adaptive_mix_policy() (or an InterventionPolicy whose mixes name "
                             f"the loss_names {sorted(names)}).")
        trials = _has_lookahead(nnx.pure(optimizer.opt_state))
        if lookahead and not trials:
            raise ValueError("make_train_step(lookahead=True) needs an optimizer with a "
                             "lookahead: plateau_escape(..., lookahead=Lookahead()).")
        extra = {}
        if trials and lookahead is not False:  # before the update changes the model
            extra["value_fn"] = probe_value_fn(model, batch if probe is None else probe)
        stats_before = nnx.pure(nnx.state(model, nnx.BatchStat))
        (loss, (value, components)), grads = nnx.value_and_grad(
            lambda m: objective(m, batch, weights), has_aux=True)(model)
        optimizer.update(model, grads, value=value, **extra)
        if jax.tree.leaves(stats_before):
            _keep_finite_batch_stats(model, stats_before, grads)
        readings = state_readings(nnx.pure(optimizer.opt_state))
        return nnx.state((model, optimizer)), StepMetrics(loss, value, components, readings)

    return train_step


def _has_lookahead(opt_state) -> bool:
    """Whether the plateau-escape state inside ``opt_state`` holds a lookahead record."""
    found = optax.tree.get(opt_state, "PlateauEscapeState")
    return found is not None and not isinstance(found.lookahead, optax.EmptyState)


def _keep_finite_batch_stats(model: nnx.Module, before, grads) -> None:
    """Undoes this step's BatchNorm running-statistics update if it is not finite.

    The forward pass in train mode updates the running statistics before the
    optimizer sees the gradients. A batch with a nan or inf (which the
    transformation skips) would otherwise leave nan statistics behind, and
    every later eval-mode output would be nan. The statistics follow the
    update: kept when the gradients and the new statistics are finite.
    """
    after = nnx.pure(nnx.state(model, nnx.BatchStat))
    # The transformation's own norm of the same gradients: XLA computes it once.
    finite = jnp.isfinite(global_norm(grads))
    for leaf in jax.tree.leaves(after):
        finite &= jnp.all(jnp.isfinite(leaf))
    nnx.update(model, jax.tree.map(lambda new, old: jnp.where(finite, new, old), after, before))


def make_eval_step(graphdef, eval_params: Callable[[Any, Any], Any] | None = None):
    """Builds the jitted ``eval_step(state, batch, example_weights=None) -> [C, 3]``.

    The result is :func:`~adaptive_optax.segmentation.metrics.confusion_counts` of the
    model in eval mode. Sum the counts over a data set (:func:`evaluate` does)
    and pass them to :func:`adaptive_optax.segmentation.metrics.dice_iou` for per-class
    Dice and IoU.

    Args:
        graphdef: The graph definition from :func:`init_train_state`.
        eval_params: Optional ``eval_params(opt_state, params) -> params``: the
            parameters to evaluate, from the pure optimizer state and the
            model's parameters. Schedule-free optimizers train at one point and
            evaluate at another:
            ``functools.partial(strategies.eval_params, "schedule-free")``.
            ``None`` evaluates the parameters as they are.

    Returns:
        The jitted eval step.

    Example:
        >>> import functools
        >>> from adaptive_optax.segmentation import strategies
        >>> tx = strategies.make_optimizer("schedule-free", 1e-3, total_steps=10)
        >>> graphdef, state = init_train_state(nnx.Conv(1, 1, (3, 3), rngs=nnx.Rngs(0)), tx)
        >>> step = make_eval_step(graphdef, functools.partial(strategies.eval_params,
        ...                                                   "schedule-free"))
    """

    @jax.jit
    def eval_step(state, batch: SegmentationData, example_weights=None) -> jax.Array:
        model, optimizer = nnx.merge(graphdef, state)
        if eval_params is not None:  # e.g. schedule-free: evaluate its average, not y
            params = nnx.pure(nnx.state(model, nnx.Param))
            nnx.update(model, eval_params(nnx.pure(optimizer.opt_state), params))
        model.eval()
        return confusion_counts(model(batch.images), batch.masks, example_weights)

    return eval_step


def evaluate(eval_step, state, data: SegmentationData, batch_size: int) -> jax.Array:
    """Sums confusion counts over every example of ``data``, ``batch_size`` at a time.

    The last batch is padded to ``batch_size`` (repeating its first example)
    with weight 0 for the padding, so every example counts once and the step
    compiles for one batch shape.

    Args:
        eval_step: From :func:`make_eval_step`.
        state: The train state.
        data: The evaluation set (at least one example).
        batch_size: Examples per call, ``>= 1``.

    Returns:
        float32 ``[C, 3]`` counts.
    """
    batch_size = check_int("batch_size", batch_size, 1)
    total_examples = data.images.shape[0]
    if total_examples == 0:
        raise ValueError("evaluate needs at least one example, got an empty data set.")
    host = [np.asarray(a) for a in data]
    total = None
    for start in range(0, total_examples, batch_size):
        index = np.arange(start, start + batch_size)
        valid = index < total_examples
        index = np.where(valid, index, start)
        batch = SegmentationData(*(jnp.asarray(a[index]) for a in host))
        counts = eval_step(state, batch, jnp.asarray(valid, jnp.float32))
        total = counts if total is None else total + counts
    return total
