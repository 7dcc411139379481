"""Segmentation metrics: per-class Dice and IoU from confusion counts.

Counts are summed over batches first and turned into scores once, so a
data set's Dice is the Dice of all its pixels, not a mean of batch scores.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def confusion_counts(
    logits: jax.Array, targets: jax.Array, example_weights: jax.Array | None = None
) -> jax.Array:
    """Per-class ``[intersection, predicted, target]`` pixel counts.

    Args:
        logits: ``[batch, H, W, C]`` raw outputs; ``C == 1`` thresholds the
            sigmoid at 0.5 (logit 0), ``C > 1`` takes the argmax.
        targets: Binary (``C == 1``) or one-hot (``C > 1``) masks, same shape.
        example_weights: Optional ``[batch]`` weights of the examples; 0 leaves
            an example out (the padding of a data set's last batch).

    Returns:
        float32 ``[C, 3]`` counts.

    Example:
        >>> logits = jnp.array([[[[1.0], [-1.0]]]])
        >>> targets = jnp.array([[[[1.0], [1.0]]]])
        >>> confusion_counts(logits, targets).tolist()
        [[1.0, 1.0, 2.0]]
    """
    if logits.shape != targets.shape or logits.ndim != 4:
        raise ValueError("logits and targets must both be [batch, H, W, C], got "
                         f"{logits.shape} and {targets.shape}.")
    classes = logits.shape[-1]
    if classes == 1:
        pred = (logits > 0).astype(jnp.float32)
    else:
        pred = jax.nn.one_hot(jnp.argmax(logits, axis=-1), classes, dtype=jnp.float32)
    target = (targets > 0.5).astype(jnp.float32)
    if example_weights is not None:
        if jnp.shape(example_weights) != logits.shape[:1]:
            raise ValueError(f"example_weights must have shape {logits.shape[:1]}, got "
                             f"{jnp.shape(example_weights)}.")
        w = jnp.asarray(example_weights, jnp.float32)[:, None, None, None]
        pred, target = pred * w, target * w
    axes = (0, 1, 2)
    return jnp.stack([jnp.sum(pred * target, axes), jnp.sum(pred, axes), jnp.sum(target, axes)],
                     axis=-1)


def dice_iou(counts) -> tuple[np.ndarray, np.ndarray]:
    """Per-class Dice and IoU from summed :func:`confusion_counts`.

    A class absent from both prediction and target scores 1 (nothing to find,
    nothing wrongly found).

    Args:
        counts: ``[C, 3]`` counts.

    Returns:
        ``(dice, iou)``, float64 arrays of shape ``[C]``.

    Example:
        >>> dice, iou = dice_iou(np.array([[1.0, 1.0, 2.0]]))
        >>> round(float(dice[0]), 4), round(float(iou[0]), 4)
        (0.6667, 0.5)
    """
    counts = np.asarray(counts, np.float64)
    inter, pred, target = counts[..., 0], counts[..., 1], counts[..., 2]
    union = pred + target - inter
    dice = np.where(pred + target > 0, 2 * inter / np.maximum(pred + target, 1e-12), 1.0)
    iou = np.where(union > 0, inter / np.maximum(union, 1e-12), 1.0)
    return dice, iou
