"""Segmentation losses for a trainer that mixes named loss components.

Every loss here follows one convention so that the components can be mixed
freely:

* ``logits`` are raw network outputs (never probabilities) of shape
  ``[batch, H, W, C]``, channels-last.
* ``targets`` are float one-hot (``C > 1``) or binary (``C == 1``) masks of the
  same shape.
* ``C == 1`` means binary segmentation with a sigmoid; ``C > 1`` means
  multi-class segmentation with a softmax over the last axis.
* Every loss returns a float32 scalar (mean reduction), computes in float32 even
  for bfloat16 logits, and is jit-able.

The trainer combines the components with :func:`mixed_loss`, whose weights are
a dict of scalar arrays (for example read from an optimizer state), so the
weights can change every step without retracing.

Where ``optax.losses`` already has the loss, the functions here are thin
wrappers that fix the shape/reduction convention; only the instance variance
term is written by hand.
"""

import math
from collections.abc import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import optax

__all__ = [
    "LOSS_NAMES",
    "bce_loss",
    "dice_loss",
    "focal_loss",
    "loss_components",
    "mixed_loss",
    "tversky_loss",
    "variance_loss",
]

LOSS_NAMES: tuple[str, ...] = ("dice", "focal", "variance", "bce", "tversky")
"""Names accepted by :func:`loss_components`."""

_DEFAULT_COMPONENTS: tuple[str, ...] = ("dice", "focal", "variance", "bce")


def _prepare(
    logits: jax.typing.ArrayLike, targets: jax.typing.ArrayLike, fn_name: str
) -> tuple[jax.Array, jax.Array]:
    """Validates the shared ``[batch, H, W, C]`` convention and casts up.

    Args:
        logits: Raw network outputs, ``[batch, H, W, C]``.
        targets: Masks of the same shape.
        fn_name: Name of the public function, for error messages.

    Returns:
        ``(logits, targets)`` as float32 arrays.

    Raises:
        ValueError: If the ranks or shapes do not follow the convention.
    """
    logits = jnp.asarray(logits)
    targets = jnp.asarray(targets)
    if logits.ndim != 4:
        raise ValueError(
            f"{fn_name}: logits must have shape [batch, H, W, C], got shape "
            f"{logits.shape}."
        )
    if logits.shape != targets.shape:
        raise ValueError(
            f"{fn_name}: logits and targets must have the same shape, got "
            f"{logits.shape} and {targets.shape}."
        )
    # bfloat16 sums over H*W pixels lose most of their mantissa; casting up
    # once here keeps every loss numerically comparable across dtypes.
    return logits.astype(jnp.float32), targets.astype(jnp.float32)


def _check_hyperparameter(
    name: str,
    value: jax.typing.ArrayLike,
    predicate: Callable[[float], bool],
    requirement: str,
) -> None:
    """Raises a ValueError naming ``name`` if a concrete value is invalid.

    Traced values (a hyperparameter adapted inside a jitted step) cannot be
    inspected without a host sync, so they are accepted unchecked.

    Args:
        name: Argument name to put in the error message.
        value: The hyperparameter value.
        predicate: Returns True for valid values.
        requirement: Human-readable requirement, e.g. ``">= 0"``.

    Raises:
        ValueError: If ``value`` is concrete and fails ``predicate``.
    """
    try:
        concrete = float(value)
    except jax.errors.ConcretizationTypeError:
        return
    if not predicate(concrete):
        raise ValueError(f"{name} must be {requirement}, got {concrete}.")


def _finite_positive(value: float) -> bool:
    return 0.0 < value < math.inf


def _finite_non_negative(value: float) -> bool:
    return 0.0 <= value < math.inf


