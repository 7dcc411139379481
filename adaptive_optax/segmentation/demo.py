"""The demo: train a U-Net with plateau escape on the bundled nuclei image.

Run ``python -m adaptive_optax.demo`` (or ``adaptive-optax``, or ``python -m
adaptive_optax.segmentation.demo``); ``--help`` lists every option. It trains
on random crops of the 2018 Data Science Bowl nucleus image that the
``stardist`` wheel bundles, validates on a held-out region, logs each
intervention, and trains a baseline (``--compare``, the constant rate by
default) beside it with the same data and seed, to show whether plateau escape
helped. It prints a Dice/IoU table with a row per run, writes ``run.png``,
``history.json`` and Orbax checkpoints to ``--out``, and ``--resume``
continues a run bit-identically from its latest checkpoint.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor

import jax
from flax import nnx

from adaptive_optax._validation import FLOAT32_MAX, INT32_MAX, check_float
from adaptive_optax.lookahead import DEFAULT_CANDIDATES, Candidate
from adaptive_optax.segmentation import checkpoint
from adaptive_optax.segmentation.data import DATASET_NAMES, load_dataset, num_batches
from adaptive_optax.segmentation.loop import History, fit
from adaptive_optax.segmentation.strategies import (
    STRATEGIES,
    eval_params_for,
    learning_rate_for,
    make_optimizer,
    policy_for,
)
from adaptive_optax.segmentation.train import init_train_state, make_eval_step, make_train_step
from adaptive_optax.segmentation.unet import UNet
from adaptive_optax.transform import MAX_INTERVENTIONS_BOUND

# What the one foreground class of each bundled data set is.
_CLASS_NAMES = {"nuclei": "nucleus", "nuclei_3d": "nucleus", "shapes": "shape",
                "grey_matter": "grey matter", "white_matter": "white matter", "textures": "grass",
                "bricks": "brick",
                "coins": "coin"}
# Options that do not change the numbers of a run, so --resume may differ in them.
# The comparison run is not checkpointed (it is trained again, from scratch,
# on --resume), so --compare is one of them.
_NOT_CONFIG = ("out", "resume", "progress", "checkpoint_every", "compare")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit code 2
        self.exit(2, f"{self.prog}: error: {message}\n")


def _number(text: str, kind: type, what: str):
    try:
        return kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}") from None


def _positive_int(text: str) -> int:
    value = _number(text, int, "an integer >= 1")
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text}")
    return value


def _non_negative_int(text: str) -> int:
    value = _number(text, int, "an integer >= 0")
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {text}")
    return value


def _checked_float(text: str, what: str, in_range: str, **interval) -> float:
    """A float in ``interval``, checked by ``check_float`` (also after rounding to float32).

    ``what`` is said of a non-number, ``in_range`` of a number out of range.
    """
    value = _number(text, float, what)
    try:
        return check_float("value", value, **interval)
    except ValueError:  # the library's message names its own argument, not the flag
        raise argparse.ArgumentTypeError(f"must be {in_range}, got {text}") from None


def _positive_float(text: str) -> float:
    what = f"a number in (0, {FLOAT32_MAX:g}] (float32)"
    return _checked_float(text, what, what, low=0.0, low_open=True)


def _fraction(text: str) -> float:  # rtol is used in float32
    return _checked_float(text, "a number in [0, 1)", "in [0, 1) (also in float32)",
                          low=0.0, high=1.0, high_open=True)


def _intervention_cap(text: str) -> int:
    what = f"an integer in [0, {MAX_INTERVENTIONS_BOUND}]"
    value = _number(text, int, what)
    if not 0 <= value <= MAX_INTERVENTIONS_BOUND:
        raise argparse.ArgumentTypeError(f"must be {what}, got {text}")
    return value


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows defaults, except for flags and options whose help says it."""

    def _get_help_string(self, action):
        if isinstance(action.default, bool) or action.default is None:
            return action.help
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    """The demo's command-line interface."""
    p = _Parser(prog="adaptive-optax", description=__doc__.split("\n\n")[0],
                formatter_class=_HelpFormatter)
    p.add_argument("--strategy", choices=STRATEGIES, default="recommended",
                   help="what to do on a plateau (recommended: the configuration README "
                        "starts with)")
    p.add_argument("--compare", choices=("none", *STRATEGIES), default="constant",
                   help="baseline trained beside the main run, concurrently, with the same "
                        "data, seed, epochs, steps, batch size and model, drawn in run.png and "
                        "given a row in the table; about doubles the CPU work (on 2 CPU "
                        "cores, the default demo takes ~1.4-1.7x as long): 'none' for the "
                        "quickest run. Ignored when it is --strategy. Not checkpointed: "
                        "--resume trains it again from scratch")
    p.add_argument("--data", choices=DATASET_NAMES, default="nuclei",
                   help="bundled data set (nuclei: the real nucleus image; see "
                        "adaptive_optax.segmentation.data)")
    p.add_argument("--epochs", type=_positive_int, default=40, help="training epochs")
    p.add_argument("--steps-per-epoch", type=_positive_int, default=None,
                   help="cap on batches per epoch (default: the whole training set)")
    p.add_argument("--batch-size", type=_positive_int, default=16, help="global batch size")
    p.add_argument("--lr", type=_positive_float, default=1e-3,
                   help="base learning rate (Adam); prodigy, escape-prodigy and lookahead-prodigy "
                        "ignore it and "
                        "use prodigy's own estimate (multiplier 1)")
    p.add_argument("--patience", type=_non_negative_int, default=1,
                   help="non-improving epochs tolerated before a plateau")
    p.add_argument("--cooldown", type=_non_negative_int, default=1,
                   help="epochs after an intervention with no plateau counted")
    p.add_argument("--rtol", type=_fraction, default=0.05,
                   help="relative improvement an epoch needs to count as one")
    p.add_argument("--max-interventions", type=_intervention_cap, default=3,
                   help="cap on interventions")
    p.add_argument("--depth", type=_non_negative_int, default=2, help="U-Net downsamplings")
    p.add_argument("--width", type=_positive_int, default=8, help="U-Net base width")
    p.add_argument("--seed", type=_non_negative_int, default=0,
                   help="seed of data, initialisation and mix picks")
    p.add_argument("--devices", type=_positive_int, default=1,
                   help="data-parallel devices (fake CPU devices need XLA_FLAGS)")
    p.add_argument("--out", default="runs/demo", help="output directory")
    p.add_argument("--checkpoint-every", type=_non_negative_int, default=5,
                   help="save an Orbax checkpoint every N epochs (0: never)")
    p.add_argument("--resume", action="store_true",
                   help="continue from the latest checkpoint in OUT/checkpoints (with the "
                        "run's options: --epochs too, which the schedules depend on; the "
                        "--compare baseline, which may differ, is trained again from scratch)")
    p.add_argument("--no-progress", dest="progress", action="store_false",
                   help="no progress bar (shown by default)")
    return p


