"""Tests for adaptive_optax.segmentation.losses.

Expected values are recomputed by hand in numpy (float64) on tiny arrays, so a
change in optax's conventions (reduction axes, smoothing, alpha weighting)
shows up here rather than as a silent change in the trainer's loss scale.
"""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from adaptive_optax.segmentation import losses

# Tolerance for float32 results against float64 references.
RTOL = 1e-5
ATOL = 1e-6


def _jit(fn, *args, **kwargs):
    """Runs ``fn`` under jit with ``kwargs`` baked in as Python constants.

    One XLA compile is much cheaper than eager op-by-op dispatch of every
    primitive, which keeps this file fast; eager is compared against jit once,
    in test_eager_loss_matches_jitted_loss_components.
    """
    return jax.jit(functools.partial(fn, **kwargs))(*args)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


# Binary case: 2 images of 2x2 pixels, one channel.
BIN_LOGITS = np.array(
    [[[2.0, -1.0], [0.5, 3.0]], [[-2.0, 1.0], [0.0, -0.5]]]
)[..., None]
BIN_TARGETS = np.array([[[1.0, 0.0], [0.0, 1.0]], [[0.0, 1.0], [1.0, 0.0]]])[
    ..., None
]

# Multi-class case: 2 images of 2x2 pixels, 3 classes (class 0 = background).
MC_LOGITS = np.array(
    [
        [[[2.0, 0.5, -1.0], [0.0, 1.0, 0.3]], [[-0.5, 0.2, 1.5], [1.0, 1.0, 1.0]]],
        [[[0.1, -0.3, 0.7], [2.5, -1.0, 0.0]], [[0.0, 0.0, 3.0], [-1.0, 2.0, 0.5]]],
    ]
)
MC_CLASSES = np.array([[[0, 1], [2, 1]], [[2, 0], [2, 1]]])
MC_TARGETS = np.eye(3)[MC_CLASSES]

CASES = {
    "binary": (BIN_LOGITS, BIN_TARGETS),
    "multiclass": (MC_LOGITS, MC_TARGETS),
}


def _probs(logits: np.ndarray) -> np.ndarray:
    return _sigmoid(logits) if logits.shape[-1] == 1 else _softmax(logits)


def _tversky_reference(
    logits: np.ndarray,
    targets: np.ndarray,
    alpha: float,
    beta: float,
    smooth: float,
) -> float:
    p = _probs(logits)
    tp = (p * targets).sum(axis=(1, 2))
    fp = (p * (1 - targets)).sum(axis=(1, 2))
    fn = ((1 - p) * targets).sum(axis=(1, 2))
    per_class = 1 - (tp + smooth) / (tp + alpha * fp + beta * fn + smooth)
    return float(per_class.mean())


# --------------------------------------------------------------------------
# Hand-computed values.
# --------------------------------------------------------------------------


def test_dice_binary_single_image_by_hand():
    logits = np.array([2.0, -1.0, 0.0, 3.0]).reshape(1, 2, 2, 1)
    targets = np.array([1.0, 0.0, 0.0, 1.0]).reshape(1, 2, 2, 1)
    p = _sigmoid(logits).ravel()
    t = targets.ravel()
    inter, p_sum, t_sum = (p * t).sum(), p.sum(), t.sum()
    # optax's form: 1 - (I + s) / (I + (P - I)/2 + (T - I)/2 + s), s = 1.
    denom = inter + 0.5 * (p_sum - inter) + 0.5 * (t_sum - inter) + 1
    expected = 1 - (inter + 1) / denom
    np.testing.assert_allclose(
        _jit(losses.dice_loss, logits, targets), expected, rtol=RTOL
    )
    # Same thing in the textbook form with smoothing 2 * s.
    np.testing.assert_allclose(
        expected, 1 - (2 * inter + 2) / (p_sum + t_sum + 2), rtol=1e-12
    )


@pytest.mark.parametrize("case", CASES)
def test_dice_by_hand(case):
    logits, targets = CASES[case]
    p = _probs(logits)
    inter = (p * targets).sum(axis=(1, 2))
    denom = p.sum(axis=(1, 2)) + targets.sum(axis=(1, 2))
    smooth = 0.5
    expected = np.mean(1 - (2 * inter + 2 * smooth) / (denom + 2 * smooth))
    np.testing.assert_allclose(
        _jit(losses.dice_loss, logits, targets, smooth=smooth), expected, rtol=RTOL
    )