def dice_loss(
    logits: jax.typing.ArrayLike,
    targets: jax.typing.ArrayLike,
    *,
    smooth: float = 1.0,
) -> jax.Array:
    r"""Soft Dice loss, binary (``C == 1``) or multi-class (``C > 1``).

    Wraps ``optax.losses.binary_dice_loss`` (sigmoid) for ``C == 1`` and
    ``optax.losses.dice_loss`` (softmax) for ``C > 1``. Per image and class,
    with sums over ``H`` and ``W``:

    .. math::
        1 - \frac{I + s}{I + \tfrac12 (P - I) + \tfrac12 (T - I) + s}
          = 1 - \frac{2I + 2s}{P + T + 2s},

    where ``I = sum(p * t)``, ``P = sum(p)``, ``T = sum(t)`` and ``s`` is
    ``smooth``. Note that optax's smoothing is effectively ``2 * smooth`` in
    the textbook ``(2I + s) / (P + T + s)`` form. The result is averaged over
    classes, then over the batch.

    Args:
        logits: Raw outputs, ``[batch, H, W, C]``.
        targets: Binary (``C == 1``) or one-hot (``C > 1``) masks, same shape.
        smooth: Additive smoothing, finite and ``> 0``, so an empty target
            with a saturated empty prediction stays finite.

    Returns:
        Float32 scalar in ``[0, 1]``.

    Raises:
        ValueError: If the shapes do not follow the convention, or a concrete
            ``smooth`` is not a finite number ``> 0``.

    Example:
        >>> import jax.numpy as jnp
        >>> logits = jnp.full((1, 2, 2, 1), 10.0)
        >>> targets = jnp.ones((1, 2, 2, 1))
        >>> print(f"{float(dice_loss(logits, targets)):.4f}")
        0.0000
    """
    # smooth = 0 gives 0/0 = nan for an empty target and an empty prediction.
    _check_hyperparameter("smooth", smooth, _finite_positive, "a finite number > 0")
    logits, targets = _prepare(logits, targets, "dice_loss")
    if logits.shape[-1] == 1:
        per_image = optax.losses.binary_dice_loss(
            logits, targets, smooth=smooth
        )
    else:
        # apply_softmax=False would run a Python `if jnp.allclose(...)` in
        # optax, which fails under jit; we always pass logits anyway.
        per_image = optax.losses.dice_loss(
            logits, targets, smooth=smooth, apply_softmax=True
        )
    # optax reduces over classes only and leaves the batch axis.
    return jnp.mean(per_image)


def focal_loss(
    logits: jax.typing.ArrayLike,
    targets: jax.typing.ArrayLike,
    *,
    alpha: float = 0.25,
    gamma: float = 2.0,
) -> jax.Array:
    r"""Sigmoid focal loss (Lin et al., 2017), mean over every logit.

    Wraps ``optax.losses.sigmoid_focal_loss``:
    ``-alpha_t * (1 - p_t)**gamma * log(p_t)`` per element, with
    ``p = sigmoid(logit)``.

    For ``C > 1`` the loss is *not* a softmax focal loss: each channel is an
    independent sigmoid against its one-hot target, as in detection
    (RetinaNet). The mean is over ``batch * H * W * C`` elements, so the scale
    is per logit, not per pixel.

    Args:
        logits: Raw outputs, ``[batch, H, W, C]``.
        targets: Binary or one-hot masks, same shape.
        alpha: Weight of positive elements in ``[0, 1]``; negatives get
            ``1 - alpha``.
        gamma: Focusing exponent ``>= 0`` (0 gives alpha-weighted BCE).

    Returns:
        Float32 scalar ``>= 0``.

    Raises:
        ValueError: If the shapes do not follow the convention, or if a
            concrete ``alpha`` is outside ``[0, 1]`` or ``gamma`` is not a
            finite number ``>= 0``.

    Example:
        >>> import jax.numpy as jnp
        >>> logits = jnp.zeros((1, 1, 1, 1))
        >>> targets = jnp.ones((1, 1, 1, 1))
        >>> print(f"{float(focal_loss(logits, targets)):.4f}")  # .25*.25*ln 2
        0.0433
    """
    _check_hyperparameter("alpha", alpha, lambda a: 0.0 <= a <= 1.0, "in [0, 1]")
    # A negative gamma turns (1 - p_t)**gamma into inf for confident pixels.
    _check_hyperparameter("gamma", gamma, _finite_non_negative, "a finite number >= 0")
    logits, targets = _prepare(logits, targets, "focal_loss")
    return jnp.mean(
        optax.losses.sigmoid_focal_loss(
            logits, targets, alpha=alpha, gamma=gamma
        )
    )