def run_config(args: argparse.Namespace) -> dict:
    """The options that determine a run's numbers (stored in checkpoints)."""
    return {k: v for k, v in sorted(vars(args).items()) if k not in _NOT_CONFIG}


def build(args: argparse.Namespace, strategy: str | None = None, data=None):
    """Data, model, optimizer and jitted steps for ``args``.

    ``strategy`` replaces ``args.strategy`` (the comparison run); ``data``, a
    ``(train, val)`` pair, reuses the data of another run instead of loading it.
    """
    strategy = args.strategy if strategy is None else strategy
    train_data, val_data = load_dataset(args.data, seed=args.seed) if data is None else data
    if args.batch_size > train_data.images.shape[0]:
        raise ValueError(f"--batch-size {args.batch_size} exceeds the "
                         f"{train_data.images.shape[0]} training images.")
    steps_per_epoch = num_batches(train_data, args.batch_size)
    if args.steps_per_epoch is not None:
        steps_per_epoch = min(steps_per_epoch, args.steps_per_epoch)
    # Checked here, under the flags' names, before the library checks them under its own.
    if args.epochs * steps_per_epoch > INT32_MAX:
        raise ValueError(f"--epochs {args.epochs} x {steps_per_epoch} steps per epoch must be "
                         f"at most {INT32_MAX} steps (the int32 step count).")
    size = train_data.images.shape[1:3]
    max_depth = min(int(n & -n).bit_length() - 1 for n in size)  # the 2-adic valuation
    if args.depth > max_depth:
        raise ValueError(f"--depth must be in [0, {max_depth}]: the {size[0]}x{size[1]} crops "
                         f"halve {max_depth} times without a remainder, got --depth {args.depth}.")
    if args.width * 2**args.depth > 2**16:
        raise ValueError(f"--width x 2**--depth must be at most {2**16} channels, got "
                         f"--width {args.width}, --depth {args.depth}.")
    policy = policy_for(strategy)
    # --lr is a rate; prodigy's learning_rate is a multiplier of its own estimate.
    tx = make_optimizer(strategy, learning_rate_for(strategy, args.lr),
                        total_steps=args.epochs * steps_per_epoch, patience=args.patience,
                        cooldown=args.cooldown, rtol=args.rtol, accumulation_steps=steps_per_epoch,
                        max_interventions=args.max_interventions, seed=args.seed)
    model = UNet(1, 1, depth=args.depth, base_width=args.width, rngs=nnx.Rngs(args.seed))
    graphdef, state = init_train_state(model, tx)
    return dict(train=train_data, val=val_data, policy=policy, graphdef=graphdef, state=state,
                steps_per_epoch=steps_per_epoch,
                train_step=make_train_step(graphdef, reference_weights=policy.initial_mix),
                eval_step=make_eval_step(graphdef, eval_params_for(strategy)))


