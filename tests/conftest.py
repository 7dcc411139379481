"""Test-wide JAX settings: surface silent broadcasting bugs as errors; share compiles."""

import os
import shutil
import tempfile

# The suite is bound by XLA compiles, and many tests compile the very same program
# (the same tiny U-Net step under the same strategy) in different tests, xdist
# workers and the subprocesses of the notebook, demo and benchmark tests. JAX's
# persistent compilation cache, in a directory made fresh for each run and shared
# through the environment, compiles each program once (docs/reliability.md, "Test
# suite time"). It changes nothing that the tests count: traces and jit's in-memory
# cache (``_cache_size``) are per process, and a cache hit still records the
# backend-compile event that benchmarks/overhead.py counts. The cache has no size
# limit: a limit turns on JAX's file lock, but also a scan of the whole directory at
# every write, which made the suite slower than no cache. Without the lock a process
# can read an entry that another is still writing; zlib's checksum refuses it, and
# JAX warns and compiles instead (that warning is ignored in pyproject.toml and in
# tests/_fuzz.py). A cache the user configured is left alone.
_OWNER = "ADAPTIVE_OPTAX_TEST_CACHE_OWNER"
if _OWNER not in os.environ and "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="adaptive-optax-jax-")
    os.environ[_OWNER] = str(os.getpid())  # inherited by the workers and subprocesses
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "-1"

import chex  # noqa: E402
import jax  # noqa: E402
import pytest  # noqa: E402

if _OWNER in os.environ:  # also when a plugin imported jax before the lines above ran
    jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)

jax.config.update("jax_numpy_rank_promotion", "raise")


@pytest.fixture(autouse=True)
def _clear_trace_counter():
    # chex.assert_max_traces counts per function object across tests otherwise.
    chex.clear_trace_counter()
    yield


def pytest_unconfigure(config):
    # Only the process that made the cache directory removes it (not the xdist workers).
    if os.environ.get(_OWNER) == str(os.getpid()):
        shutil.rmtree(os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