def bce_loss(
    logits: jax.typing.ArrayLike, targets: jax.typing.ArrayLike
) -> jax.Array:
    """Binary or categorical cross-entropy, mean over pixels.

    ``C == 1``: ``optax.losses.sigmoid_binary_cross_entropy``, mean over
    ``batch * H * W``. ``C > 1``: ``optax.losses.softmax_cross_entropy`` over
    the channel axis, then mean over ``batch * H * W`` (one term per pixel, not
    per channel).

    Args:
        logits: Raw outputs, ``[batch, H, W, C]``.
        targets: Binary (``C == 1``) or one-hot (``C > 1``) masks, same shape.

    Returns:
        Float32 scalar ``>= 0``.

    Raises:
        ValueError: If the shapes do not follow the convention.

    Example:
        >>> import jax.numpy as jnp
        >>> logits = jnp.zeros((1, 2, 2, 1))
        >>> targets = jnp.ones((1, 2, 2, 1))
        >>> print(f"{float(bce_loss(logits, targets)):.4f}")  # ln 2
        0.6931
    """
    logits, targets = _prepare(logits, targets, "bce_loss")
    if logits.shape[-1] == 1:
        per_element = optax.losses.sigmoid_binary_cross_entropy(logits, targets)
    else:
        per_element = optax.losses.softmax_cross_entropy(logits, targets)
    return jnp.mean(per_element)


def tversky_loss(
    logits: jax.typing.ArrayLike,
    targets: jax.typing.ArrayLike,
    *,
    alpha: float = 0.3,
    beta: float = 0.7,
    smooth: float = 1.0,
) -> jax.Array:
    r"""Tversky loss (Salehi et al., 2017), binary or multi-class.

    Per image and class, with sums over ``H`` and ``W``:

    .. math::
        1 - \frac{TP + s}{TP + \alpha FP + \beta FN + s},

    where ``TP = sum(p * t)``, ``FP = sum(p * (1 - t))``,
    ``FN = sum((1 - p) * t)``, ``p`` is the sigmoid (``C == 1``) or softmax
    (``C > 1``) probability and ``s`` is ``smooth``. Averaged over classes,
    then over the batch. ``alpha = beta = 0.5`` gives :func:`dice_loss`;
    ``beta > alpha`` penalises missed foreground more than spurious
    foreground.

    Args:
        logits: Raw outputs, ``[batch, H, W, C]``.
        targets: Binary (``C == 1``) or one-hot (``C > 1``) masks, same shape.
        alpha: Weight of false positives, ``>= 0``.
        beta: Weight of false negatives, ``>= 0``.
        smooth: Additive smoothing, finite and ``> 0`` (empty masks).

    Returns:
        Float32 scalar.

    Raises:
        ValueError: If the shapes do not follow the convention, or if a
            concrete ``alpha`` or ``beta`` is negative or infinite, or
            ``smooth`` is not a finite number ``> 0`` (the message names the
            argument).

    Example:
        >>> import jax.numpy as jnp
        >>> logits = jnp.full((1, 2, 2, 1), -10.0)  # predicts nothing
        >>> targets = jnp.ones((1, 2, 2, 1))
        >>> print(f"{float(tversky_loss(logits, targets)):.4f}")  # 1-1/(.7*4+1)
        0.7368
    """
    _check_hyperparameter("alpha", alpha, _finite_non_negative, "a finite number >= 0")
    _check_hyperparameter("beta", beta, _finite_non_negative, "a finite number >= 0")
    _check_hyperparameter("smooth", smooth, _finite_positive, "a finite number > 0")
    logits, targets = _prepare(logits, targets, "tversky_loss")
    # optax.losses.dice_loss *is* the Tversky index when alpha != beta (alpha
    # on FP = P - TP, beta on FN = T - TP, same convention as here), and it
    # already picks sigmoid for C == 1, so no hand-written version is needed.
    per_image = optax.losses.dice_loss(
        logits,
        targets,
        smooth=smooth,
        alpha=alpha,
        beta=beta,
        apply_softmax=True,
    )
    return jnp.mean(per_image)