def format_intervention(event: dict, candidates: Sequence[Candidate] = DEFAULT_CANDIDATES) -> str:
    """One log line per intervention or rollback.

    An intervention chosen by a lookahead trial ends with each candidate's
    monitored value after its trial, the committed one starred
    (``| trial: policy 0.412, no boost 0.398*, ...``).

    Args:
        event: A record of :attr:`History.interventions`.
        candidates: The lookahead's candidates, to name the trial's values
            (the demo's ``lookahead`` strategy uses the default ones).

    Returns:
        The line, without a newline.
    """
    weights = ", ".join(f"{k} {v:g}" for k, v in event["weights_after"].items() if v)
    line = (f"[{event['kind']} {event['number']}] epoch {event['epoch']} | plateau window "
            f"{event['window']} | grad-norm EMA {event['grad_norm_ema']:.4g} | lr "
            f"{event['lr_before']:.3g} -> {event['lr_after']:.3g} (base x{event['boost']:.3g}) | mix "
            f"{event['mix_before']} -> {event['mix_after']} ({weights})")
    if "trial_values" not in event:
        return line
    labels = [c.label for c in candidates]
    if len(labels) != len(event["trial_values"]):  # candidates the caller did not name
        labels = [f"#{i}" for i in range(len(event["trial_values"]))]
    choice = event["trial_choice"]
    tried = ", ".join(f"{name} {value:.4g}{'*' if i == choice else ''}"
                      for i, (name, value) in enumerate(zip(labels, event["trial_values"])))
    return line + f" | trial: {tried}" + (" (all non-finite: no boost)" if choice < 0 else "")


def _count(history: History, kind: str) -> int:
    return sum(event["kind"] == kind for event in history.interventions)


def results_table(runs: Mapping[str, History], class_name: str = "foreground") -> str:
    """The final validation table: one row per run (strategy -> history), main run first.

    Each row has the last epoch's Dice and IoU (mean over classes), the best
    Dice and its epoch, and the run's interventions and rollbacks. With more
    than one class, the per-class scores of the first run follow;
    ``class_name`` names a binary task's class.
    """
    first = next(iter(runs.values()))
    classes = len(first.evals["dice_per_class"][-1])
    width = max(len("strategy"), *map(len, runs)) + 2
    what = f"class: {class_name}" if classes == 1 else f"mean of {classes} classes"
    rows = [f"validation after the last epoch ({what})",
            f"{'strategy':<{width}}{'Dice':>7}{'IoU':>8}{'best Dice (epoch)':>19}"
            f"{'interventions':>15}{'rollbacks':>11}"]
    for name, history in runs.items():
        dice = history.evals["dice"]
        best = max(range(len(dice)), key=dice.__getitem__)  # the first best epoch
        best_text = f"{dice[best]:.4f} ({history.evals['epoch'][best]})"
        rows.append(f"{name:<{width}}{dice[-1]:>7.4f}{history.evals['iou'][-1]:>8.4f}"
                    f"{best_text:>19}{_count(history, 'intervention'):>15}"
                    f"{_count(history, 'rollback'):>11}")
    if classes > 1:
        label = f"{next(iter(runs))} per class"
        width = max(width, len(label) + 2)
        rows.append(f"{label:<{width}}{'Dice':>7}{'IoU':>8}")
        for i, (d, u) in enumerate(zip(first.evals["dice_per_class"][-1],
                                       first.evals["iou_per_class"][-1])):
            rows.append(f"{f'class {i}':<{width}}{d:>7.4f}{u:>8.4f}")
    return "\n".join(rows)


