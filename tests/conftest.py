"""Test-wide JAX settings: surface silent broadcasting bugs as errors."""

import chex
import jax
import pytest

jax.config.update("jax_numpy_rank_promotion", "raise")


@pytest.fixture(autouse=True)
def _clear_trace_counter():
    # chex.assert_max_traces counts per function object across tests otherwise.
    chex.clear_trace_counter()
    yield
