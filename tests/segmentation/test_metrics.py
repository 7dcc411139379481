"""Dice/IoU from confusion counts."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from adaptive_optax.segmentation.metrics import confusion_counts, dice_iou


def test_binary_counts_and_scores_by_hand():
    logits = jnp.array([2.0, -1.0, 0.5, -3.0]).reshape(1, 2, 2, 1)
    targets = jnp.array([1.0, 1.0, 0.0, 0.0]).reshape(1, 2, 2, 1)
    counts = np.asarray(confusion_counts(logits, targets))
    np.testing.assert_array_equal(counts, [[1.0, 2.0, 2.0]])  # TP 1, predicted 2, target 2
    dice, iou = dice_iou(counts)
    np.testing.assert_allclose(dice, [0.5])
    np.testing.assert_allclose(iou, [1 / 3])


def test_multiclass_uses_argmax():
    logits = jnp.array([[5.0, 0.0, 0.0], [0.0, 5.0, 0.0]]).reshape(1, 1, 2, 3)
    targets = jnp.array([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]]).reshape(1, 1, 2, 3)
    counts = np.asarray(confusion_counts(logits, targets))
    np.testing.assert_array_equal(counts, [[1, 1, 1], [0, 1, 0], [0, 0, 1]])
    dice, iou = dice_iou(counts)
    np.testing.assert_allclose(dice, [1.0, 0.0, 0.0])
    np.testing.assert_allclose(iou, [1.0, 0.0, 0.0])


def test_absent_class_scores_one():
    dice, iou = dice_iou(np.zeros((1, 3)))
    assert dice[0] == 1.0 and iou[0] == 1.0


def test_counts_sum_over_batches_equals_whole():
    rng = np.random.default_rng(0)
    logits = jnp.asarray(rng.normal(size=(4, 8, 8, 1)), jnp.float32)
    targets = jnp.asarray(rng.random((4, 8, 8, 1)) > 0.5, jnp.float32)
    whole = confusion_counts(logits, targets)
    parts = confusion_counts(logits[:2], targets[:2]) + confusion_counts(logits[2:], targets[2:])
    np.testing.assert_allclose(whole, parts)


def test_shape_mismatch_raises():
    with pytest.raises(ValueError, match="logits and targets"):
        confusion_counts(jnp.zeros((1, 2, 2, 1)), jnp.zeros((1, 2, 2, 2)))


def test_example_weights_leave_examples_out():
    rng = np.random.default_rng(1)
    logits = jnp.asarray(rng.normal(size=(3, 4, 4, 2)), jnp.float32)
    targets = jax.nn.one_hot(rng.integers(0, 2, size=(3, 4, 4)), 2)
    weighted = confusion_counts(logits, targets, jnp.array([1.0, 0.0, 1.0]))
    kept = confusion_counts(logits[::2], targets[::2])
    np.testing.assert_allclose(weighted, kept)
    with pytest.raises(ValueError, match=r"example_weights must have shape \(3,\)"):
        confusion_counts(logits, targets, jnp.ones(2))
