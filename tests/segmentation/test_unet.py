"""Tests for adaptive_optax.segmentation.unet: shapes, validation, precision, nnx plumbing.

On CPU, eager parameter initialisation compiles one small XLA program per
parameter shape, and threefry programs are slow to compile; so the tests use
``rbg`` keys, reuse a few widths (shared shapes hit the compile cache) and
share models between tests through :func:`build` where nothing mutates them.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from adaptive_optax.segmentation.unet import UNet, count_params, group_count


def rngs(seed: int = 0) -> nnx.Rngs:
    return nnx.Rngs(jax.random.key(seed, impl="rbg"))


@functools.cache
def build(**kwargs: Any) -> UNet:
    """A UNet shared between tests: do not change its parameters or its mode."""
    return UNet(rngs=rngs(), **kwargs)


def images(batch: int = 2, size: int = 16, channels: int = 1, seed: int = 0) -> jax.Array:
    return jax.random.normal(jax.random.key(seed), (batch, size, size, channels))


# Depth 3 first: eager op compilations are cached by shape, and the shallower
# networks of the same width reuse all of its shapes.
@pytest.mark.parametrize(
    "depth, base_width", [(3, 4), (2, 4), (1, 4), (0, 4), (0, 1), (0, 3), (1, 6)]
)
def test_output_shape_for_depths_and_widths(depth, base_width):
    model = build(depth=depth, base_width=base_width)
    logits = model(images(size=16))
    assert logits.shape == (2, 16, 16, 1)
    assert logits.dtype == jnp.float32
    assert bool(jnp.isfinite(logits).all())


@pytest.mark.parametrize("num_classes", [1, 3])
@pytest.mark.parametrize("norm", ["batch", "group", None])
def test_output_shape_for_classes_and_norms(num_classes, norm):
    model = build(in_channels=2, num_classes=num_classes, depth=2, base_width=4, norm=norm)
    # Non-square input: H and W are checked independently.
    x = jax.random.normal(jax.random.key(0), (2, 16, 8, 2))
    logits = model(x)
    assert logits.shape == (2, 16, 8, num_classes)
    assert bool(jnp.isfinite(logits).all())


@pytest.mark.parametrize("norm", ["batch", "group", None])
def test_bfloat16_compute_gives_finite_float32_logits(norm):
    model = build(depth=1, base_width=4, norm=norm, dtype=jnp.bfloat16)
    logits = model(images())
    assert logits.dtype == jnp.float32
    assert bool(jnp.isfinite(logits).all())
    # Parameters stay float32 (param_dtype), close to the float32 network.
    params = jax.tree.leaves(nnx.state(model, nnx.Param))
    assert all(p.dtype == jnp.float32 for p in params)
    reference = build(depth=1, base_width=4, norm=norm)(images())
    # bf16 keeps ~3 significant digits; a loose bound still catches garbage.
    tolerance = 0.1 * float(jnp.abs(reference).max()) + 0.05
    np.testing.assert_allclose(logits, reference, atol=tolerance)
    # ... and the computation really is bf16: every convolution is set to it,
    # and the logits are not the float32 network's to the bit.
    convs = [m for _, m in nnx.iter_graph(model) if isinstance(m, (nnx.Conv, nnx.ConvTranspose))]
    assert convs and all(c.dtype == jnp.bfloat16 for c in convs)
    assert not np.array_equal(np.asarray(logits), np.asarray(reference))


def test_bfloat16_params():
    model = UNet(
        depth=1, base_width=4, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16, rngs=rngs()
    )
    params = jax.tree.leaves(nnx.state(model, nnx.Param))
    assert all(p.dtype == jnp.bfloat16 for p in params)
    assert model(images()).dtype == jnp.float32


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"depth": -1}, "depth"),
        ({"base_width": 0}, "base_width"),
        ({"in_channels": 0}, "in_channels"),
        ({"num_classes": 0}, "num_classes"),
    ],
)
def test_bad_int_args_raise(kwargs, name):
    with pytest.raises(ValueError, match=name):
        UNet(rngs=rngs(), **kwargs)


def test_bad_norm_lists_allowed_values():
    with pytest.raises(ValueError, match=r"norm.*'batch', 'group', None"):
        UNet(norm="layer", rngs=rngs())


def test_non_int_depth_raises_type_error():
    with pytest.raises(TypeError, match="depth"):
        UNet(depth=2.0, rngs=rngs())  # type: ignore[arg-type]


@pytest.mark.parametrize("shape", [(1, 18, 16, 1), (1, 16, 18, 1)])
def test_indivisible_spatial_size_raises(shape):
    model = build(depth=2, base_width=4)
    with pytest.raises(ValueError, match=r"divisible by 2\*\*depth = 4"):
        model(jnp.zeros(shape))


def test_wrong_channels_or_rank_raise():
    model = build(depth=1, base_width=4)
    with pytest.raises(ValueError, match="input channels"):
        model(jnp.zeros((1, 8, 8, 3)))
    with pytest.raises(ValueError, match=r"\[B, H, W, C\]"):
        model(jnp.zeros((8, 8, 1)))


def test_jit_through_split_merge_matches_eager():
    model = build(depth=2, base_width=4)
    graphdef, state = nnx.split(model)

    @jax.jit
    def forward(state, x):
        return nnx.merge(graphdef, state)(x)

    x = images()
    np.testing.assert_allclose(forward(state, x), model(x), rtol=1e-5, atol=1e-5)
    # Indivisible shapes fail at trace time inside jit too.
    with pytest.raises(ValueError, match="divisible"):
        forward(state, jnp.zeros((1, 10, 8, 1)))


def test_gradients_are_finite_and_nonzero():
    model = UNet(depth=1, base_width=4, rngs=rngs())
    x = images()

    def loss(model):
        return jnp.mean(model(x) ** 2)

    # Jitted: one compilation is faster than compiling every backward op.
    grads = nnx.jit(nnx.grad(loss))(model)
    leaves = jax.tree.leaves(grads)
    assert leaves and all(bool(jnp.isfinite(g).all()) for g in leaves)
    assert sum(float(jnp.abs(g).sum()) for g in leaves) > 0


def test_batchnorm_train_eval_toggle():
    model = UNet(depth=1, base_width=4, norm="batch", rngs=rngs())
    norm = model.bottom.norms[0]
    assert norm.use_running_average is False  # created in training mode
    forward = nnx.jit(lambda m, x: m(x))

    before = np.asarray(norm.mean.value)
    forward(model, images(seed=1) + 3.0)
    after_train = np.asarray(norm.mean.value)
    assert not np.allclose(before, after_train)  # running stats updated

    model.eval()
    assert all(
        m.use_running_average for _, m in nnx.iter_modules(model) if isinstance(m, nnx.BatchNorm)
    )
    x = images(seed=2)
    out_full = forward(model, x)
    np.testing.assert_array_equal(np.asarray(norm.mean.value), after_train)
    # With running averages an example's output does not depend on its batch.
    np.testing.assert_allclose(forward(model, x[:1]), out_full[:1], rtol=1e-5, atol=1e-5)

    model.train()
    assert norm.use_running_average is False


def test_group_count():
    assert [group_count(c) for c in (1, 2, 3, 4, 6, 8, 10, 12, 16, 64)] == [
        1, 2, 3, 4, 6, 8, 5, 6, 8, 8,
    ]


def test_count_params():
    width = 5
    model = UNet(depth=0, base_width=width, norm=None, rngs=rngs())
    # Two 3x3 convs with bias (1->w, w->w) and a 1x1 head with bias (w->1).
    expected = (9 * width + width) + (9 * width * width + width) + (width + 1)
    assert count_params(model) == expected
    # eval_shape: counting needs only shapes, no initialisation.
    counts = [
        count_params(nnx.eval_shape(lambda w=w: UNet(depth=2, base_width=w, rngs=rngs())))
        for w in (2, 4, 8, 16)
    ]
    assert counts[0] < counts[1] < counts[2] < counts[3]
    # BatchNorm running statistics are not parameters.
    model = UNet(depth=0, base_width=width, norm="batch", rngs=rngs())
    batch_stats = jax.tree.leaves(nnx.state(model, nnx.BatchStat))
    assert batch_stats
    total = sum(x.size for x in jax.tree.leaves(nnx.state(model)))
    assert count_params(model) == total - sum(x.size for x in batch_stats)
