"""Shared helpers of the benchmark scripts (not a benchmark itself).

Everything here is device-agnostic: the same code runs on CPU and GPU. It
holds the small models the benchmarks train (a tiny conv net and an MLP of
adjustable width), a donated train step written directly on a parameter
pytree, interleaved timing, HLO op counting, and plain-text tables.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import functools
import json
import os
import platform
import random
import re
import shlex
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

NOISE_NOTE = ("timings are wall-clock on a possibly shared machine; every ratio is measured "
              "side by side with interleaved repeats (min and median reported)")


# --------------------------------------------------------------------------- arguments

def add_timing_args(parser: argparse.ArgumentParser, quick_help: str) -> None:
    """The options every timing script shares: --quick, repeats, block length, the
    tiny conv net's size, --out. Call :func:`resolve_timing_args` after parsing."""
    parser.add_argument("--quick", action="store_true", help=quick_help)
    parser.add_argument("--repeats", type=int, default=None,
                        help="interleaved repeats of the main tables (default 15, quick 3)")
    parser.add_argument("--block-seconds", type=float, default=None,
                        help="target length of one timed block (default 0.25, quick 0.05)")
    parser.add_argument("--tiny-width", type=int, default=8, help="tiny conv net width")
    parser.add_argument("--tiny-size", type=int, default=32, help="tiny conv net image size")
    parser.add_argument("--tiny-batch", type=int, default=8, help="tiny conv net batch")
    parser.add_argument("--out", default=None, help="write the results as JSON to this path")


def resolve_timing_args(args: argparse.Namespace) -> argparse.Namespace:
    """Fills the defaults of :func:`add_timing_args` that depend on --quick."""
    if args.repeats is None:
        args.repeats = 3 if args.quick else 15
    if args.block_seconds is None:
        args.block_seconds = 0.05 if args.quick else 0.25
    return args


def set_compile_cache(setting: str):
    """Turns JAX's persistent compilation cache on for ``--compile-cache SETTING``.

    ``"off"``: nothing; ``"tmp"``: a temporary directory, returned so the caller
    can clean it up; anything else: that directory. Runs that differ only in
    seed or data set then share one compile.
    """
    if setting == "off":
        return None
    tmp = tempfile.TemporaryDirectory(prefix="jax_cache_") if setting == "tmp" else None
    jax.config.update("jax_compilation_cache_dir", tmp.name if tmp else setting)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
    return tmp


# --------------------------------------------------------------------------- header / output

def command_line() -> str:
    """The exact command that started this process (for result headers)."""
    return " ".join(shlex.quote(a) for a in [os.path.basename(sys.executable), *sys.argv])


def environment() -> dict[str, Any]:
    """Device kind, versions and date, recorded in every header and JSON."""
    device = jax.devices()[0]
    return {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": command_line(),
        "device_kind": device.device_kind,
        "platform": device.platform,
        "device_count": jax.device_count(),
        "jax": jax.__version__,
        "optax": optax.__version__,
        "flax": getattr(__import__("flax"), "__version__", "?"),
        "python": platform.python_version(),
        "host_cpus": os.cpu_count(),
    }