@pytest.mark.parametrize("case", CASES)
def test_focal_by_hand(case):
    logits, targets = CASES[case]
    alpha, gamma = 0.25, 2.0
    p = _sigmoid(logits)
    p_t = np.where(targets == 1, p, 1 - p)
    alpha_t = np.where(targets == 1, alpha, 1 - alpha)
    expected = np.mean(-alpha_t * (1 - p_t) ** gamma * np.log(p_t))
    np.testing.assert_allclose(
        _jit(losses.focal_loss, logits, targets), expected, rtol=RTOL
    )


def test_focal_single_element_by_hand():
    # p = 0.5, y = 1: 0.25 * 0.5**2 * ln 2.
    np.testing.assert_allclose(
        _jit(losses.focal_loss, np.zeros((1, 1, 1, 1)), np.ones((1, 1, 1, 1))),
        0.25 * 0.25 * np.log(2.0),
        rtol=RTOL,
    )


def test_bce_binary_by_hand():
    logits, targets = BIN_LOGITS, BIN_TARGETS
    p = _sigmoid(logits)
    expected = np.mean(-(targets * np.log(p) + (1 - targets) * np.log(1 - p)))
    np.testing.assert_allclose(
        _jit(losses.bce_loss, logits, targets), expected, rtol=RTOL
    )


def test_bce_multiclass_is_mean_over_pixels_not_channels():
    logits, targets = MC_LOGITS, MC_TARGETS
    per_pixel = -(targets * np.log(_softmax(logits))).sum(axis=-1)
    assert per_pixel.shape == (2, 2, 2)
    np.testing.assert_allclose(
        _jit(losses.bce_loss, logits, targets), per_pixel.mean(), rtol=RTOL
    )


def test_tversky_binary_single_image_by_hand():
    logits = np.array([-10.0, -10.0, -10.0, -10.0]).reshape(1, 2, 2, 1)
    targets = np.ones((1, 2, 2, 1))
    # Nothing predicted: TP ~ 0, FN ~ 4, so 1 - 1 / (0.7 * 4 + 1).
    np.testing.assert_allclose(
        _jit(losses.tversky_loss, logits, targets), 1 - 1 / 3.8, rtol=1e-3
    )


@pytest.mark.parametrize("case", CASES)
def test_tversky_by_hand(case):
    logits, targets = CASES[case]
    expected = _tversky_reference(logits, targets, 0.3, 0.7, 1.0)
    np.testing.assert_allclose(
        _jit(losses.tversky_loss, logits, targets), expected, rtol=RTOL
    )


@pytest.mark.parametrize("case", CASES)
def test_tversky_alpha_weights_false_positives(case):
    logits, targets = CASES[case]
    expected = _tversky_reference(logits, targets, 0.9, 0.1, 0.5)
    np.testing.assert_allclose(
        _jit(losses.tversky_loss, logits, targets, alpha=0.9, beta=0.1, smooth=0.5),
        expected,
        rtol=RTOL,
    )


@pytest.mark.parametrize("case", CASES)
def test_tversky_half_half_is_dice(case):
    logits, targets = CASES[case]
    np.testing.assert_allclose(
        _jit(losses.tversky_loss, logits, targets, alpha=0.5, beta=0.5),
        _jit(losses.dice_loss, logits, targets),
        rtol=RTOL,
    )


@pytest.mark.parametrize("name", ["alpha", "beta"])
@pytest.mark.parametrize("value", [-0.1, float("inf")])
def test_tversky_rejects_negative_or_infinite_weights(name, value):
    with pytest.raises(ValueError, match=name):
        losses.tversky_loss(BIN_LOGITS, BIN_TARGETS, **{name: value})


@pytest.mark.parametrize("loss", [losses.dice_loss, losses.tversky_loss])
@pytest.mark.parametrize("smooth", [0.0, -1.0, float("inf"), float("nan")])
def test_smoothing_must_be_finite_and_positive(loss, smooth):
    # smooth = 0 would give 0/0 for an empty target and an empty prediction.
    with pytest.raises(ValueError, match=r"smooth must be a finite number > 0, got"):
        loss(BIN_LOGITS, BIN_TARGETS, smooth=smooth)


@pytest.mark.parametrize(
    "kwargs, name", [({"alpha": 1.5}, "alpha"), ({"gamma": -1.0}, "gamma"),
                     ({"gamma": float("inf")}, "gamma")]
)
def test_focal_rejects_bad_hyperparameters(kwargs, name):
    with pytest.raises(ValueError, match=name):
        losses.focal_loss(BIN_LOGITS, BIN_TARGETS, **kwargs)


