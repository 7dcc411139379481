"""Training strategies compared on the same model, data and step budget.

Every strategy of ``adaptive_optax.segmentation.strategies.STRATEGIES`` (``make_optimizer``)
trains the same small U-Net with the same data, batch order and step budget,
for ``--seeds`` seeds (model init, batch order and the policy's mix picks),
through the library's own ``init_train_state`` / ``make_train_step`` /
``make_eval_step`` / ``loop.fit``. Per strategy it reports, as mean +- std
over seeds:

* final and best validation Dice (foreground, thresholded at logit 0);
* interventions (plateau_escape interventions; for ``reduce-on-plateau``
  the learning-rate reductions), rollbacks, and plateaus the detector
  declared (also counted for the non-intervening strategies);
* the largest one-window jump of the monitored loss after an intervention:
  the mean of the window after it over the mean of the window that
  triggered it (the seed's "catastrophic degradation" 0.32 -> 0.65 is 2.0x);
* the monitored (fixed-mix reference) loss of the last window.

The defaults are chosen so that a constant learning rate really plateaus
on the synthetic task: the hardest ``difficulty`` (1.0), a small U-Net
(depth 2, width 8, 32x32) and an Adam base rate that stalls (2e-5), with
plateau windows of one "epoch" of 8 steps, each drawn from a fresh random
part of 512 training images, so the window means carry sampling noise like a
real data stream. ``--plot PATH`` saves the monitored loss vs step of
``constant`` and ``adaptive`` (seed 0, first data set) to show it.

Compilation: runs that differ only in seed or data set have identical HLO;
a persistent compilation cache in a temporary directory (``--compile-cache``)
lets them reuse one compile instead of compiling again for every run.

Run::

    python benchmarks/strategies.py                       # defaults, both data sets
    python benchmarks/strategies.py --quick               # 1 seed, a few steps
    python benchmarks/strategies.py --data shapes --seeds 3 --plot loss.png --out s.json
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

import _common as C  # noqa: E402
from adaptive_optax.segmentation.data import load_dataset, num_batches  # noqa: E402
from adaptive_optax.segmentation.loop import fit  # noqa: E402
from adaptive_optax.segmentation.strategies import (  # noqa: E402
    STRATEGIES,
    eval_params_for,
    learning_rate_for,
    make_optimizer,
    policy_for,
)
from adaptive_optax.segmentation.train import (  # noqa: E402
    init_train_state,
    make_eval_step,
    make_train_step,
)
from adaptive_optax.segmentation.unet import UNet  # noqa: E402

DATA_SETS = ("shapes", "nuclei")


def detected_plateaus(steps: dict, patience: int, cooldown: int) -> int:
    """Plateaus the detector declared, read back from the per-step state.

    A plateau resets ``plateau_count`` from ``patience`` to 0 on a window
    close without a new ``best_value`` (an improvement also resets it, but
    moves the best). The ``cooldown`` windows after a plateau are replayed
    and skipped: with ``patience=0`` a non-improving cooldown window also
    leaves the count at 0 and the best unchanged, and is no plateau. (The
    replay counts every closed window; the benchmark's losses are finite.)
    """
    count, cooling = 0, 0
    closed = np.asarray(steps["windows_completed"])
    pc = np.asarray(steps["plateau_count"])
    best = np.asarray(steps["best_value"])
    for i in range(1, len(closed)):
        if closed[i] == closed[i - 1]:
            continue
        if cooling > 0:
            cooling -= 1
        elif pc[i - 1] == patience and pc[i] == 0 and best[i] == best[i - 1]:
            count, cooling = count + 1, cooldown
    return count


def intervention_steps(history, strategy: str) -> tuple[list[int], int]:
    """Steps whose update applied an intervention (or an LR reduction) and the rollbacks."""
    rollbacks = sum(1 for r in history.interventions if r["kind"] == "rollback")
    if strategy == "reduce-on-plateau":
        lr = np.asarray(history.steps["learning_rate"])
        # The base rate is constant: every drop of the effective rate is a reduction.
        drops = [i for i in range(1, len(lr)) if lr[i] < 0.5 * lr[i - 1]]
        return drops, rollbacks
    return [r["step"] for r in history.interventions if r["kind"] == "intervention"], rollbacks


def largest_jump(monitor: np.ndarray, steps: list[int], window: int) -> float | None:
    """Max over ``steps`` of mean(next window) / mean(window that ended at the step)."""
    ratios = []
    for s in steps:
        before = monitor[max(0, s - window + 1):s + 1]
        after = monitor[s + 1:s + 1 + window]
        if len(after) == window and len(before) and np.mean(before) > 0:
            ratios.append(float(np.mean(after) / np.mean(before)))
    return max(ratios) if ratios else None


def run_one(strategy: str, seed: int, train, val, cfg: argparse.Namespace) -> dict:
    """Trains one strategy/seed and summarises its history."""
    per_epoch = min(num_batches(train, cfg.batch_size), cfg.steps_per_epoch)
    total = per_epoch * cfg.epochs
    policy = policy_for(strategy)
    # prodigy's rows take its default multiplier, not the stalling Adam rate.
    tx = make_optimizer(strategy, learning_rate_for(strategy, cfg.lr), total_steps=total,
                        patience=cfg.patience,
                        accumulation_steps=per_epoch, cooldown=cfg.cooldown,
                        max_interventions=cfg.max_interventions, seed=seed)
    model = UNet(1, 1, depth=cfg.depth, base_width=cfg.width, rngs=nnx.Rngs(seed))
    graphdef, state = init_train_state(model, tx)
    train_step = make_train_step(graphdef, reference_weights=policy.initial_mix)
    eval_step = make_eval_step(graphdef, eval_params_for(strategy))  # schedule-free: its average
    started = time.perf_counter()
    state, history = fit(train_step, eval_step, state, train, val, epochs=cfg.epochs,
                         batch_size=cfg.batch_size, seed=seed, steps_per_epoch=per_epoch,
                         mix_label=policy.mix_label)
    seconds = time.perf_counter() - started
    monitor = history.array("monitor")
    steps, rollbacks = intervention_steps(history, strategy)
    dice = history.evals["dice"]
    return dict(
        strategy=strategy, seed=seed, seconds=seconds, steps=int(len(monitor)),
        final_dice=float(dice[-1]), best_dice=float(max(dice)),
        interventions=len(steps), rollbacks=rollbacks,
        plateaus=detected_plateaus(history.steps, cfg.patience, cfg.cooldown),
        steps_per_epoch=per_epoch,
        max_jump=largest_jump(monitor, steps, per_epoch),
        final_monitor=float(np.mean(monitor[-per_epoch:])),
        intervention_steps=steps,
        monitor=monitor.tolist(), learning_rate=history.steps["learning_rate"],
        dice_per_epoch=dice, interventions_log=history.interventions,
    )


def _mean_std(values) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} +- {statistics.stdev(values):.3f}"


def summarise(data_name: str, runs: list[dict], cfg) -> list[list]:
    rows = []
    for strategy in cfg.strategies:
        rs = [r for r in runs if r["strategy"] == strategy]
        jumps = [r["max_jump"] for r in rs if r["max_jump"] is not None]
        rows.append([
            strategy, len(rs), _mean_std([r["final_dice"] for r in rs]),
            _mean_std([r["best_dice"] for r in rs]),
            f"{statistics.mean(r['interventions'] for r in rs):.1f}",
            f"{statistics.mean(r['rollbacks'] for r in rs):.1f}",
            f"{statistics.mean(r['plateaus'] for r in rs):.1f}",
            f"{statistics.mean(jumps):.3f}" if jumps else "-",
            f"{max(jumps):.3f}" if jumps else "-",
            _mean_std([r["final_monitor"] for r in rs]),
            f"{statistics.mean(r['seconds'] for r in rs):.1f}",
        ])
    C.print_table(
        f"{data_name}: {cfg.epochs} epochs x {runs[0]['steps_per_epoch']} steps, "
        f"batch {cfg.batch_size}, "
        f"lr {cfg.lr:g}, U-Net depth {cfg.depth} width {cfg.width}, {cfg.size}x{cfg.size}",
        ["strategy", "seeds", "final dice", "best dice", "interv.", "rollb.", "plateaus",
         "jump mean", "jump max", "final monitor", "s/run"], rows)
    return rows


def plot(path: str, runs_by_data: dict, cfg) -> None:
    """Monitored loss vs step (raw and per-window mean) for constant vs adaptive, seed 0."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data_name = next(iter(runs_by_data))
    runs = runs_by_data[data_name]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    colors = {"constant": "tab:blue", "adaptive": "tab:red", "adaptive-guard": "tab:green"}
    seed = min(r["seed"] for r in runs)
    for strategy in ("constant", "adaptive"):
        match = [r for r in runs if r["strategy"] == strategy and r["seed"] == seed]
        if not match:
            continue
        r = match[0]
        m = np.asarray(r["monitor"])
        w = min(r["steps_per_epoch"], len(m))
        n = len(m) // w
        window_means = m[:n * w].reshape(n, w).mean(axis=1)
        ax.plot(np.arange(len(m)), m, color=colors[strategy], alpha=0.25, lw=0.8)
        ax.plot(np.arange(n) * w + w - 1, window_means, color=colors[strategy], lw=2,
                marker="o", ms=3, label=f"{strategy} (window mean)")
        for s in r["intervention_steps"]:
            ax.axvline(s, color=colors[strategy], ls="--", lw=1)
    ax.set_xlabel("step")
    ax.set_ylabel("monitored loss (fixed reference mix)")
    ax.set_title(f"{data_name}: constant vs adaptive (seed {seed}); dashed: interventions")
    ax.legend()
    fig.tight_layout()
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"\nwrote {path}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="1 seed, a tiny U-Net and a few steps (smoke test)")
    parser.add_argument("--data", choices=DATA_SETS + ("both",), default="both",
                        help="data set: shapes (synthetic), nuclei (bundled real image) or both")
    parser.add_argument("--seeds", type=int, default=None, help="seeds per strategy (default 5)")
    parser.add_argument("--strategies", default=",".join(STRATEGIES),
                        help="comma-separated subset of " + ",".join(STRATEGIES))
    parser.add_argument("--epochs", type=int, default=None, help="epochs (default 32)")
    parser.add_argument("--steps-per-epoch", type=int, default=None,
                        help="steps per epoch = plateau window (default 8); each epoch sees a "
                             "fresh random subset of the training set")
    parser.add_argument("--num-train", type=int, default=None,
                        help="training images/crops (default 512)")
    parser.add_argument("--batch-size", type=int, default=None, help="batch size (default 16)")
    parser.add_argument("--lr", type=float, default=None,
                        help="base learning rate (default 2e-5: Adam stalls at this rate)")
    parser.add_argument("--size", type=int, default=None, help="image size (default 32)")
    parser.add_argument("--depth", type=int, default=None, help="U-Net depth (default 2)")
    parser.add_argument("--width", type=int, default=None, help="U-Net base width (default 8)")
    parser.add_argument("--difficulty", type=float, default=1.0,
                        help="synthetic shapes difficulty in [0, 1]")
    parser.add_argument("--patience", type=int, default=None,
                        help="plateau patience in windows (default 2, quick 0)")
    parser.add_argument("--cooldown", type=int, default=1)
    parser.add_argument("--max-interventions", type=int, default=3)
    parser.add_argument("--compile-cache", default="tmp",
                        help="persistent compilation cache: 'tmp' (a temporary directory, "
                             "default), 'off', or a directory to keep")
    parser.add_argument("--plot", default=None, help="save the constant-vs-adaptive plot here")
    parser.add_argument("--out", default=None, help="write the results as JSON to this path")
    cfg = parser.parse_args(argv)
    quick_defaults = dict(seeds=1, epochs=4, steps_per_epoch=2, batch_size=4, lr=2e-5, size=16,
                          depth=0, width=4, num_train=16, patience=0)
    full_defaults = dict(seeds=5, epochs=32, steps_per_epoch=8, batch_size=16, lr=2e-5, size=32,
                         depth=2, width=8, num_train=512, patience=2)
    for key, value in (quick_defaults if cfg.quick else full_defaults).items():
        if getattr(cfg, key) is None:
            setattr(cfg, key, value)
    cfg.strategies = [s.strip() for s in cfg.strategies.split(",") if s.strip()]
    unknown = [s for s in cfg.strategies if s not in STRATEGIES]
    if unknown:
        parser.error(f"unknown strategies {unknown}; choose from {list(STRATEGIES)}")
    data_names = list(DATA_SETS) if cfg.data == "both" else [cfg.data]

    tmp = C.set_compile_cache(cfg.compile_cache)

    env = C.print_header("training strategies: same model, data and step budget", timed=False)
    print(f"# settings: {', '.join(f'{k}={v}' for k, v in sorted(vars(cfg).items()))}")
    started = time.perf_counter()
    results: dict = {"environment": env, "args": vars(cfg), "data": {}}
    runs_by_data: dict = {}
    for data_name in data_names:
        num_train = max(cfg.num_train, cfg.batch_size)
        try:
            if data_name == "shapes":
                train, val = load_dataset("shapes", size=cfg.size, num_train=num_train,
                                          num_val=4 * cfg.batch_size, difficulty=cfg.difficulty)
            else:
                train, val = load_dataset("nuclei", size=cfg.size, num_train=num_train)
        except ImportError as err:
            print(f"\n## {data_name}: skipped ({err})")
            continue
        print(f"\n# {data_name}: {train.images.shape[0]} train / {val.images.shape[0]} val "
              f"images of {cfg.size}x{cfg.size}")
        runs = []
        for seed in range(cfg.seeds):
            for strategy in cfg.strategies:
                r = run_one(strategy, seed, train, val, cfg)
                runs.append(r)
                jump = "-" if r["max_jump"] is None else f"{r['max_jump']:.3f}"
                print(f"  {data_name:6s} seed {seed} {strategy:17s} final dice "
                      f"{r['final_dice']:.3f} best {r['best_dice']:.3f} interv. "
                      f"{r['interventions']} plateaus {r['plateaus']} jump {jump} "
                      f"({r['seconds']:.1f} s)", flush=True)
        runs_by_data[data_name] = runs
        summarise(data_name, runs, cfg)
        results["data"][data_name] = runs
    if cfg.plot and runs_by_data:
        plot(cfg.plot, runs_by_data, cfg)
    results["elapsed_s"] = time.perf_counter() - started
    print(f"\nelapsed: {results['elapsed_s']:.1f} s")
    C.write_json(cfg.out, results)
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