def print_header(title: str, *, timed: bool = True) -> dict[str, Any]:
    """Prints the benchmark title and environment; returns the environment dict.

    ``timed=False`` (a script that times nothing) leaves out the timing note.
    """
    env = environment()
    print(f"# {title}")
    print(f"# command: {env['command']}")
    print(f"# date: {env['date']}")
    print(f"# device: {env['device_kind']} ({env['platform']}, {env['device_count']} device(s)), "
          f"host CPUs: {env['host_cpus']}")
    print(f"# jax {env['jax']}, optax {env['optax']}, flax {env['flax']}, "
          f"python {env['python']}")
    if timed:
        print(f"# note: {NOISE_NOTE}")
    sys.stdout.flush()
    return env


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A plain fixed-width text table (right-aligned numbers, left-aligned text)."""
    cells = [[_fmt(c) for c in row] for row in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]
    numeric = [all(_is_number(row[i]) for row in rows) if rows else False
               for i in range(len(headers))]

    def line(values):
        return "  ".join(v.rjust(w) if num else v.ljust(w)
                         for v, w, num in zip(values, widths, numeric)).rstrip()

    out = [line(headers), line(["-" * w for w in widths])]
    out += [line(r) for r in cells]
    return "\n".join(out)


def print_table(title: str, headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    """Prints a titled table followed by a blank line."""
    print(f"\n## {title}")
    print(format_table(headers, rows))
    sys.stdout.flush()


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


def _fmt(value: Any) -> str:
    if isinstance(value, (float, np.floating)):
        if not np.isfinite(value):
            return str(value)
        if value != 0 and (abs(value) >= 1e5 or abs(value) < 1e-3):
            return f"{value:.3g}"
        return f"{value:.3f}" if abs(value) < 100 else f"{value:.1f}"
    return str(value)


def write_json(path: str | None, payload: Mapping[str, Any]) -> None:
    """Writes ``payload`` as indented JSON to ``path`` (no-op for ``None``)."""
    if not path:
        return
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    with open(path, "w") as f:
        json.dump(payload, f, indent=2, default=_json_default)
    print(f"\nwrote {path}")


def _json_default(obj: Any) -> Any:
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating,)):
        return float(obj)
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    return str(obj)


# --------------------------------------------------------------------------- models

class TinyConvNet(nnx.Module):
    """Three 3x3 convolutions (``1 -> width -> width -> 1``) with ReLUs: per-pixel logits."""

    def __init__(self, width: int = 8, *, rngs: nnx.Rngs) -> None:
        self.conv1 = nnx.Conv(1, width, kernel_size=(3, 3), rngs=rngs)
        self.conv2 = nnx.Conv(width, width, kernel_size=(3, 3), rngs=rngs)
        self.conv3 = nnx.Conv(width, 1, kernel_size=(3, 3), rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = jax.nn.relu(self.conv1(x))
        x = jax.nn.relu(self.conv2(x))
        return self.conv3(x)


class MLP(nnx.Module):
    """``in_features -> width -> width -> 1`` with ReLUs (the model-size sweep)."""

    def __init__(self, in_features: int, width: int, *, rngs: nnx.Rngs) -> None:
        self.fc1 = nnx.Linear(in_features, width, rngs=rngs)
        self.fc2 = nnx.Linear(width, width, rngs=rngs)
        self.fc3 = nnx.Linear(width, 1, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc3(jax.nn.relu(self.fc2(jax.nn.relu(self.fc1(x)))))


def mlp_width_for(num_params: float, in_features: int) -> int:
    """The hidden width whose :class:`MLP` has about ``num_params`` parameters."""
    # params = in*w + w + w*w + w + w + 1  ->  w^2 + (in + 3) w + 1 - P = 0
    b = in_features + 3
    return max(1, int(round((-b + (b * b + 4 * (num_params - 1)) ** 0.5) / 2)))


def split_params(model: nnx.Module):
    """``(graphdef, params, rest)``: trainable parameters apart from other state."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    return graphdef, params, rest


def count(tree) -> int:
    """Number of scalars in a pytree."""
    return int(sum(np.size(x) for x in jax.tree.leaves(tree)))


def tree_nbytes(tree) -> int:
    """Sum of ``nbytes`` over the array leaves of a pytree."""
    return int(sum(getattr(x, "nbytes", np.asarray(x).nbytes) for x in jax.tree.leaves(tree)))


def fresh_copy(tree):
    """A pytree of new device buffers (so one variant's donation never hits another's)."""
    return jax.tree.map(lambda x: jnp.array(x, copy=True), tree)


# --------------------------------------------------------------------------- train step