def test_traced_hyperparameters_are_accepted():
    # An adaptive trainer may pass alpha as a traced array; validation must
    # not force a host sync or fail under jit.
    tversky = jax.jit(
        lambda a: losses.tversky_loss(BIN_LOGITS, BIN_TARGETS, alpha=a)
    )
    np.testing.assert_allclose(
        tversky(jnp.float32(0.3)),
        _tversky_reference(BIN_LOGITS, BIN_TARGETS, 0.3, 0.7, 1.0),
        rtol=RTOL,
    )
    focal = jax.jit(
        lambda a: losses.focal_loss(
            np.zeros((1, 1, 1, 1)), np.ones((1, 1, 1, 1)), alpha=a
        )
    )
    # p = 0.5, y = 1: alpha * 0.5**2 * ln 2.
    np.testing.assert_allclose(
        focal(jnp.float32(0.4)), 0.4 * 0.25 * np.log(2.0), rtol=RTOL
    )


# --------------------------------------------------------------------------
# variance_loss
# --------------------------------------------------------------------------


def test_variance_uniform_inside_each_instance_is_zero():
    # Different constant per instance: only within-instance spread counts.
    logits = np.array([[1.0, 1.0, -3.0], [1.0, 5.0, -3.0]])[None, ..., None]
    labels = np.array([[1, 1, 2], [1, 0, 2]], np.int32)[None]
    np.testing.assert_allclose(
        _jit(losses.variance_loss, logits, labels), 0.0, atol=ATOL
    )


def test_variance_binary_by_hand():
    logits = np.array([[0.0, 2.0, 1.0], [-1.0, 4.0, 7.0]])[None, ..., None]
    labels = np.array([[1, 1, 2], [1, 2, 0]], np.int32)[None]
    p = _sigmoid(logits[0, ..., 0])
    inst1 = p[[0, 0, 1], [0, 1, 0]]
    inst2 = p[[0, 1], [2, 1]]
    # Population variance (ddof=0) per instance, equal weight per instance;
    # the background pixel (logit 7) is ignored.
    expected = (np.var(inst1) + np.var(inst2)) / 2
    np.testing.assert_allclose(
        _jit(losses.variance_loss, logits, labels), expected, rtol=RTOL
    )


def test_variance_multiclass_uses_one_minus_background_by_hand():
    logits = MC_LOGITS[:1]
    labels = np.array([[1, 1], [1, 0]], np.int32)[None]
    foreground = 1 - _softmax(logits)[0, ..., 0]
    expected = np.var(foreground[[0, 0, 1], [0, 1, 0]])
    np.testing.assert_allclose(
        _jit(losses.variance_loss, logits, labels), expected, rtol=RTOL
    )


def test_variance_multiclass_ignores_split_between_foreground_classes():
    # Pixel 0 is "class 1", pixel 1 is "class 2", both with p(bg) = softmax
    # of the same margin, so the foreground probability is uniform.
    logits = np.array([[[0.0, 3.0, -1.0], [0.0, -1.0, 3.0]]])[None]
    labels = np.array([[1, 1]], np.int32)[None]
    np.testing.assert_allclose(
        _jit(losses.variance_loss, logits, labels), 0.0, atol=ATOL
    )


def test_variance_empty_labels_is_zero_with_finite_gradient():
    logits = jnp.asarray(BIN_LOGITS, jnp.float32)
    labels = jnp.zeros((2, 2, 2), jnp.int32)
    value, grad = jax.jit(jax.value_and_grad(losses.variance_loss))(logits, labels)
    assert float(value) == 0.0
    assert bool(jnp.all(jnp.isfinite(grad)))
    chex.assert_trees_all_close(grad, jnp.zeros_like(grad))


def test_variance_same_id_in_two_images_are_different_instances():
    # Each image's instance 1 is uniform, but at a different value; merging
    # them across the batch would give a large variance.
    logits = np.stack(
        [np.full((2, 2, 1), 3.0), np.full((2, 2, 1), -3.0)], axis=0
    )
    labels = np.ones((2, 2, 2), np.int32)
    np.testing.assert_allclose(
        _jit(losses.variance_loss, logits, labels), 0.0, atol=ATOL
    )

    # And the average is over instances in the whole batch: image 0 has one
    # non-uniform instance, image 1 has one uniform instance.
    logits = np.array(
        [[[0.0, 2.0], [0.0, 2.0]], [[1.0, 1.0], [1.0, 1.0]]]
    )[..., None]
    p = _sigmoid(np.array([0.0, 2.0, 0.0, 2.0]))
    np.testing.assert_allclose(
        _jit(losses.variance_loss, logits, labels), np.var(p) / 2, rtol=RTOL
    )