def variance_loss(
    logits: jax.typing.ArrayLike,
    instance_labels: jax.typing.ArrayLike,
    *,
    max_instances: int = 256,
) -> jax.Array:
    r"""Mean within-instance variance of the predicted foreground probability.

    This is the variance term of the variance-constrained cross-entropy of
    Qu et al., "Improving nuclei/gland instance segmentation in histopathology
    images by full resolution neural network and spatial constrained loss",
    MICCAI 2019. For every ground-truth instance ``S_i`` (all pixels of one
    image that carry instance id ``i``):

    .. math::
        \mu_i = \frac{1}{|S_i|} \sum_{x \in S_i} f(x), \qquad
        v_i = \frac{1}{|S_i|} \sum_{x \in S_i} (f(x) - \mu_i)^2, \qquad
        L = \frac{1}{N} \sum_{i=1}^{N} v_i,

    i.e. the population variance (divide by ``|S_i|``) per instance, averaged
    with equal weight per instance over the ``N`` instances present in the
    whole batch. ``f(x)`` is the predicted foreground probability:
    ``sigmoid(logits[..., 0])`` for ``C == 1`` and
    ``1 - softmax(logits)[..., 0]`` for ``C > 1`` (class 0 is background).

    Why this definition: the trainer's "variance" component exists to make
    the prediction inside each object uniform, so an object is not broken
    into holes or fragments by a few low-confidence pixels. The term is zero
    whenever each instance is predicted with one constant probability,
    whatever that value is; pulling the value itself towards 1 is left to
    the dice/focal/bce components. Qu et al. use the probability of each
    pixel's ground-truth class; with ``C > 1`` this uses "not background"
    instead, so splitting an instance between foreground classes (e.g.
    interior vs. boundary) is not penalised, only leaking into background.

    Fixed-size trick (jit needs static shapes, and the number of instances
    varies per image): pixel ``(b, h, w)`` with id ``k`` goes to segment
    ``b * (max_instances + 1) + k``, and per-segment counts, sums and squared
    deviations are computed with ``jax.ops.segment_sum`` over a fixed
    ``batch * (max_instances + 1)`` segments. The per-image offset makes the
    same id in two images two different instances. Segments with no pixels
    (unused ids, and background) are excluded from the average; with no
    instances at all the loss is exactly 0 with zero, finite gradient. The
    variance is computed in two passes (mean first, then squared deviations)
    rather than as ``E[f^2] - E[f]^2``, which cancels catastrophically in
    float32 for near-uniform instances.

    Args:
        logits: Raw outputs, ``[batch, H, W, C]``.
        instance_labels: Integer instance ids, ``[batch, H, W]``; 0 is
            background, ``1..max_instances`` are instances (ids need not be
            contiguous). Ids outside ``[0, max_instances]`` (negative or
            larger than ``max_instances``) are *ignored*, like background,
            rather than clipped, since clipping would merge distinct instances
            and report a spurious variance.
        max_instances: Largest instance id considered per image; sets the
            static number of segments.

    Returns:
        Float32 scalar ``>= 0`` (at most 0.25, the variance of a
        probability).

    Raises:
        ValueError: If shapes disagree, ``instance_labels`` is not an integer
            array, or ``max_instances < 1``.

    Example:
        >>> import jax.numpy as jnp
        >>> logits = jnp.array([0.0, 0.0, 2.0, -2.0]).reshape(1, 2, 2, 1)
        >>> labels = jnp.array([1, 1, 2, 2], jnp.int32).reshape(1, 2, 2)
        >>> # instance 1 is uniform (v=0); instance 2 is sigmoid(+-2) (v=0.1450)
        >>> print(f"{float(variance_loss(logits, labels)):.4f}")
        0.0725
    """
    # Hand-written: optax.losses has no instance-level (per-object) loss.
    if isinstance(max_instances, bool) or not isinstance(max_instances, int):
        raise ValueError(
            f"max_instances must be a Python int, got {max_instances!r}."
        )
    if max_instances < 1:
        raise ValueError(f"max_instances must be >= 1, got {max_instances}.")
    logits = jnp.asarray(logits)
    instance_labels = jnp.asarray(instance_labels)
    if logits.ndim != 4:
        raise ValueError(
            "variance_loss: logits must have shape [batch, H, W, C], got "
            f"shape {logits.shape}."
        )
    if instance_labels.shape != logits.shape[:-1]:
        raise ValueError(
            "variance_loss: instance_labels must have shape [batch, H, W] = "
            f"{logits.shape[:-1]}, got {instance_labels.shape}."
        )
    if not jnp.issubdtype(instance_labels.dtype, jnp.integer):
        raise ValueError(
            "variance_loss: instance_labels must be an integer array, got "
            f"dtype {instance_labels.dtype}."
        )
    logits = logits.astype(jnp.float32)
    batch = logits.shape[0]

    if logits.shape[-1] == 1:
        foreground = jax.nn.sigmoid(logits[..., 0])
    else:
        # Summing the non-background probabilities equals 1 - p_background
        # but keeps precision when p_background is close to 1.
        foreground = jnp.sum(jax.nn.softmax(logits, axis=-1)[..., 1:], axis=-1)

    labels = instance_labels.astype(jnp.int32)
    in_instance = (labels >= 1) & (labels <= max_instances)
    slots = max_instances + 1
    offsets = (jnp.arange(batch, dtype=jnp.int32) * slots)[:, None, None]
    # Background and ignored ids share slot 0 of their image; their weight of
    # 0 keeps them out of every sum, and slot 0 then counts as "absent".
    segment_ids = (offsets + jnp.where(in_instance, labels, 0)).reshape(-1)
    weight = in_instance.astype(jnp.float32).reshape(-1)
    values = foreground.reshape(-1)
    num_segments = batch * slots

    counts = jax.ops.segment_sum(weight, segment_ids, num_segments)
    # max(count, 1) keeps empty segments at 0 / 1 = 0 instead of NaN, in the
    # value and in the gradient.
    safe_counts = jnp.maximum(counts, 1.0)
    means = (
        jax.ops.segment_sum(weight * values, segment_ids, num_segments)
        / safe_counts
    )
    deviations = weight * (values - means[segment_ids])
    variances = (
        jax.ops.segment_sum(deviations * deviations, segment_ids, num_segments)
        / safe_counts
    )
    num_instances = jnp.sum((counts > 0).astype(jnp.float32))
    return jnp.sum(variances) / jnp.maximum(num_instances, 1.0)


