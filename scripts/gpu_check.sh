#!/usr/bin/env bash
# GPU smoke run and benchmark figures, as one short script (device tool / any CUDA box).
# Usage: bash scripts/gpu_check.sh OUTDIR   (expects jax[cuda], optax, flax, chex, orbax installed)
# Optional: .whl/stardist-*.whl is installed (no deps) so the demo can read the bundled nuclei image.
set -uo pipefail
out="${1:-${OUT:-gpu_out}}"
mkdir -p "$out"
if ls .whl/stardist-*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/stardist-*.whl \
    && export PYTHONPATH=/tmp/site
fi
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1 || export PYTHONPATH="$PWD:${PYTHONPATH:-}"
export PYTHONUNBUFFERED=1
python3 - <<'PY' 2>&1 | tee "$out/versions.txt"
import jax, optax, flax, chex
print("device:", jax.devices()[0].device_kind, "| jax", jax.__version__, "| optax", optax.__version__,
      "| flax", flax.__version__, "| chex", chex.__version__)
PY
# Most important first: the device tool stops the whole command at its limit (600 s).
# Sweeps at 5 repeats keep overhead.py near its earlier ~220 s on an H200 with the
# state-leaf section added.
timeout 270 python3 benchmarks/overhead.py --sweep-repeats 5 --out "$out/overhead_gpu.json" 2>&1 \
  | tee "$out/overhead_gpu.txt"
timeout 90 python3 benchmarks/grad_norm_trap.py --out "$out/trap_gpu.json" 2>&1 | tee "$out/trap_gpu.txt"
timeout 120 python3 -m pytest -q -p no:cacheprovider tests/test_transform.py tests/test_rollback.py \
  -k "not property" 2>&1 | tail -5 | tee "$out/pytest_gpu.txt"
timeout 90 python3 benchmarks/gpu_kernels.py --target local --out "$out/kernels_gpu.json" 2>&1 \
  | tee "$out/kernels_gpu.txt"
# The lookahead's lax.cond predicate is read by the host on GPU: its off-plateau cost (issue 14).
timeout 90 python3 benchmarks/lookahead_cost.py --repeats 5 --out "$out/lookahead_cost_gpu.json" \
  2>&1 | tee "$out/lookahead_cost_gpu.txt"
timeout 90 python3 -m adaptive_optax.demo --epochs 12 --no-progress --checkpoint-every 0 \
  --out "$out/demo" 2>&1 | tee "$out/demo_gpu.txt"
