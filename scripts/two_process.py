"""Two JAX processes on localhost train one model data-parallel and must agree.

Usage::

    python scripts/two_process.py [--out DIR] [--steps 12] [--timeout 240] [--no-reference]

The parent picks a free port on 127.0.0.1 and starts two worker processes of
this script. Each calls ``jax.distributed.initialize`` (CPU collectives via
gloo, jax's default on CPU), builds the same U-Net and ``plateau_escape``
optimizer from the same seed, and trains on its *own half* of every global
batch (``parallel.shard_batch`` turns the two halves into one global array
with ``jax.make_array_from_process_local_data``). jit's SPMD partitioner
all-reduces the loss and gradients between the processes, so both plateau
detectors see the global values and must intervene at the same steps with the
same boosts and loss mixes.

Each worker writes its per-step readings, intervention log and final
parameters to ``DIR/process_<i>.json``. A third process (unless
``--no-reference``) runs the same steps alone on one device with the whole
batch. The parent checks that the two processes' histories are identical
(exactly) and match the reference (within float32 tolerance), writes
``DIR/summary.json`` and exits with 0 if all holds, 1 otherwise.

Every wait is bounded: the coordinator's initialisation timeout, the
heartbeat and shutdown timeouts, and ``--timeout`` on the children, which
are killed when it runs out.

Example:
    >>> # python scripts/two_process.py --out /tmp/two_process
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time

NUM_PROCESSES = 2
GLOBAL_BATCH = 8
HOST = "127.0.0.1"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def train(process_id: int | None, port: int | None, steps: int, out_path: str) -> None:
    """One worker: joins the cluster (unless ``process_id is None``), trains, writes JSON.

    Args:
        process_id: This process's rank, or ``None`` for the single-process reference.
        port: The coordinator's port on 127.0.0.1.
        steps: Training steps.
        out_path: Where to write the JSON record.
    """
    import jax

    # Pinned explicitly: gloo is jax's default CPU collectives implementation
    # today; without one, cross-process computations fail at compile time.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.config.update("jax_default_matmul_precision", "highest")
    if process_id is not None:
        jax.distributed.initialize(
            coordinator_address=f"{HOST}:{port}", num_processes=NUM_PROCESSES,
            process_id=process_id, initialization_timeout=60,
            heartbeat_timeout_seconds=30, shutdown_timeout_seconds=30)

    import numpy as np
    import optax
    from flax import nnx

    import adaptive_optax as ao
    from adaptive_optax.segmentation.policies import adaptive_mix_policy
    from adaptive_optax import parallel
    from adaptive_optax.segmentation.data import SegmentationData, batches, synthetic_shapes
    from adaptive_optax.segmentation.train import init_train_state, make_train_step
    from adaptive_optax.segmentation.unet import UNet

    mesh = parallel.data_parallel_mesh()
    policy = adaptive_mix_policy()
    # An "rbg" key: threefry initialisation compiles many small eager kernels,
    # seconds of start-up on a 2-core machine.
    rngs = nnx.Rngs(jax.random.key(0, impl="rbg"))
    model = UNet(depth=1, base_width=4, norm="group", rngs=rngs)
    # eps=1e-4, not Adam's 1e-8: GroupNorm makes some gradient directions ~0
    # (scale/shift invariance), and a tiny eps turns the float noise there into
    # +-lr steps that differ between reduction orders. The comparison is about
    # data parallelism, not about that amplification.
    tx = ao.plateau_escape(optax.adam, 1e-3, patience=0, cooldown=1, rtol=0.02,
                           max_interventions=3, policy=policy,
                           optimizer_kwargs={"eps": 1e-4})
    graphdef, state = init_train_state(model, tx)
    state = parallel.replicate(state, mesh)
    step = parallel.data_parallel(
        make_train_step(graphdef, reference_weights=policy.initial_mix), mesh)

    # Every process builds the same data and batch order, then keeps its half.
    data = synthetic_shapes(GLOBAL_BATCH * steps, size=32, seed=0)
    local = GLOBAL_BATCH // jax.process_count()
    lo = jax.process_index() * local
    rows = []
    for batch in batches(data, GLOBAL_BATCH, seed=0, epoch=0):
        mine = SegmentationData(*(a[lo:lo + local] for a in batch))
        state, metrics = step(state, parallel.shard_batch(mine, mesh))
        readings = {"loss": metrics.loss, "monitor": metrics.monitor, **metrics.readings}
        # Replicated outputs: this process's own copy is the global value.
        rows.append({k: _local_value(v) for k, v in readings.items()})
    interventions = [
        dict(step=i, number=int(r["intervention_count"]), lr=r["learning_rate"],
             mix=int(r["mix_index"]))
        for i, r in enumerate(rows)
        if r["intervention_count"] > (rows[i - 1]["intervention_count"] if i else 0)]
    params = nnx.state(nnx.merge(graphdef, state)[0], nnx.Param)
    record = dict(
        process_id=jax.process_index(),
        process_count=jax.process_count(),
        device_count=jax.device_count(),
        local_batch=local,
        replicated=parallel.is_replicated(state),
        steps={k: [r[k] for r in rows] for k in rows[0]},
        interventions=interventions,
        params=[np.asarray(_local_value(x), np.float64).ravel().tolist()
                for x in jax.tree.leaves(params)],
    )
    with open(out_path, "w") as f:
        json.dump(record, f)
    if process_id is not None:
        jax.distributed.shutdown()


def _local_value(x):
    """The value of a replicated global array from this process's first shard."""
    import numpy as np

    value = np.asarray(x.addressable_data(0))
    return value.item() if value.ndim == 0 else value


