"""Kernels per step on a GPU, counted without a GPU (deviceless XLA:GPU compile).

On a GPU, each op of the optimized update is a kernel or a memcpy, and
``plateau_escape``'s fixed per-step cost is mostly how many it adds to
Adam's. XLA can compile for a GPU that is not there: given a target
description (a ``GpuTargetConfigProto``; an H100's is built in) and jax's
CUDA plugin, it runs the whole GPU pipeline and dumps the optimized HLO and
the thunk sequence (the kernels and copies the runtime would launch). This
script does that for the optimizer-only update (``tx.update`` +
``optax.apply_updates``, donated, as in ``overhead.py``) of variants (a) adam,
(c) ``plateau_escape(adam)`` and (e) clip + adam on the tiny conv net and the
demo U-Net, and prints per variant:

  entry ops     ops of the optimized entry computation (no parameters,
                constants, tuples, bitcasts): one kernel or memcpy each
  fusions, copies, conditionals   among them
  kernels, memcpy   from the dumped thunk sequence
  scalar kernels    kernels launched with one block of one thread
  command buffers   thunks after XLA's passes (1: the step is one CUDA graph)

Needs jax's CUDA plugin matching your jax, e.g. in a separate environment::

    python -m venv /tmp/gpuaot && /tmp/gpuaot/bin/pip install "jax[cuda12]==0.10.2" \\
        optax flax chex numpy
    PYTHONPATH=. /tmp/gpuaot/bin/python benchmarks/gpu_kernels.py [--out gpu.json]

No GPU, driver or CUDA toolkit beyond the pip wheels is used: the script sets
``JAX_PLATFORMS=cpu`` (arrays live on the CPU) and
``JAX_SKIP_CUDA_CONSTRAINTS_CHECK=1`` (the plugin would call ``cuInit``)
before importing jax. ``--target local`` compiles for the local default
backend instead (no thunk counts); ``--quick`` uses it, so the script runs in
the test suite anywhere.
"""

from __future__ import annotations

import argparse
import glob
import os
import re
import sys
import tempfile
from collections import Counter


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", choices=("h100", "local"), default="h100",
                        help="h100: deviceless compile for an H100 (needs jax's CUDA plugin); "
                             "local: the default backend of this machine")
    parser.add_argument("--quick", action="store_true",
                        help="tiny conv net only, local target (seconds; what the test runs)")
    parser.add_argument("--variants", default="a,c,e", help="variants of overhead.py")
    parser.add_argument("--models", default="tiny,unet", help="tiny and/or unet")
    parser.add_argument("--dump-dir", default=None,
                        help="keep XLA's dumps here (default: a temporary directory)")
    parser.add_argument("--out", default=None, help="write the results as JSON to this path")
    args = parser.parse_args(argv)
    if args.quick:
        args.target, args.models = "local", "tiny"
    return args


ARGS = parse_args(sys.argv[1:] if __name__ == "__main__" else [])
if __name__ == "__main__" and ARGS.target == "h100":
    # Before jax is imported: host arrays on the CPU, and no cuInit() in the plugin.
    os.environ["JAX_PLATFORMS"] = "cpu"
    os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

import _common as C  # noqa: E402
from adaptive_optax.segmentation import UNet  # noqa: E402
from overhead import DESCRIPTIONS, make_tx  # noqa: E402

# An H100 SXM as XLA's GPU compiler sees it (stream_executor GpuTargetConfigProto).
H100_TARGET_CONFIG = """
gpu_device_info {
  threads_per_block_limit: 1024
  threads_per_warp: 32
  shared_memory_per_block: 49152
  shared_memory_per_core: 233472
  threads_per_core_limit: 2048
  core_count: 132
  fpus_per_core: 128
  block_dim_limit_x: 2147483647
  block_dim_limit_y: 65535
  block_dim_limit_z: 65535
  memory_bandwidth: 3352320000000
  l2_cache_size: 52428800
  clock_rate_ghz: 1.98
  device_memory_size: 84929347584
  shared_memory_per_block_optin: 232448
  cuda_compute_capability { major: 9 }
  registers_per_core_limit: 65536
  registers_per_block_limit: 65536
}
platform_name: "CUDA"
dnn_version_info { major: 9 minor: 7 }
runtime_version { major: 12 minor: 8 patch: 0 }
device_description_str: "NVIDIA H100 80GB HBM3"
"""

