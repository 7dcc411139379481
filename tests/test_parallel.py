"""Data-parallel training: 1 device vs 8 fake CPU devices vs 2 processes.

XLA reads ``--xla_force_host_platform_device_count`` once, when jax starts, so
the multi-device runs happen in fresh processes (tests/_multidevice_worker.py,
scripts/two_process.py) that write JSON summaries; the tests assert on them.
The helpers' single-device behaviour is tested in-process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from adaptive_optax import parallel

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(ROOT, "tests", "_multidevice_worker.py")
TWO_PROCESS = os.path.join(ROOT, "scripts", "two_process.py")
# Float32 reductions in another order (8 partial sums + all-reduce vs one sum),
# compounded over 20 Adam steps; measured: losses within 1.2e-7, parameters
# within 7.5e-8 (the worker uses Adam with eps=1e-4, see its build()).
RTOL, ATOL = 1e-4, 1e-5


def _child_env(**extra: str) -> dict[str, str]:
    env = {**os.environ, "JAX_PLATFORMS": "cpu", **extra}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [ROOT, env.get("PYTHONPATH")]))
    return env


@pytest.fixture(scope="module")
def eight_device_summary(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("multidevice") / "summary.json"
    proc = subprocess.run(
        [sys.executable, WORKER, str(out)],
        env=_child_env(XLA_FLAGS="--xla_force_host_platform_device_count=8"),
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"worker failed:\n{proc.stdout}\n{proc.stderr[-4000:]}"
    return json.loads(out.read_text())


@pytest.mark.multidevice
def test_eight_devices_match_one_device(eight_device_summary):
    single, plain8, pinned8 = eight_device_summary["runs"]
    assert eight_device_summary["device_count"] == 8
    assert (single["mesh_devices"], plain8["mesh_devices"], pinned8["mesh_devices"]) == (1, 8, 8)
    # The run must actually intervene, or the comparison proves little.
    assert len(single["interventions"]) == 3
    for other in (plain8, pinned8):
        for key in ("intervention_count", "mix_index", "plateau_count"):
            assert other["steps"][key] == single["steps"][key], key
        for key in ("loss", "monitor", "learning_rate", "grad_norm_ema"):
            np.testing.assert_allclose(other["steps"][key], single["steps"][key],
                                       rtol=RTOL, atol=ATOL, err_msg=key)
        assert [(r["step"], r["number"], r["mix_after"]) for r in other["interventions"]] == \
            [(r["step"], r["number"], r["mix_after"]) for r in single["interventions"]]
        np.testing.assert_allclose([r["lr_after"] for r in other["interventions"]],
                                   [r["lr_after"] for r in single["interventions"]], rtol=1e-6)
        assert len(other["params"]) == len(single["params"])
        for got, want in zip(other["params"], single["params"], strict=True):
            np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)


@pytest.mark.multidevice
def test_state_stays_replicated_on_every_device(eight_device_summary):
    for run in eight_device_summary["runs"]:
        assert run["replicated_each_step"], run["how"]
        assert run["state_fully_replicated"], run["how"]
        assert run["state_leaf_devices"] == [run["mesh_devices"]], run["how"]


@pytest.mark.multidevice
def test_shard_map_needs_the_loss_averaged_too(eight_device_summary):
    grads_only = eight_device_summary["shard_map_counts_grads_only"]["interventions"]
    both = eight_device_summary["shard_map_counts_loss_and_grads"]["interventions"]
    assert len(set(grads_only)) > 1, "per-device plateau decisions should diverge"
    assert len(set(both)) == 1 and both[0] > 0


@pytest.mark.multidevice
def test_rollback_guard_under_shard_map_with_per_device_decisions(eight_device_summary):
    # The snapshot is taken under each device's own intervene flag (a varying
    # predicate); the noise shards intervene and roll back, the learnable ones never.
    guarded = eight_device_summary["shard_map_guarded_grads_only"]
    assert guarded["interventions"][:4] == [0] * 4 and guarded["rollbacks"][:4] == [0] * 4
    assert min(guarded["rollbacks"][4:]) > 0


@pytest.mark.multidevice
def test_multidevice_error_messages(eight_device_summary):
    errors = eight_device_summary["errors"]
    assert "batch size 6" in errors["shard_batch"] and "8 devices" in errors["shard_batch"]
    assert "num_devices = 9" in errors["mesh"] and "8 available" in errors["mesh"]
    assert "state['x']" in errors["assert_replicated"]
    assert errors["sharded_is_replicated"] is False and errors["sharded_devices"] == 8


@pytest.mark.multidevice
@pytest.mark.slow
def test_two_processes_record_identical_interventions(tmp_path):
    proc = subprocess.run(
        [sys.executable, TWO_PROCESS, "--out", str(tmp_path), "--timeout", "240"],
        env=_child_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"two_process.py failed:\n{proc.stdout}\n{proc.stderr[-4000:]}"
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["identical"], summary
    assert summary["interventions"] >= 1
    assert summary["matches_reference"], summary


# -- single-device behaviour of the helpers (in-process) --------------------------


def test_mesh_defaults_to_all_devices_with_a_data_axis():
    mesh = parallel.data_parallel_mesh()
    assert mesh.axis_names == ("data",)
    assert mesh.size == jax.device_count()


@pytest.mark.parametrize("bad, exc", [(0, ValueError), (-1, ValueError), (10**6, ValueError),
                                      (1.0, TypeError), ("2", TypeError), (True, TypeError)])
def test_mesh_rejects_bad_num_devices(bad, exc):
    with pytest.raises(exc, match="num_devices") as info:
        parallel.data_parallel_mesh(bad)
    if bad == 10**6:
        assert f"{jax.device_count()} available" in str(info.value)


def test_replicate_shard_and_data_parallel_on_one_device():
    mesh = parallel.data_parallel_mesh(1)
    state = parallel.replicate({"w": jnp.ones(3), "n": jnp.zeros([], jnp.int32)}, mesh)
    assert parallel.is_replicated(state)
    parallel.assert_replicated(state)
    # On one device everything counts as replicated: check the sharding put on it.
    for leaf in jax.tree.leaves(state):
        assert leaf.sharding == parallel.replicated_sharding(mesh)
    batch = parallel.shard_batch({"x": np.ones((4, 3), np.float32), "y": np.zeros(4)}, mesh)
    assert batch["x"].sharding.spec == parallel.batch_sharding(mesh).spec

    def step(state, batch):
        w = state["w"] - 0.1 * jnp.mean(batch["x"], axis=0)
        return {"w": w, "n": state["n"] + 1}, jnp.sum(w)

    state, total = parallel.data_parallel(step, mesh)(state, batch)
    np.testing.assert_allclose(state["w"], np.full(3, 0.9), rtol=1e-6)
    assert int(state["n"]) == 1 and parallel.is_replicated((state, total))


@pytest.mark.parametrize("batch, message", [
    ({"x": np.ones((4, 2)), "y": np.ones(3)}, "leading sizes"),
    ({"x": np.float32(1.0)}, "scalar"),
    ({}, "no array leaves"),
])
def test_shard_batch_rejects_malformed_batches(batch, message):
    with pytest.raises(ValueError, match=message):
        parallel.shard_batch(batch, parallel.data_parallel_mesh(1))


def test_set_cpu_device_count_validates_and_refuses_after_jax_started():
    with pytest.raises(TypeError, match="num_devices"):
        parallel.set_cpu_device_count(2.0)
    with pytest.raises(ValueError, match="num_devices"):
        parallel.set_cpu_device_count(0)
    jnp.zeros(1).block_until_ready()  # the backends are surely up by now
    with pytest.raises(RuntimeError, match="already run a computation"):
        parallel.set_cpu_device_count(4)


def test_set_cpu_device_count_in_a_fresh_process():
    code = ("import adaptive_optax.parallel as p, jax; p.set_cpu_device_count(3); "
            "print(p.data_parallel_mesh().size)")
    proc = subprocess.run([sys.executable, "-c", code], env=_child_env(), capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "3"


def test_data_parallel_rejects_non_callable():
    with pytest.raises(TypeError, match="train_step"):
        parallel.data_parallel("step", parallel.data_parallel_mesh(1))