def check_loss_names(names: Sequence[str], argument: str = "names") -> tuple[str, ...]:
    """Returns ``names`` as a tuple after checking each is in :data:`LOSS_NAMES`.

    Args:
        names: Loss component names.
        argument: The caller's argument name, for the error message.

    Raises:
        ValueError: If ``names`` is a bare string (it would be iterated as
            single letters) or holds names not in :data:`LOSS_NAMES` (all
            unknown names are listed).

    Example:
        >>> check_loss_names(["dice", "bce"])
        ('dice', 'bce')
    """
    if isinstance(names, str):
        raise ValueError(
            f"{argument} must be a sequence of loss names, got the string "
            f"{names!r}; did you mean ({names!r},)?"
        )
    names = tuple(names)
    unknown = sorted({n for n in names if n not in LOSS_NAMES})
    if unknown:
        raise ValueError(
            f"Unknown loss component name(s) {unknown} in {argument}; expected names "
            f"from {list(LOSS_NAMES)}."
        )
    return names


def loss_components(
    logits: jax.typing.ArrayLike,
    targets: jax.typing.ArrayLike,
    instance_labels: jax.typing.ArrayLike | None = None,
    *,
    names: Sequence[str] = _DEFAULT_COMPONENTS,
) -> dict[str, jax.Array]:
    """Computes the named loss components, each once, with default settings.

    Args:
        logits: Raw outputs, ``[batch, H, W, C]``.
        targets: Binary (``C == 1``) or one-hot (``C > 1``) masks, same shape.
        instance_labels: Integer instance ids ``[batch, H, W]``; required only
            when ``"variance"`` is requested.
        names: Components to compute, a subset of :data:`LOSS_NAMES`.
            Duplicates are computed once.

    Returns:
        Dict from component name to float32 scalar, in the order of
        ``names`` (a dict returned through ``jax.jit`` has sorted keys
        instead); ready for :func:`mixed_loss`.

    Raises:
        ValueError: If ``names`` is a bare string, contains names not in
            :data:`LOSS_NAMES` (all unknown names are listed), or requests
            ``"variance"`` without ``instance_labels``; or if a loss rejects
            the shapes.

    Example:
        >>> import jax.numpy as jnp
        >>> logits = jnp.zeros((1, 2, 2, 1))
        >>> targets = jnp.ones((1, 2, 2, 1))
        >>> sorted(loss_components(logits, targets, names=("dice", "bce")))
        ['bce', 'dice']
    """
    names = check_loss_names(names)
    if "variance" in names and instance_labels is None:
        raise ValueError(
            "The 'variance' component needs instance_labels ([batch, H, W] "
            "integer instance ids); pass them or drop 'variance' from names."
        )

    components: dict[str, jax.Array] = {}
    for name in names:
        if name in components:
            continue
        if name == "dice":
            components[name] = dice_loss(logits, targets)
        elif name == "focal":
            components[name] = focal_loss(logits, targets)
        elif name == "bce":
            components[name] = bce_loss(logits, targets)
        elif name == "tversky":
            components[name] = tversky_loss(logits, targets)
        else:  # "variance"; names were validated above.
            components[name] = variance_loss(logits, instance_labels)
    return components


