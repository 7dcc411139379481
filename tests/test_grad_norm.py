"""Gradient-norm EMA: global norm, bias correction, non-finite skipping."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import adaptive_optax as ao
from adaptive_optax.grad_norm import (SMALL_LEAF_SIZE, global_norm, init_grad_norm,
                                     update_grad_norm)
from helpers import concatenate_sizes


def test_global_norm_matches_numpy_over_leaves():
    tree = {"a": jnp.array([3.0, 0.0]), "b": [jnp.array([[4.0]]), jnp.zeros(3)]}
    chex.assert_trees_all_close(global_norm(tree), 5.0)


def test_global_norm_of_bfloat16_accumulates_in_float32():
    g = jnp.full((4096,), 0.01, jnp.bfloat16)
    norm = global_norm({"g": g})
    assert norm.dtype == jnp.float32
    expected = np.sqrt(4096) * float(jnp.bfloat16(0.01))
    np.testing.assert_allclose(float(norm), expected, rtol=1e-3)


def test_first_norm_is_unbiased():
    s = update_grad_norm(init_grad_norm(), jnp.float32(0.04), decay=0.99)
    chex.assert_trees_all_close(s.grad_norm_ema, 0.04, rtol=1e-5)


def test_ema_matches_reference_recursion():
    decay, norms = 0.8, [1.0, 2.0, 4.0, 0.5]
    s = init_grad_norm()
    update = jax.jit(update_grad_norm, static_argnums=2)
    for n in norms:
        s = update(s, jnp.float32(n), decay)
    acc = 0.0
    for n in norms:
        acc = decay * acc + (1 - decay) * n
    chex.assert_trees_all_close(s.grad_norm_ema, acc / (1 - decay ** len(norms)), rtol=1e-5)
    assert int(s.grad_norm_steps) == 4


@pytest.mark.parametrize("decay", [0.0, 0.9999999, float(np.nextafter(np.float32(1), np.float32(0)))])
def test_a_constant_norm_gives_that_norm_for_any_decay(decay):
    # The accumulator and its bias correction must use the same float32 decay:
    # mixed, decay 0.9999999 gave an EMA 16% low.
    s = init_grad_norm()
    for _ in range(3):
        s = update_grad_norm(s, jnp.float32(0.04), decay)
    chex.assert_trees_all_close(s.grad_norm_ema, 0.04, rtol=1e-4)


def test_a_decay_that_rounds_to_one_in_float32_is_refused():
    with pytest.raises(ValueError, match=r"grad_norm_decay must be a finite number in \[0, 1\) after rounding to float32"):
        ao.plateau_escape(optax.sgd, 0.1, grad_norm_decay=1 - 1e-8)


def test_nonfinite_norms_are_skipped_and_counted():
    s = init_grad_norm()
    for n in [0.1, np.nan, np.inf, 0.1]:
        s = update_grad_norm(s, jnp.float32(n), decay=0.9)
    chex.assert_trees_all_close(s.grad_norm_ema, 0.1, rtol=1e-5)
    assert int(s.nonfinite_grad_count) == 2
    assert int(s.grad_norm_steps) == 2


def test_ema_is_zero_before_any_finite_norm():
    s = update_grad_norm(init_grad_norm(), jnp.float32(np.nan), decay=0.9)
    assert float(s.grad_norm_ema) == 0.0
    assert float(s.last_grad_norm) == 0.0
    assert int(s.nonfinite_grad_count) == 1


def test_agrees_with_optax_global_norm():
    tree = {"w": jnp.arange(6.0).reshape(2, 3), "b": jnp.ones(2)}
    chex.assert_trees_all_close(global_norm(tree), optax.global_norm(tree))


def _mixed_tree(num_small: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    tree = {"big": rng.normal(size=(3, SMALL_LEAF_SIZE)).astype(np.float32),  # reduced alone
            "edge": rng.normal(size=SMALL_LEAF_SIZE).astype(np.float32),  # the largest joined
            "scalar": np.float32(2.5), "half": rng.normal(size=7).astype(jnp.bfloat16)}
    tree.update({f"s{i}": rng.normal(size=i % 9 + 1).astype(np.float32)
                 for i in range(num_small)})
    return tree


@pytest.mark.parametrize("num_small", [0, 3, 130])
def test_joined_small_leaves_give_the_norm_of_every_leaf(num_small):
    tree = _mixed_tree(num_small)
    expected = np.sqrt(sum(np.sum(np.square(np.asarray(x, np.float64)))
                           for x in jax.tree.leaves(tree)))
    norm = jax.jit(global_norm)(tree)
    assert norm.dtype == jnp.float32
    np.testing.assert_allclose(float(norm), expected, rtol=1e-6)
    assert float(global_norm({})) == 0.0 and float(global_norm({"e": jnp.zeros(0)})) == 0.0


def test_only_small_leaves_are_concatenated_64_at_a_time():
    # 130 small leaves + "edge" + "scalar" + "half" = 133 joined leaves: 3 concatenates.
    tree = _mixed_tree(130)
    text = jax.jit(global_norm).lower(tree).compile().as_text()
    small = sum(np.size(x) for x in jax.tree.leaves(tree) if np.size(x) <= SMALL_LEAF_SIZE)
    sizes = concatenate_sizes(text)
    assert len(sizes) == 3 and sum(sizes) == small, (sizes, small)
    assert "copy(" not in text  # the large leaf is reduced where it lies