MODELS = {
    "tiny": lambda: C.TinyConvNet(8, rngs=nnx.Rngs(0)),
    "unet": lambda: UNet(1, 1, depth=2, base_width=8, rngs=nnx.Rngs(0)),
}
_THUNK_RE = re.compile(r"^\s*\d+:\s*(k\w+)", re.M)
_SCALAR_LAUNCH = "grid: [1, 1, 1] threads: [1, 1, 1]"


def abstract_inputs(target: str):
    """Turns arrays into ShapeDtypeStructs placed on the compile target."""
    if target == "local":
        return lambda tree: tree
    from jax.experimental import topologies
    from jax.sharding import NamedSharding, PartitionSpec

    topology = topologies.get_topology_desc(platform="cuda", target_config=H100_TARGET_CONFIG,
                                            topology="1x1x1")
    sharding = NamedSharding(topologies.make_mesh(topology, (1,), ("x",)), PartitionSpec())
    return lambda tree: jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(jnp.shape(x), jnp.result_type(x), sharding=sharding), tree)


def thunk_counts(dump: str) -> dict[str, int]:
    """Kernels, memcpys, scalar kernels and top-level thunks from XLA's dumps."""
    sequence = sorted(glob.glob(os.path.join(dump, "*thunk_sequence.txt")))
    if not sequence:
        return {}
    text = open(sequence[0]).read()
    kinds = Counter(_THUNK_RE.findall(text))
    after = sorted(glob.glob(os.path.join(dump, "*thunk_sequence_after_thunk_passes.txt")))
    top = Counter(_THUNK_RE.findall(open(after[0]).read())) if after else Counter()
    return {
        "kernels": sum(n for k, n in kinds.items() if "Kernel" in k),
        "memcpy": sum(n for k, n in kinds.items() if "Copy" in k or "Memset" in k),
        "scalar_kernels": text.count(_SCALAR_LAUNCH),
        "command_buffers": top.get("kCommandBuffer", 0),
    }


def count_variant(model_name: str, variant: str, place, dump_root: str) -> dict:
    """Compiles one variant's update for the target and counts what it launches."""
    _, params, _ = C.split_params(MODELS[model_name]())
    grads = C.fake_grads(params)
    tx = make_tx(variant)
    dump = os.path.join(dump_root, f"{model_name}_{variant}")
    os.makedirs(dump, exist_ok=True)
    lowered = C.make_update_step(tx).trace(
        place(params), place(tx.init(params)), place(grads), place(jnp.float32(0.5))).lower()
    text = lowered.compile(compiler_options={"xla_dump_to": dump,
                                             "xla_dump_hlo_as_text": True}).as_text()
    counts = C.hlo_counts(text)
    return {"entry_ops": counts["entry_ops"], "fusions": counts["fusion"],
            "copies": counts["copy"], "conditionals": counts["conditional"],
            **thunk_counts(dump)}


def main(args: argparse.Namespace) -> int:
    env = C.print_header("plateau_escape update: kernels per step on a GPU target", timed=False)
    place = abstract_inputs(args.target)
    target = "NVIDIA H100 80GB HBM3 (deviceless compile)" if args.target == "h100" else \
        f"local {jax.devices()[0].platform}"
    print(f"# target: {target}")
    results: dict = {"env": env, "target": target}
    with tempfile.TemporaryDirectory() as tmp:
        dump_root = args.dump_dir or tmp
        for model_name in args.models.split(","):
            rows, results[model_name] = [], {}
            for variant in args.variants.split(","):
                c = count_variant(model_name, variant, place, dump_root)
                results[model_name][variant] = c
                rows.append([f"({variant})", DESCRIPTIONS[variant], c["entry_ops"],
                             c["fusions"], c["copies"], c["conditionals"],
                             c.get("kernels", "-"), c.get("memcpy", "-"),
                             c.get("scalar_kernels", "-"), c.get("command_buffers", "-")])
            C.print_table(f"{model_name}: optimizer-only update, {target}",
                          ["variant", "optimizer", "entry ops", "fusions", "copies",
                           "conditionals", "kernels", "memcpy", "scalar kernels",
                           "command buffers"], rows)
    C.write_json(args.out, results)
    return 0


if __name__ == "__main__":
    sys.exit(main(ARGS))
