"""Per-step cost of ``plateau_escape`` against plain optax, measured side by side.

What it measures (all in ONE process, the variants interleaved in a
seeded random order every repeat):

1. A jitted train step -- forward, backward, ``tx.update(grads, state, params,
   value=loss)`` and ``optax.apply_updates``, parameters and optimizer state
   donated -- with five optimizers:

   (a) ``optax.adam(lr)`` (the baseline of every ratio)
   (b) ``optax.chain(optax.adam(lr), optax.contrib.reduce_on_plateau())``
   (c) ``plateau_escape(optax.adam, lr)`` (adaptive policy, defaults)
   (d) ``plateau_escape(optax.adam, lr, rollback=RollbackGuard())``
   (e) ``optax.chain(optax.clip_by_global_norm(1.0), optax.adam(lr))``, the
       reference cost of "one global-norm reduction over the gradients"

   on two models: a tiny 3-layer conv net and the demo U-Net
   (``UNet(1, 1, depth=2, base_width=8)``, 64x64, batch 16), both on the
   synthetic shapes data with the same BCE loss. It prints seconds per step
   (min and median over repeats), each variant's ratio to (a), the optimizer
   state bytes and the bytes beyond (a), and op counts of the optimized HLO
   (executed ops: the entry computation's, a conditional's taken branch
   included, i.e. CPU thunks / GPU kernels; and copies of parameter-sized
   arrays).
2. A model-size sweep (MLP, ~1e4 -> 1e7 parameters) and a batch sweep (tiny
   conv net) of the (c)/(a) ratio next to (e)/(a). The extra row (c0) is
   ``plateau_escape(..., skip_nonfinite_updates=False)``: it isolates the cost
   of keeping the inner state on non-finite gradients.
3. The host cost of one more optimizer-state leaf: a donated step over N
   scalar leaves, or over arrays shaped like the U-Net's parameters, against
   the same values in one vector (why the state's scalars are packed,
   ``adaptive_optax/state.py``).
4. Compile count and host transfers over a 200-step run with 3 interventions
   (flat monitored value, ``patience=1``): traces are counted by a Python
   counter inside the jitted function and backend compiles by a
   ``jax.monitoring`` listener; the loop runs under
   ``jax.transfer_guard("disallow")`` with every input already on the device.

Run::

    python benchmarks/overhead.py                 # full run (a few minutes on 2 CPU cores)
    python benchmarks/overhead.py --quick         # small sizes, < 60 s on CPU
    python benchmarks/overhead.py --out overhead.json

The same script runs unchanged on GPU; the header prints the device kind.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402

import _common as C  # noqa: E402
from adaptive_optax import RollbackGuard, plateau_escape  # noqa: E402
from adaptive_optax.segmentation.data import SegmentationData  # noqa: E402
from adaptive_optax.segmentation.strategies import make_optimizer, policy_for  # noqa: E402
from adaptive_optax.segmentation.train import init_train_state, make_train_step  # noqa: E402
from adaptive_optax.segmentation.unet import UNet  # noqa: E402

LR = 1e-3

DESCRIPTIONS = {
    "a": "optax.adam",
    "b": "adam + contrib.reduce_on_plateau",
    "c": "plateau_escape(adam)",
    "c0": "plateau_escape(adam, skip_nonfinite_updates=False)",
    "d": "plateau_escape(adam, rollback=RollbackGuard())",
    "e": "clip_by_global_norm(1) + adam",
}


def make_tx(name: str) -> optax.GradientTransformationExtraArgs:
    """The optimizer of variant ``name`` (see :data:`DESCRIPTIONS`)."""
    if name == "a":
        return optax.with_extra_args_support(optax.adam(LR))
    if name == "b":
        return optax.chain(optax.adam(LR), optax.contrib.reduce_on_plateau())
    if name == "c":
        return plateau_escape(optax.adam, LR)
    if name == "c0":
        return plateau_escape(optax.adam, LR, skip_nonfinite_updates=False)
    if name == "d":
        return plateau_escape(optax.adam, LR, rollback=RollbackGuard())
    if name == "e":
        return optax.chain(optax.clip_by_global_norm(1.0), optax.adam(LR))
    raise ValueError(name)


def build_runners(model: nnx.Module, x, y, names, *, hlo: bool = True):
    """One warmed-up :class:`C.StepRunner` per variant, plus static facts about each."""
    graphdef, params, rest = C.split_params(model)
    runners, facts = {}, {}
    num_params = C.count(params)
    for name in names:
        tx = make_tx(name)
        opt_state = tx.init(params)
        step = C.make_step(graphdef, rest, tx)
        info = {"state_bytes": C.tree_nbytes(opt_state),
                "state_leaves": len(jax.tree.leaves(opt_state))}
        if hlo:
            text = C.compiled_text(step, params, opt_state, x, y)
            counts = C.hlo_counts(text)
            info.update(entry_ops=counts["entry_ops"], executed_ops=counts["executed_ops"],
                        copies=counts["copy"],
                        # elements moved by XLA-inserted copies, in parameter counts
                        copy_x_params=C.copied_elements(text) / num_params)
        runner = C.StepRunner(step, params, opt_state, (x, y))
        runner.warmup()
        runners[name], facts[name] = runner, info
    facts["_params"] = {"count": C.count(params), "bytes": C.tree_nbytes(params)}
    return runners, facts


def time_variants(runners, *, repeats: int, block_seconds: float) -> dict:
    """Interleaved timing; the block length is calibrated on variant (a)."""
    steps = C.calibrate_steps(runners["a"], block_seconds)
    wall, cpu = C.interleaved_times(runners, repeats=repeats, steps=steps)
    stats = C.ratio_stats(wall, "a", cpu)
    for name in stats:
        stats[name]["steps_per_block"] = steps
    return stats


def model_section(title: str, model: nnx.Module, x, y, args, names) -> dict:
    """Times all variants on one model and prints the main table."""
    started = time.perf_counter()
    runners, facts = build_runners(model, x, y, names)
    stats = time_variants(runners, repeats=args.repeats, block_seconds=args.block_seconds)
    p = facts["_params"]
    base_bytes = facts["a"]["state_bytes"]
    rows = []
    for name in names:
        s, f = stats[name], facts[name]
        extra = f["state_bytes"] - base_bytes
        rows.append([f"({name})", DESCRIPTIONS[name], s["min_s"] * 1e3, s["median_s"] * 1e3,
                     s["ratio_min"], s["ratio_median"], s["cpu_ratio_median"], f["state_bytes"],
                     extra, f"{extra / p['bytes']:.3f}", f["state_leaves"], f["executed_ops"],
                     f["copies"], f"{f['copy_x_params']:.2f}"])
    C.print_table(
        f"{title}: {p['count']} params ({p['bytes']} B), x {tuple(x.shape)}, "
        f"{args.repeats} repeats x {stats['a']['steps_per_block']} steps",
        ["variant", "optimizer", "min ms", "median ms", "ratio min", "ratio median",
         "cpu ratio med", "state B", "extra B", "extra/params", "leaves", "HLO ops", "copies",
         "copied/params"],
        rows)
    update_only = update_only_table(title, model, names, stats, args)
    print(f"(section: {time.perf_counter() - started:.1f} s)")
    return {"update_only": update_only, "params": p, "stats": stats,
            "facts": {k: v for k, v in facts.items() if not k.startswith("_")},
            "input_shape": list(x.shape)}


def update_only_table(title: str, model: nnx.Module, names, step_stats: dict, args) -> dict:
    """Optimizer-only cost (``tx.update`` + ``apply_updates``) of each variant, interleaved.

    The difference to (a) in microseconds is the absolute per-step overhead;
    divided by the full step time of (a) it predicts the full-step ratio with
    far less noise than timing the full steps.
    """
    _, params, _ = C.split_params(model)
    grads = C.fake_grads(params)
    value = jnp.float32(0.5)
    runners = {}
    for name in names:
        tx = make_tx(name)
        runner = C.StepRunner(C.make_update_step(tx), params, tx.init(params), (grads, value))
        runner.warmup()
        runners[name] = runner
    steps = C.calibrate_steps(runners["a"], args.block_seconds / 2, max_steps=2000)
    wall, cpu = C.interleaved_times(runners, repeats=args.repeats, steps=steps)
    stats = C.ratio_stats(wall, "a", cpu)
    # Wall delta over the wall step, CPU delta over the CPU step: process CPU
    # time counts every XLA thread, so the two clocks must not be mixed.
    full_a, full_a_cpu = step_stats["a"]["median_s"], step_stats["a"]["cpu_median_s"]
    rows = []
    for name in names:
        s = stats[name]
        delta = s["median_s"] - stats["a"]["median_s"]
        delta_cpu = s["cpu_median_s"] - stats["a"]["cpu_median_s"]
        rows.append([f"({name})", s["min_s"] * 1e6, s["median_s"] * 1e6, delta * 1e6,
                     delta_cpu * 1e6, 1.0 + delta / full_a, 1.0 + delta_cpu / full_a_cpu])
        s["delta_us"], s["delta_cpu_us"] = delta * 1e6, delta_cpu * 1e6
        s["predicted_step_ratio"] = 1.0 + delta / full_a
        s["predicted_step_ratio_cpu"] = 1.0 + delta_cpu / full_a_cpu
    C.print_table(
        f"{title}: optimizer only (update + apply_updates), {args.repeats} repeats x {steps} "
        f"steps; predicted ratio = 1 + delta / full step of (a)",
        ["variant", "min us", "median us", "delta us (wall med)", "delta us (cpu med)",
         "predicted ratio (wall)", "predicted ratio (cpu)"], rows)
    return stats


def sweep_section(title: str, label: str, configs, make_model_and_batch: Callable, args,
                  names) -> list[dict]:
    """Ratio of each variant to (a) for each config (model size or batch size)."""
    rows, results = [], []
    started = time.perf_counter()
    for cfg in configs:
        model, x, y = make_model_and_batch(cfg)
        runners, facts = build_runners(model, x, y, names)
        stats = time_variants(runners, repeats=args.sweep_repeats,
                              block_seconds=args.block_seconds)
        p = facts["_params"]
        med = {n: stats[n]["ratio_median"] for n in names}
        mins = {n: stats[n]["ratio_min"] for n in names}
        cpu = {n: stats[n]["cpu_ratio_median"] for n in names}
        row = [cfg, p["count"], stats["a"]["min_s"] * 1e3]
        for n in names[1:]:
            row.append(f"{mins[n]:.3f}/{med[n]:.3f}/{cpu[n]:.3f}")
        row.append(f"{med['c'] - med['e']:+.3f}/{cpu['c'] - cpu['e']:+.3f}")
        row.append(f"{facts['a']['copy_x_params']:.2f}/{facts['c']['copy_x_params']:.2f}")
        rows.append(row)
        results.append({"config": cfg, "params": p, "stats": stats,
                        "facts": {k: v for k, v in facts.items() if not k.startswith("_")}})
        del runners
    C.print_table(
        f"{title} (ratio to (a): wall min / wall median / CPU-time median over "
        f"{args.sweep_repeats} interleaved repeats)",
        [label, "params", "(a) min ms"] + [f"({n})/(a)" for n in names[1:]]
        + ["(c)-(e) wall/cpu med", "copied/params (a)/(c)"], rows)
    print(f"(section: {time.perf_counter() - started:.1f} s)")
    return results


def leaf_cost_section(args) -> dict:
    """Host cost of optimizer-state leaves: the same values as many leaves or as one vector.

    Why the plateau-escape state is packed (``adaptive_optax/state.py``): every
    leaf is a buffer a jitted step takes in, donates and hands back. A step
    that only adds 1 to every value is timed with the values held as N leaves
    (N float32 scalars; or arrays shaped like the U-Net's parameters, as the
    rollback guard's snapshot and each of Adam's moments are) and as one
    vector of the same size; "per extra leaf" is the difference divided by
    N - 1: the fixed cost of one more state leaf per step.
    """
    started = time.perf_counter()
    counts = [8, 32] if args.quick else [8, 32, 128]
    unet_cfg = dict(depth=0, base_width=4) if args.quick else dict(depth=2, base_width=8)
    _, unet_params, _ = C.split_params(UNet(1, 1, **unet_cfg, rngs=nnx.Rngs(0)))
    cases = {f"{n} scalars": {f"s{i:03d}": jnp.zeros([], jnp.float32) for i in range(n)}
             for n in counts}
    cases["U-Net parameter shapes"] = jax.tree.map(jnp.zeros_like, unet_params)
    step = jax.jit(lambda params, state, x: (params, jax.tree.map(lambda s: s + x, state)),
                   donate_argnums=(0, 1))
    params = {"w": jnp.zeros(16, jnp.float32)}
    one = (jnp.float32(1.0),)
    runners = {}
    for label, leaves in cases.items():
        size = sum(x.size for x in jax.tree.leaves(leaves))
        runners[f"{label}: leaves"] = C.StepRunner(step, params, leaves, one)
        runners[f"{label}: vector"] = C.StepRunner(step, params,
                                                   {"v": jnp.zeros([size], jnp.float32)}, one)
    for runner in runners.values():
        runner.warmup()
    # Calibrated on a middle variant: the largest one's blocks stay well under a second.
    steps = C.calibrate_steps(runners[f"{counts[len(counts) // 2]} scalars: leaves"],
                              args.block_seconds / 2, max_steps=20000)
    wall, cpu = C.interleaved_times(runners, repeats=args.repeats, steps=steps)
    stats = C.ratio_stats(wall, f"{counts[0]} scalars: vector", cpu)
    rows = []
    for label, leaves in cases.items():
        n = len(jax.tree.leaves(leaves))
        many, one_vector = stats[f"{label}: leaves"], stats[f"{label}: vector"]
        per_leaf = (many["median_s"] - one_vector["median_s"]) / (n - 1) * 1e6
        per_leaf_cpu = (many["cpu_median_s"] - one_vector["cpu_median_s"]) / (n - 1) * 1e6
        many["per_leaf_us"], many["per_leaf_cpu_us"] = per_leaf, per_leaf_cpu
        rows.append([label, n, sum(x.size for x in jax.tree.leaves(leaves)),
                     one_vector["median_s"] * 1e6, many["median_s"] * 1e6, per_leaf,
                     per_leaf_cpu])
    C.print_table(
        f"state-leaf cost: a donated step adding 1 to every value, held as N leaves or as "
        f"one vector; {args.repeats} repeats x {steps} steps",
        ["values held as", "N", "values", "1 vector us (wall med)", "N leaves us (wall med)",
         "per extra leaf us (wall)", "per extra leaf us (cpu)"], rows)
    print(f"(section: {time.perf_counter() - started:.1f} s)")
    return stats


def compile_and_transfer_check(steps: int, width: int, size: int, batch: int, *,
                               unet_depth: int = 1) -> dict:
    """Traces, compiles and host transfers over ``steps`` steps with 3 interventions."""
    events: list[str] = []
    started = time.perf_counter()

    def listener(event, duration, **kwargs):
        events.append(event)

    jax.monitoring.register_event_duration_secs_listener(listener)
    images, masks = C.shapes_batch(batch, size)
    x, y = jax.device_put(images), jax.device_put(masks)
    flat = jax.device_put(np.float32(1.0))
    model = C.TinyConvNet(width, rngs=nnx.Rngs(0))
    graphdef, params, rest = C.split_params(model)
    results = {}
    configs = {
        "(c) plateau_escape": dict(),
        "(d) plateau_escape + rollback": dict(rollback=RollbackGuard()),
    }
    rows = []
    for label, extra in configs.items():
        tx = plateau_escape(optax.adam, LR, patience=1, accumulation_steps=10, cooldown=0,
                            max_interventions=3, **extra)
        counter: dict = {}
        step = C.make_step(graphdef, rest, tx, counter=counter, monitor_arg=True)
        p, s = C.fresh_copy(params), tx.init(params)
        jax.block_until_ready((p, s))
        before = events.count("/jax/core/compile/backend_compile_duration")
        error = None
        try:
            with jax.transfer_guard("disallow"):
                for _ in range(steps):
                    p, s, loss = step(p, s, x, y, flat)
                jax.block_until_ready((p, s, loss))
        except Exception as err:  # noqa: BLE001 -- a transfer is reported, not raised
            error = f"{type(err).__name__}: {str(err).splitlines()[0][:160]}"
        compiles = events.count("/jax/core/compile/backend_compile_duration") - before
        interventions = int(optax.tree.get(s, "intervention_count")) if error is None else -1
        rows.append([label, steps, counter.get("traces", 0), compiles,
                     0 if error is None else ">=1", interventions])
        results[label] = dict(steps=steps, traces=counter.get("traces", 0), compiles=compiles,
                              transfers=0 if error is None else None, error=error,
                              interventions=interventions)
        if error:
            print(f"transfer guard tripped for {label}: {error}")

    # The library's own train step (nnx.Optimizer, reference loss monitored):
    # same check, data batches already on the device.
    from adaptive_optax.segmentation.data import load_dataset

    train, _ = load_dataset("shapes", size=size, num_train=4 * batch, num_val=batch)
    device_batches = [jax.device_put(SegmentationData(*(a[i * batch:(i + 1) * batch]
                                                        for a in train))) for i in range(4)]
    tx = make_optimizer("adaptive", LR, total_steps=steps, patience=0, cooldown=0,
                        max_interventions=3)
    unet = UNet(1, 1, depth=unet_depth, base_width=4, rngs=nnx.Rngs(0))
    graphdef, state = init_train_state(unet, tx)
    train_step = make_train_step(graphdef, reference_weights=policy_for("adaptive").initial_mix)
    jax.block_until_ready(state)
    before = events.count("/jax/core/compile/backend_compile_duration")
    traces_before = events.count("/jax/core/compile/jaxpr_trace_duration")
    error = None
    try:
        with jax.transfer_guard("disallow"):
            for i in range(steps):
                state, metrics = train_step(state, device_batches[i % len(device_batches)])
            jax.block_until_ready((state, metrics))
    except Exception as err:  # noqa: BLE001
        error = f"{type(err).__name__}: {str(err).splitlines()[0][:160]}"
    compiles = events.count("/jax/core/compile/backend_compile_duration") - before
    traces = events.count("/jax/core/compile/jaxpr_trace_duration") - traces_before
    interventions = int(metrics.readings["intervention_count"]) if error is None else -1
    label = f"library make_train_step (adaptive, U-Net depth {unet_depth})"
    rows.append([label, steps, traces, compiles, 0 if error is None else ">=1", interventions])
    results[label] = dict(steps=steps, traces=traces, compiles=compiles,
                          transfers=0 if error is None else None, error=error,
                          interventions=interventions)
    if error:
        print(f"transfer guard tripped for {label}: {error}")
    C.print_table(
        "compiles and host transfers (transfer_guard('disallow'), inputs on device)",
        ["run", "steps", "traces", "compiles", "transfers", "interventions"], rows)
    for label, r in results.items():
        transfers = r["transfers"] if r["transfers"] is not None else ">=1"
        print(f"{label}: compiles: {r['compiles']}, transfers: {transfers}, "
              f"interventions: {r['interventions']}")
    jax.monitoring.unregister_event_duration_listener(listener)
    print(f"(section: {time.perf_counter() - started:.1f} s)")
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    C.add_timing_args(parser, "tiny sizes and few repeats (< 60 s on a 2-core CPU)")
    parser.add_argument("--sweep-repeats", type=int, default=None,
                        help="interleaved repeats per sweep point (default 7, quick 3)")
    parser.add_argument("--skip-unet", action="store_true", help="skip the U-Net table")
    parser.add_argument("--skip-sweeps", action="store_true", help="skip both sweeps")
    parser.add_argument("--compile-steps", type=int, default=200,
                        help="steps of the compile/transfer check")
    args = C.resolve_timing_args(parser.parse_args(argv))
    if args.sweep_repeats is None:
        args.sweep_repeats = 3 if args.quick else 7

    env = C.print_header("plateau_escape overhead: jitted train step, ratios to optax.adam")
    started = time.perf_counter()
    names = ["a", "b", "c", "d", "e"]
    C.print_table("variants", ["variant", "optimizer"],
                  [[f"({n})", DESCRIPTIONS[n]] for n in ["a", "b", "c", "c0", "d", "e"]])
    results: dict = {"environment": env, "args": vars(args), "descriptions": DESCRIPTIONS}

    images, masks = C.shapes_batch(args.tiny_batch, args.tiny_size)
    x, y = jnp.asarray(images), jnp.asarray(masks)
    tiny = C.TinyConvNet(args.tiny_width, rngs=nnx.Rngs(0))
    results["tiny"] = model_section(
        f"tiny conv net (width {args.tiny_width})", tiny, x, y, args, names)

    if not args.skip_unet:
        if args.quick:  # a much smaller U-Net keeps the quick run short (compile time)
            unet_cfg, size, batch = dict(depth=0, base_width=4), 16, 4
        else:
            unet_cfg, size, batch = dict(depth=2, base_width=8), 64, 16
        images, masks = C.shapes_batch(batch, size)
        unet = UNet(1, 1, **unet_cfg, rngs=nnx.Rngs(0))
        results["unet"] = model_section(
            f"U-Net {unet_cfg}", unet, jnp.asarray(images), jnp.asarray(masks), args, names)

    targets = []
    for key, label, bound in (("tiny", "(c)/(a) tiny conv net", 1.03),
                              ("unet", "(c)/(a) U-Net", 1.01)):
        if key not in results:
            continue
        c = results[key]["stats"]["c"]
        targets.append([label, f"<= {bound}", c["ratio_min"], c["ratio_median"],
                        c["cpu_ratio_median"],
                        "yes" if c["ratio_median"] <= bound else "NO",
                        "yes" if c["cpu_ratio_median"] <= bound else "NO"])
    C.print_table("targets (wall min/median and CPU-time median ratios)",
                  ["ratio", "target", "wall min", "wall median", "cpu median",
                   "met (wall med)", "met (cpu med)"], targets)

    if not args.skip_sweeps:
        sweep_names = ["a", "c", "e"] if args.quick else ["a", "b", "c", "c0", "d", "e"]
        in_features, mlp_batch = 256, 16
        sizes = [1e4] if args.quick else [1e4, 1e5, 1e6, 1e7]

        def mlp_point(num_params):
            width = C.mlp_width_for(num_params, in_features)
            model = C.MLP(in_features, width, rngs=nnx.Rngs(0))
            key_x, key_y = jax.random.split(jax.random.PRNGKey(0))
            x = jax.random.normal(key_x, (mlp_batch, in_features), jnp.float32)
            y = (jax.random.uniform(key_y, (mlp_batch, 1)) > 0.5).astype(jnp.float32)
            return model, x, y

        results["size_sweep"] = sweep_section(
            f"model-size sweep: MLP {in_features}->w->w->1, batch {mlp_batch}", "target params",
            [int(s) for s in sizes], mlp_point, args, sweep_names)

        batches = [2] if args.quick else [1, 4, 16, 64]

        def batch_point(batch):
            images, masks = C.shapes_batch(batch, args.tiny_size)
            model = C.TinyConvNet(args.tiny_width, rngs=nnx.Rngs(0))
            return model, jnp.asarray(images), jnp.asarray(masks)

        results["batch_sweep"] = sweep_section(
            f"batch sweep: tiny conv net, {args.tiny_size}x{args.tiny_size}", "batch", batches,
            batch_point, args, ["a", "c", "e"])

    results["leaf_cost"] = leaf_cost_section(args)
    results["compile_transfer"] = compile_and_transfer_check(
        args.compile_steps, args.tiny_width, args.tiny_size, args.tiny_batch,
        unet_depth=0 if args.quick else 1)
    results["elapsed_s"] = time.perf_counter() - started
    print(f"\nelapsed: {results['elapsed_s']:.1f} s")
    C.write_json(args.out, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
