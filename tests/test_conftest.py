"""The suite's shared compilation cache (tests/conftest.py) is in effect."""

import os

import jax
import jax.numpy as jnp
import pytest


def test_compiles_go_to_the_runs_own_cache_directory():
    if "ADAPTIVE_OPTAX_TEST_CACHE_OWNER" not in os.environ:
        pytest.skip("a JAX_COMPILATION_CACHE_DIR set by the user is left alone")
    path = os.environ["JAX_COMPILATION_CACHE_DIR"]
    assert jax.config.jax_compilation_cache_dir == path
    assert os.path.basename(path).startswith("adaptive-optax-jax-")
    # No size limit: a limit makes JAX scan the directory at every write.
    assert jax.config.jax_compilation_cache_max_size == -1
    before = set(os.listdir(path))
    # A program no other test compiles: its entry is new.
    jax.jit(lambda x: jnp.sin(x) * 1.2345678 + 9.87654321)(jnp.arange(7.0)).block_until_ready()
    assert set(os.listdir(path)) - before