class _Stopped(Exception):
    """Raised in the baseline's thread when the main run failed or was interrupted."""


def _train(parts: dict, args: argparse.Namespace, state, *, history: History | None = None,
           start_epoch: int = 0, on_epoch_end=None, on_step: Callable[[], None] | None = None):
    """Trains one run of ``build``'s ``parts`` over ``--devices``; ``(state, history)``."""
    put_batch, train_step = None, parts["train_step"]
    if args.devices > 1:
        from adaptive_optax import parallel

        # Replicated state, batch split over the "data" axis: jit's sharding
        # propagation makes the loss and gradients global means, so every
        # device takes the same plateau decisions (docs/multidevice.md).
        mesh = parallel.data_parallel_mesh(args.devices)
        state = parallel.replicate(state, mesh)
        train_step = parallel.data_parallel(train_step, mesh)
        put_batch = lambda batch: parallel.shard_batch(batch, mesh)  # noqa: E731
    return fit(train_step, parts["eval_step"], state, parts["train"], parts["val"],
               epochs=args.epochs, batch_size=args.batch_size, seed=args.seed,
               start_epoch=start_epoch, history=history, steps_per_epoch=parts["steps_per_epoch"],
               mix_label=parts["policy"].mix_label, on_epoch_end=on_epoch_end, on_step=on_step,
               put_batch=put_batch)