def test_variance_ignores_ids_above_max_instances_and_negative_ids():
    logits = np.array([[0.0, 2.0, -4.0, 5.0]])[None, ..., None]
    labels = np.array([[1, 1, 2, -1]], np.int32)[None]
    p = _sigmoid(np.array([0.0, 2.0]))
    # With max_instances=1, id 2 is ignored (not clipped into instance 1,
    # which would add the -4 logit to it).
    np.testing.assert_allclose(
        _jit(losses.variance_loss, logits, labels, max_instances=1),
        np.var(p),
        rtol=RTOL,
    )


def test_variance_input_validation():
    logits = np.zeros((1, 2, 2, 1))
    with pytest.raises(ValueError, match="instance_labels must have shape"):
        losses.variance_loss(logits, np.zeros((1, 2, 3), np.int32))
    with pytest.raises(ValueError, match="integer"):
        losses.variance_loss(logits, np.zeros((1, 2, 2), np.float32))
    with pytest.raises(ValueError, match="max_instances"):
        losses.variance_loss(
            logits, np.zeros((1, 2, 2), np.int32), max_instances=0
        )


# --------------------------------------------------------------------------
# Properties shared by every loss.
# --------------------------------------------------------------------------

VARIANCE_LABELS = np.array([[[1, 1], [2, 0]], [[1, 3], [3, 3]]], np.int32)


LOSS_FNS = {
    "dice": losses.dice_loss,
    "focal": losses.focal_loss,
    "bce": losses.bce_loss,
    "tversky": losses.tversky_loss,
    "variance": lambda x, t: losses.variance_loss(x, VARIANCE_LABELS),
}
assert set(LOSS_FNS) == set(losses.LOSS_NAMES)


def _values_and_grads(logits, targets):
    """{name: (value, d value / d logits)} for every loss, in one program.

    One jitted program for all losses compiles much faster than one per loss.
    """
    return {
        name: jax.value_and_grad(fn)(logits, targets)
        for name, fn in LOSS_FNS.items()
    }


@pytest.mark.parametrize("case", CASES)
def test_finite_value_and_gradient_at_extreme_logits(case):
    logits, targets = CASES[case]
    # Confidently right and confidently wrong pixels at +-1e4.
    extreme = jnp.asarray(np.sign(logits - 0.25) * 1e4, jnp.float32)
    results = jax.jit(_values_and_grads)(extreme, targets)
    bad = sorted(
        name
        for name, (value, grad) in results.items()
        if not (np.isfinite(value) and np.all(np.isfinite(grad)))
    )
    assert not bad, f"non-finite value or gradient at +-1e4 for {bad}"