def mixed_loss(
    components: Mapping[str, jax.Array],
    weights: Mapping[str, jax.typing.ArrayLike],
) -> jax.Array:
    """Weighted sum ``sum_k weights[k] * components[k]`` of scalar losses.

    Keys are summed in sorted order so the float32 result does not depend on
    dict insertion order (which can differ between the loss side and an
    optimizer state). ``weights`` may be a dict of traced scalar arrays, so
    changing the weights between jitted steps does not retrace.

    Args:
        components: Scalar losses by name, e.g. from :func:`loss_components`.
        weights: Scalar weights by name, with exactly the same keys.

    Returns:
        Float32 scalar (0 if both mappings are empty).

    Raises:
        ValueError: If the key sets differ (the message lists the keys missing
            from ``weights`` and the extra keys it has), or if a component or
            weight is not a scalar.

    Example:
        >>> import jax.numpy as jnp
        >>> components = {"dice": jnp.float32(0.5), "bce": jnp.float32(2.0)}
        >>> weights = {"dice": jnp.float32(1.0), "bce": jnp.float32(0.25)}
        >>> print(float(mixed_loss(components, weights)))
        1.0
    """
    missing = sorted(set(components) - set(weights))
    extra = sorted(set(weights) - set(components))
    if missing or extra:
        raise ValueError(
            "weights must have exactly the keys of components; missing from "
            f"weights: {missing}, extra in weights: {extra}."
        )
    total = jnp.zeros((), jnp.float32)
    for key in sorted(components):
        component = jnp.asarray(components[key])
        weight = jnp.asarray(weights[key])
        # A non-scalar here would silently broadcast the "scalar" loss into
        # an array (or trip rank-promotion checks far from the cause).
        if component.shape != () or weight.shape != ():
            raise ValueError(
                f"components[{key!r}] and weights[{key!r}] must be scalars, "
                f"got shapes {component.shape} and {weight.shape}."
            )
        total = total + weight.astype(jnp.float32) * component.astype(
            jnp.float32
        )
    return total