def bce_loss(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """Mean sigmoid binary cross-entropy (the same loss for every variant)."""
    return optax.sigmoid_binary_cross_entropy(logits, targets).mean()


def make_step(graphdef, rest, tx: optax.GradientTransformationExtraArgs, *,
              counter: dict | None = None, monitor_arg: bool = False,
              return_norm: bool = False) -> Callable:
    """The jitted, donated ``step(params, opt_state, x, y[, monitor])``.

    Forward, backward, ``tx.update(grads, opt_state, params, value=...)`` and
    ``optax.apply_updates``; ``params`` and ``opt_state`` are donated. The
    monitored value is the loss unless ``monitor_arg`` (then the extra
    argument is passed instead). ``counter["traces"]`` is bumped on every
    trace. With ``return_norm`` the step also returns the gradients' global
    norm (for the host-sync trap variant).
    """
    tx = optax.with_extra_args_support(tx)

    def loss_fn(params, x, y):
        model = nnx.merge(graphdef, params, rest)
        return bce_loss(model(x), y)

    def step(params, opt_state, x, y, monitor=None):
        if counter is not None:
            counter["traces"] = counter.get("traces", 0) + 1
        loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
        value = monitor if monitor_arg else loss
        updates, opt_state = tx.update(grads, opt_state, params, value=value)
        params = optax.apply_updates(params, updates)
        if return_norm:
            return params, opt_state, loss, optax.tree.norm(grads)
        return params, opt_state, loss

    return jax.jit(step, donate_argnums=(0, 1))


def make_update_step(tx: optax.GradientTransformationExtraArgs) -> Callable:
    """The jitted, donated optimizer-only ``update(params, opt_state, grads, value)``.

    ``tx.update`` plus ``optax.apply_updates`` on fixed gradients: the part
    of a train step an optimizer adds, without the model's cost and noise.
    """
    tx = optax.with_extra_args_support(tx)

    def update(params, opt_state, grads, value):
        updates, opt_state = tx.update(grads, opt_state, params, value=value)
        return optax.apply_updates(params, updates), opt_state

    return jax.jit(update, donate_argnums=(0, 1))


def fake_grads(params, scale: float = 1e-2):
    """Deterministic small pseudo-gradients shaped like ``params``."""
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.PRNGKey(1), len(leaves))
    return jax.tree.unflatten(treedef, [scale * jax.random.normal(k, x.shape, x.dtype)
                                        for k, x in zip(keys, leaves)])


class StepRunner:
    """Owns one variant's donated state and times ``steps`` consecutive steps.

    Dispatch is asynchronous; one ``jax.block_until_ready`` closes each timed
    block, so a block measures steady-state throughput, not latency.
    """

    def __init__(self, step: Callable, params, opt_state, args: Sequence[Any], *,
                 host_sync: Callable[[Any], Any] | None = None,
                 context: Callable[[], Any] | None = None) -> None:
        self.step = step
        self.params = fresh_copy(params)
        self.opt_state = fresh_copy(opt_state)
        self.args = tuple(args)
        self.host_sync = host_sync  # called on the step's outputs after every step
        self.context = context  # e.g. jax.enable_x64(True) for the float64 variant
        self.last_cpu = float("nan")

    def run(self, steps: int) -> float:
        """Runs ``steps`` steps; returns wall seconds per step (CPU seconds in ``last_cpu``).

        ``last_cpu`` is the process CPU time (all threads) per step over the
        same block: on a shared CPU it excludes the time spent waiting for a
        core, so it is steadier than wall time. On GPU it is host time only.
        """
        ctx = self.context() if self.context is not None else contextlib.nullcontext()
        with ctx:
            cpu_start = time.process_time()
            start = time.perf_counter()
            out = None
            for _ in range(steps):
                out = self.step(self.params, self.opt_state, *self.args)
                self.params, self.opt_state = out[0], out[1]
                if self.host_sync is not None:
                    self.host_sync(out)
            jax.block_until_ready((self.params, self.opt_state, out))
            wall = (time.perf_counter() - start) / steps
            self.last_cpu = (time.process_time() - cpu_start) / steps
            return wall

    def warmup(self, steps: int = 2) -> float:
        """Compiles (first call) and runs ``steps`` more; returns the last block's time."""
        self.run(1)
        return self.run(max(steps, 1))