# One compiled program per input signature, shared by the tests below.
_ALL_COMPONENTS = jax.jit(
    functools.partial(
        losses.loss_components,
        instance_labels=VARIANCE_LABELS,
        names=losses.LOSS_NAMES,
    )
)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("loss", sorted(LOSS_FNS))
def test_eager_loss_matches_jitted_loss_components(loss, case):
    # Covers both "jit == eager" and "loss_components computes the same
    # thing as the individual function" with one compile per case.
    logits, targets = CASES[case]
    eager = LOSS_FNS[loss](logits, targets)
    jitted = _ALL_COMPONENTS(logits, targets)[loss]
    chex.assert_shape([eager, jitted], ())
    assert eager.dtype == jitted.dtype == jnp.float32
    np.testing.assert_allclose(jitted, eager, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("case", CASES)
def test_bfloat16_logits_are_computed_in_float32(case):
    logits, targets = CASES[case]
    # Same bf16 values cast up by the caller: if a loss computed in bf16
    # internally, its reductions would round and this would not match.
    low = jnp.asarray(logits, jnp.bfloat16)
    out = _ALL_COMPONENTS(low, targets)
    chex.assert_trees_all_equal_dtypes(
        out, {name: jnp.zeros((), jnp.float32) for name in losses.LOSS_NAMES}
    )
    chex.assert_trees_all_close(
        out,
        _ALL_COMPONENTS(low.astype(jnp.float32), targets),
        rtol=RTOL,
        atol=ATOL,
    )


@pytest.mark.parametrize(
    "fn", [losses.dice_loss, losses.focal_loss, losses.bce_loss, losses.tversky_loss]
)
def test_shape_errors(fn):
    with pytest.raises(ValueError, match="same shape"):
        fn(np.zeros((1, 2, 2, 1)), np.zeros((1, 2, 2, 2)))
    with pytest.raises(ValueError, match=r"\[batch, H, W, C\]"):
        fn(np.zeros((2, 2, 1)), np.zeros((2, 2, 1)))


# --------------------------------------------------------------------------
# loss_components and mixed_loss
# --------------------------------------------------------------------------


def test_loss_components_default_names_and_duplicates():
    comps = losses.loss_components(BIN_LOGITS, BIN_TARGETS, VARIANCE_LABELS)
    assert list(comps) == ["dice", "focal", "variance", "bce"]
    comps = losses.loss_components(BIN_LOGITS, BIN_TARGETS, names=("bce", "bce"))
    assert list(comps) == ["bce"]


def test_loss_components_errors():
    with pytest.raises(ValueError, match=r"\['cldice', 'lovasz'\]"):
        losses.loss_components(
            BIN_LOGITS, BIN_TARGETS, names=("dice", "lovasz", "cldice")
        )
    with pytest.raises(ValueError, match="instance_labels"):
        losses.loss_components(BIN_LOGITS, BIN_TARGETS, names=("dice", "variance"))
    with pytest.raises(ValueError, match="sequence"):
        losses.loss_components(BIN_LOGITS, BIN_TARGETS, names="dice")


def test_mixed_loss_value():
    comps = {
        "dice": jnp.float32(0.5),
        "focal": jnp.float32(0.1),
        "bce": jnp.float32(2.0),
    }
    # Mixed weight types, and a key order that differs from comps.
    weights = {
        "bce": 0.25,
        "dice": jnp.float32(1.0),
        "focal": jnp.array(3.0, jnp.bfloat16),
    }
    out = losses.mixed_loss(comps, weights)
    assert out.dtype == jnp.float32
    np.testing.assert_allclose(
        out, 0.5 * 1.0 + 0.1 * 3.0 + 2.0 * 0.25, rtol=RTOL
    )


def test_mixed_loss_key_errors_name_the_keys():
    comps = {"dice": jnp.float32(1.0), "variance": jnp.float32(1.0)}
    with pytest.raises(ValueError, match=r"missing from weights: \['variance'\]"):
        losses.mixed_loss(comps, {"dice": 1.0})
    with pytest.raises(ValueError, match=r"extra in weights: \['tversky'\]"):
        losses.mixed_loss(comps, {"dice": 1.0, "variance": 1.0, "tversky": 1.0})
    both = r"missing from weights: \['variance'\].*extra in weights: \['bce'\]"
    with pytest.raises(ValueError, match=both):
        losses.mixed_loss(comps, {"dice": 1.0, "bce": 1.0})


def test_mixed_loss_rejects_non_scalar_weight():
    with pytest.raises(ValueError, match="scalars"):
        losses.mixed_loss({"dice": jnp.float32(1.0)}, {"dice": jnp.ones((2,))})


def test_mixed_loss_under_jit_with_weight_dict_and_grad():
    labels = jnp.asarray(VARIANCE_LABELS)

    @jax.jit
    @chex.assert_max_traces(n=1)
    def step(logits, weights):
        def total(x):
            comps = losses.loss_components(x, MC_TARGETS, labels)
            return losses.mixed_loss(comps, weights)

        return jax.value_and_grad(total)(logits)

    logits = jnp.asarray(MC_LOGITS, jnp.float32)
    comps = _ALL_COMPONENTS(logits, MC_TARGETS)
    for w in (
        {"dice": 1.0, "focal": 0.5, "variance": 2.0, "bce": 0.1},
        {"dice": 0.0, "focal": 3.0, "variance": 0.0, "bce": 1.0},
    ):
        weights = {k: jnp.float32(v) for k, v in w.items()}
        value, grad = step(logits, weights)
        expected = sum(w[k] * float(comps[k]) for k in w)
        np.testing.assert_allclose(value, expected, rtol=RTOL)
        assert bool(jnp.all(jnp.isfinite(grad)))


def test_variance_matches_per_instance_loop_on_random_batch():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 5, 5, 3)) * 3
    labels = rng.integers(0, 5, size=(2, 5, 5)).astype(np.int32)
    foreground = 1 - _softmax(logits)[..., 0]
    variances = [
        np.var(foreground[b][labels[b] == k])
        for b in range(2)
        for k in range(1, 5)
        if np.any(labels[b] == k)
    ]
    np.testing.assert_allclose(
        _jit(losses.variance_loss, logits, labels, max_instances=8),
        np.mean(variances),
        rtol=RTOL,
    )