def compare(records: list[dict], reference: dict | None) -> dict:
    """Compares the workers' records with each other and with the reference.

    Returns:
        A summary dict; ``ok`` is True when all checks hold.
    """
    import numpy as np

    first, *others = records
    identical = all(r["steps"] == first["steps"] and r["interventions"] == first["interventions"]
                    and r["params"] == first["params"] for r in others)
    summary = dict(
        processes=len(records),
        devices=first["device_count"],
        local_batch=first["local_batch"],
        identical=identical,
        replicated=all(r["replicated"] for r in records),
        interventions=len(first["interventions"]),
        intervention_log=first["interventions"],
    )
    if reference is not None:
        try:
            for key in ("intervention_count", "mix_index", "plateau_count"):
                assert first["steps"][key] == reference["steps"][key], key
            for key in ("loss", "monitor", "learning_rate"):
                np.testing.assert_allclose(first["steps"][key], reference["steps"][key],
                                           rtol=1e-4, atol=1e-5, err_msg=key)
            for got, want in zip(first["params"], reference["params"], strict=True):
                np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
            summary["matches_reference"] = True
        except AssertionError as err:
            summary["matches_reference"] = False
            summary["reference_mismatch"] = str(err)[:2000]
    summary["ok"] = (identical and summary["replicated"] and summary["interventions"] > 0
                     and summary.get("matches_reference", True))
    return summary


def launch(out_dir: str, steps: int, timeout: float, reference: bool) -> dict:
    """Starts the workers (and the reference), waits at most ``timeout`` seconds, compares."""
    port = free_port()
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    # One CPU device per process: the mesh then has one device per process.
    env.pop("XLA_FLAGS", None)
    script = os.path.abspath(__file__)
    jobs = {}
    for i in range(NUM_PROCESSES):
        path = os.path.join(out_dir, f"process_{i}.json")
        cmd = [sys.executable, script, "--worker", str(i), "--port", str(port),
               "--steps", str(steps), "--record", path]
        jobs[f"process_{i}"] = (path, subprocess.Popen(cmd, env=env))
    if reference:
        path = os.path.join(out_dir, "reference.json")
        cmd = [sys.executable, script, "--worker", "-1", "--steps", str(steps), "--record", path]
        jobs["reference"] = (path, subprocess.Popen(cmd, env=env))
    deadline = time.monotonic() + timeout
    failed = []
    for name, (_, proc) in jobs.items():
        try:
            code = proc.wait(timeout=max(deadline - time.monotonic(), 0.1))
        except subprocess.TimeoutExpired:
            code = "timeout"
        if code != 0:
            failed.append(f"{name}: exit {code}")
    for _, proc in jobs.values():
        if proc.poll() is None:  # a peer failed or time ran out: no orphans left behind
            proc.kill()
            proc.wait(timeout=30)
    if failed:
        summary = dict(ok=False, identical=False, failed=failed)
    else:
        records = []
        for i in range(NUM_PROCESSES):
            with open(jobs[f"process_{i}"][0]) as f:
                records.append(json.load(f))
        ref = None
        if reference:
            with open(jobs["reference"][0]) as f:
                ref = json.load(f)
        summary = compare(records, ref)
    with open(os.path.join(out_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=None, help="directory for the JSON records")
    parser.add_argument("--steps", type=int, default=12, help="training steps (default 12)")
    parser.add_argument("--timeout", type=float, default=240.0,
                        help="seconds to wait for the workers before killing them")
    parser.add_argument("--no-reference", action="store_true",
                        help="skip the single-process reference run")
    parser.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--record", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error(f"--steps must be >= 1, got {args.steps}")
    if args.worker is not None:
        train(None if args.worker < 0 else args.worker, args.port, args.steps, args.record)
        return 0
    out_dir = args.out or tempfile.mkdtemp(prefix="two_process_")
    os.makedirs(out_dir, exist_ok=True)
    summary = launch(out_dir, args.steps, args.timeout, reference=not args.no_reference)
    print(json.dumps({k: v for k, v in summary.items() if k != "intervention_log"}))
    print(f"records in {out_dir}")
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