def interleaved_times(runners: Mapping[str, StepRunner], *, repeats: int,
                      steps: int) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Per-step wall and CPU seconds of every runner, repeats interleaved.

    The order is shuffled each repeat (seeded, so runs are comparable): a
    rotation would keep every variant behind the same neighbour, whose
    after-effects (caches, a callback's Python thread, frequency) it would
    then always inherit.
    """
    names = list(runners)
    wall: dict[str, list[float]] = {n: [] for n in names}
    cpu: dict[str, list[float]] = {n: [] for n in names}
    order = random.Random(0)
    for _ in range(repeats):
        for name in order.sample(names, len(names)):
            wall[name].append(runners[name].run(steps))
            cpu[name].append(runners[name].last_cpu)
    return wall, cpu


def calibrate_steps(runner: StepRunner, target_seconds: float, *, max_steps: int = 500) -> int:
    """Steps per timed block so that one block lasts about ``target_seconds``."""
    per_step = min(runner.run(1), runner.run(2))
    return int(min(max_steps, max(1, round(target_seconds / max(per_step, 1e-6)))))


def ratio_stats(times: Mapping[str, list[float]], baseline: str,
                cpu: Mapping[str, list[float]] | None = None) -> dict[str, dict[str, Any]]:
    """min/median seconds per step and their ratios to ``baseline``.

    ``ratio_min = min(t) / min(t_base)``; ``ratio_median = median(t) /
    median(t_base)``; ``paired_median`` is the median over repeats of the
    ratio inside one repeat (the two ran seconds apart). With ``cpu`` (process
    CPU seconds per step), ``cpu_ratio_median`` is the same median ratio of
    CPU time. The raw per-repeat times are kept in ``wall_s``/``cpu_s``.
    """
    base = times[baseline]
    out = {}
    for name, t in times.items():
        paired = [a / b for a, b in zip(t, base)]
        out[name] = dict(
            min_s=min(t), median_s=statistics.median(t),
            ratio_min=min(t) / min(base),
            ratio_median=statistics.median(t) / statistics.median(base),
            paired_median=statistics.median(paired), repeats=len(t), wall_s=list(t))
        if cpu is not None:
            out[name].update(
                cpu_median_s=statistics.median(cpu[name]),
                cpu_ratio_median=statistics.median(cpu[name]) / statistics.median(cpu[baseline]),
                cpu_s=list(cpu[name]))
    return out


# --------------------------------------------------------------------------- HLO

_OP_RE = re.compile(r"^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*.+?\s([a-z][a-z0-9\-]*)\(", re.M)
_SKIP = {"parameter", "constant", "get-tuple-element", "tuple", "bitcast"}


def hlo_counts(hlo_text: str) -> dict[str, int]:
    """Op counts of an optimized HLO module.

    ``entry_ops``: instructions of the entry computation other than
    parameters, constants, tuples and bitcasts -- on CPU each is one thunk
    the runtime executes in sequence, on GPU roughly one kernel or memcpy.
    ``executed_ops``: the same, with every ``conditional`` also counting the
    ops of its largest branch (recursively): a conditional is one entry op
    but runs a whole computation (the CPU skip's holds Adam's update), so
    ``entry_ops`` alone would understate what a step runs.
    ``fusion``/``copy``/``conditional``/``custom-call``/``concatenate``/
    ``while``: entry-computation counts; ``*_all``: the same over every
    computation (fused bodies and conditional branches included).
    """
    entry = _entry_computation(hlo_text)
    entry_ops = Counter(_OP_RE.findall(entry))
    all_ops = Counter(_OP_RE.findall(hlo_text))
    out = {"entry_ops": sum(v for k, v in entry_ops.items() if k not in _SKIP),
           "executed_ops": _executed_ops(entry, _computations(hlo_text))}
    for op in ("fusion", "copy", "conditional", "custom-call", "concatenate", "while",
               "convolution", "reduce"):
        out[op] = entry_ops.get(op, 0)
    for op in ("copy", "concatenate", "reduce", "select"):
        out[f"{op}_all"] = all_ops.get(op, 0)
    out["f64_values"] = len(re.findall(r"\bf64\[", hlo_text))
    return out


_COMPUTATION_RE = re.compile(r"^%?([\w.\-]+) \(.*\{$")
_BRANCHES_RE = re.compile(
    r"(?:branch_computations=\{([^}]*)\}|true_computation=%?([\w.\-]+), "
    r"false_computation=%?([\w.\-]+))")


def _computations(hlo_text: str) -> dict[str, str]:
    """Name -> body of every computation of an HLO module."""
    out, name, lines = {}, None, []
    for line in hlo_text.splitlines():
        match = _COMPUTATION_RE.match(line)
        if match and not line.startswith(" "):
            name, lines = match.group(1), []
        elif line.startswith("}") and name is not None:
            out[name], name = "\n".join(lines), None
        elif name is not None:
            lines.append(line)
    return out


def _executed_ops(body: str, computations: dict[str, str]) -> int:
    ops = sum(1 for op in _OP_RE.findall(body) if op not in _SKIP)
    for line in body.splitlines():
        if " conditional(" not in line:
            continue
        match = _BRANCHES_RE.search(line)
        if match is None:
            continue
        names = (match.group(1).split(",") if match.group(1) is not None
                 else [match.group(2), match.group(3)])
        branches = [computations.get(n.strip().lstrip("%"), "") for n in names]
        ops += max(_executed_ops(b, computations) for b in branches)
    return ops


def _entry_computation(hlo_text: str) -> str:
    start = hlo_text.find("\nENTRY")
    if start < 0:
        return hlo_text
    end = hlo_text.find("\n}\n", start)
    return hlo_text[start:end if end > 0 else None]


def concatenated_elements(hlo_text: str) -> int:
    """Elements gathered by ``concatenate`` ops, in every computation (fused ones too).

    Divide by the parameter count: ``ravel_pytree`` of all gradients gives
    1.0 (XLA:CPU writes the joined, squared gradients to a buffer before its
    reduction); the library's norm joins only leaves of up to
    ``SMALL_LEAF_SIZE`` elements. On GPU a concatenate fused into a reduction
    writes nothing, but it is counted all the same.
    """
    return _result_elements(hlo_text, "concatenate")


def copied_elements(hlo_text: str) -> int:
    """Elements moved by the entry computation's ``copy`` ops (one read + one write each).

    Divide by the parameter count to get "parameter copies per step". With
    donated buffers XLA inserts such copies when an input buffer that is
    updated in place is still read by another, unordered consumer.
    """
    return _result_elements(_entry_computation(hlo_text), "copy")


def _result_elements(hlo_text: str, op: str) -> int:
    """Total elements of the (array) results of every ``op`` instruction in ``hlo_text``."""
    n = 0
    for m in re.finditer(rf"=\s*[a-z0-9]+\[([0-9,]*)\][^=\n]*\s{op}\(", hlo_text):
        n += int(np.prod([int(d) for d in m.group(1).split(",") if d]))
    return n


def compiled_text(jitted: Callable, *args) -> str:
    """Optimized HLO of ``jitted`` for ``args`` (compiles; does not run)."""
    return jitted.lower(*args).compile().as_text()


def cost_bytes(jitted: Callable, *args) -> float | None:
    """XLA's estimate of bytes accessed by one call (None if the backend gives none)."""
    try:
        analysis = jitted.lower(*args).compile().cost_analysis()
    except Exception:  # noqa: BLE001 -- optional diagnostics only
        return None
    if isinstance(analysis, (list, tuple)):
        analysis = analysis[0] if analysis else None
    if not analysis:
        return None
    value = analysis.get("bytes accessed")
    return None if value is None else float(value)


@functools.lru_cache(maxsize=None)
def shapes_batch(batch: int, size: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Images and masks of the synthetic shapes data (numpy, cached)."""
    from adaptive_optax.segmentation.data import synthetic_shapes

    data = synthetic_shapes(batch, size=size, seed=seed)
    return data.images, data.masks