def load_histories(path: str) -> dict[str, History]:
    """The runs of a demo's ``history.json``: strategy -> history, the main run first.

    The file holds the main run's history (with its ``strategy``) and, under
    ``"compare"``, the baseline's, if one was trained.

    Example:
        >>> from adaptive_optax.segmentation import plotting
        >>> runs = load_histories("runs/demo/history.json")  # doctest: +SKIP
        >>> (name, history), *others = runs.items()  # doctest: +SKIP
        >>> fig = plotting.plot_run(history, name=name, compare=dict(others))  # doctest: +SKIP
    """
    with open(path) as f:
        record = json.load(f)
    fields = ("steps", "evals", "interventions")
    runs = {record.get("strategy", "main"): History(**{k: record[k] for k in fields})}
    if record.get("compare"):
        runs[record["compare"]["strategy"]] = History(**{k: record["compare"][k] for k in fields})
    return runs


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the demo; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.batch_size % args.devices:
        parser.error(f"--batch-size {args.batch_size} must be divisible by --devices {args.devices}")
    if args.devices > 1:
        from adaptive_optax import parallel

        try:  # on CPU, split the host into N devices; must happen before any array exists
            parallel.set_cpu_device_count(args.devices)
        except RuntimeError:
            pass  # JAX already running (e.g. called from a notebook): use the devices it has
    if args.devices > jax.device_count():
        parser.error(f"--devices {args.devices} exceeds the {jax.device_count()} available "
                     "devices (on CPU set XLA_FLAGS=--xla_force_host_platform_device_count=N)")

    compare = None if args.compare in ("none", args.strategy) else args.compare
    try:
        parts = build(args)
        baseline = None if compare is None else build(args, compare, (parts["train"], parts["val"]))
    except (ValueError, ImportError) as err:
        parser.error(str(err))
    os.makedirs(args.out, exist_ok=True)
    ckpt_dir = os.path.join(args.out, "checkpoints")
    config = run_config(args)
    state, history, start_epoch = parts["state"], None, 0
    if args.resume:
        if checkpoint.latest_epoch(ckpt_dir) is None:
            parser.error(f"--resume: no checkpoint in {ckpt_dir}")
        try:
            state, history, last = checkpoint.restore(ckpt_dir, state, config)
        except checkpoint.CheckpointMismatchError as err:
            parser.error(str(err))
        start_epoch = last + 1
        print(f"resumed from epoch {last} in {ckpt_dir}")

    steps_per_epoch = parts["steps_per_epoch"]
    print(f"adaptive-optax demo: strategy {args.strategy}"
          + (f" (baseline {compare} beside it)" if compare else "") + f", data {args.data} "
          f"({parts['train'].images.shape[0]} train / {parts['val'].images.shape[0]} val crops), "
          f"{args.epochs} epochs x {steps_per_epoch} steps, device "
          f"{jax.devices()[0].device_kind} x{args.devices}")
    bar, lock = None, threading.Lock()  # the lock: both runs update the bar
    if args.progress:
        from tqdm.auto import tqdm

        total = (args.epochs - start_epoch + (args.epochs if compare else 0)) * steps_per_epoch
        bar = tqdm(total=total, unit="step", dynamic_ncols=True)
    say = bar.write if bar is not None else print

    def tick():
        if bar is not None:
            with lock:
                bar.update()

    def logger(prefix: str, logged: int):
        def log(history: History) -> None:
            nonlocal logged
            for event in history.interventions[logged:]:
                say(prefix + format_intervention(event))
            logged = len(history.interventions)
        return log

    log_main = logger("", len(history.interventions) if history is not None else 0)

    def on_epoch_end(epoch, state, history):
        log_main(history)
        if bar is not None:
            with lock:
                bar.set_postfix(epoch=epoch, loss=f"{history.steps['monitor'][-1]:.4f}",
                                dice=f"{history.evals['dice'][-1]:.4f}")
        if args.checkpoint_every and (epoch + 1) % args.checkpoint_every == 0:
            checkpoint.save(ckpt_dir, epoch, state, history, config)

    # The baseline trains in a second thread: one run of this small model keeps
    # only ~1.5 of 2 CPU cores busy, so together they take ~1.4x, not 2x, the
    # time of one. Each run's numbers do not depend on the other
    # (tests/segmentation/test_demo.py checks it).
    stop = threading.Event()
    log_baseline = logger(f"({compare}) ", 0)

    def baseline_step():
        if stop.is_set():
            raise _Stopped
        tick()

    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="baseline") as pool:
        try:
            future = None if compare is None else pool.submit(
                _train, baseline, args, baseline["state"], on_step=baseline_step,
                on_epoch_end=lambda epoch, state, history: log_baseline(history))
            state, history = _train(parts, args, state, history=history, start_epoch=start_epoch,
                                    on_epoch_end=on_epoch_end, on_step=tick)
            baseline_history = None if future is None else future.result()[1]
        except BaseException:
            stop.set()  # the baseline stops at its next step
            raise
        finally:
            if bar is not None:
                with lock:
                    bar.close()
    elapsed = time.perf_counter() - started
    print(f"\ntrained {args.epochs - start_epoch} epochs of {args.strategy}"
          + (f" and {args.epochs} of {compare} beside it" if compare else "")
          + f" in {elapsed:.1f} s")
    runs = {args.strategy: history, **({compare: baseline_history} if compare else {})}
    print(results_table(runs, _CLASS_NAMES.get(args.data, "foreground")))
    record = {"strategy": args.strategy, **json.loads(history.to_json())}
    if compare:
        record["compare"] = {"strategy": compare, **json.loads(baseline_history.to_json())}
    with open(os.path.join(args.out, "history.json"), "w") as f:
        json.dump(record, f)
    with open(os.path.join(args.out, "config.json"), "w") as f:
        json.dump({**config, "compare": compare or "none"}, f, indent=2)
    plot_path = _plot(runs, args)
    print(f"wrote {os.path.join(args.out, 'history.json')}" + (f" and {plot_path}" if plot_path else ""))
    return 0


def _plot(runs: dict[str, History], args) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        from adaptive_optax.segmentation.plotting import plot_run
    except ImportError as err:
        print(f"no plot: {err}", file=sys.stderr)
        return None
    (name, history), *others = runs.items()
    title = f"adaptive-optax demo: {name} on {args.data}"
    if others:
        title += ", " + ", ".join(other for other, _ in others) + " beside it"
    fig = plot_run(history, title=title, name=name, compare=dict(others) or None)
    path = os.path.join(args.out, "run.png")
    fig.savefig(path, dpi=110, bbox_inches="tight")
    return path


if __name__ == "__main__":
    sys.exit(main())
