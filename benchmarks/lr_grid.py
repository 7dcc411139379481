"""Learning-rate grid: does ``plateau_escape`` get what a tuned schedule gets, without a sweep?

A user picks some learning rate. This benchmark trains every strategy of
:mod:`adaptive_optax.segmentation.strategies` at every rate of a grid, for several seeds
(model init, batch order and the policy's mix picks), with Adam and with SGD
(momentum 0.9), on several data sets, and reports per data set and
optimizer:

* ``tuned``: the best final validation Dice over the grid (the mean over
  seeds at each rate, then the max over rates): what an LR sweep buys;
* ``grid mean``: the mean of that Dice over the grid, and ``width``: the
  width in decades of the contiguous range of grid rates, around the best,
  whose Dice is within 0.01 of the strategy's best (0 = the best rate only):
  what a rate picked without a sweep gets;
* ``dice@const*`` and ``jump@const*``: the strategy's Dice and worst jump at
  the rate where ``constant`` is best -- does it hurt a well-tuned run?
* interventions (for ``reduce-on-plateau`` its rate cuts), rollbacks and the
  worst post-intervention jump over all runs: the mean monitored loss of the
  window after an intervention over the mean of the window that triggered
  it (``largest_jump`` of ``benchmarks/strategies.py``; the seed's failure
  0.32 -> 0.65 is 2.0x);
* a per-rate table of the seed-mean Dice; ``--plot`` draws it (one panel per
  data set and optimizer, the band is the min-max over seeds).

Grids. Adam 3e-4 .. 1e-1 and SGD 3e-3 .. 1 (6 rates, 2.5 decades each;
chosen so that constant training's best rate lies inside the grid on every
default data set, and the top rate is too high). ``schedule-free`` runs the
optimizer's grid times 3 (Defazio et al. 2024 train schedule-free at 1-10x
the rate of the scheduled baseline) and is evaluated at its averaged
parameters (``strategies.eval_params``). ``prodigy`` is learning-rate free:
its grid is over its ``learning_rate``, the multiplier of its own step-size
estimate (0.03 .. 10, default 1); ``prodigy-coef`` is prodigy at the default
multiplier with the same grid over its ``estim_lr_coef`` instead (the factor on
its estimate's growth). Both are Adam-type, so each is trained once per
data set and listed in the SGD table too (same runs). Under SGD,
``schedule-free`` is ``schedule_free_sgd`` (its ``b1`` averaging replaces the
momentum). ``escape-prodigy`` and ``escape-schedule-free`` are ``recommended``'s
plateau escape around those two, on their grids (``escape-prodigy`` shared by
both tables like ``prodigy``; ``escape-schedule-free``'s average is weighted by
the base rate, not the boosted one: ``adaptive_optax.boost_neutral_schedule_free``),
``lookahead-schedule-free`` is ``escape-schedule-free`` with the preset's
lookahead, and ``lookahead-prodigy`` (opt-in) ``escape-prodigy`` with it.
Every other strategy wraps the same optimizer.

Model and data. ``_common.TinyConvNet`` (three 3x3 convolutions, width 8,
737 parameters; width 16, 2.6k parameters, costs 1.3x per step and does not
fit the budget below at a converged step count), 32x32 crops, batch 8, 256
training crops per data set (``adaptive_optax.segmentation.data.load_dataset``: shapes,
nuclei, grey_matter by default, the sets the defaults were chosen on; any
name of ``DATASET_NAMES``, such as the confirmation sets nuclei_3d,
white_matter, textures, coins and bricks), evaluated once at the end on the held-out
validation set. Loss: the mix of dice/focal/variance/bce that the optimizer
state holds (``loss_weights``); monitored value: the fixed reference mix
``policy.initial_mix`` (as ``adaptive_optax.segmentation.train`` does).

Step budget and plateau settings. 1000 steps: constant Adam at its best rate
has converged on the default data sets by then (the trend of the last 10
windows improves the monitored loss by < 1% per window: -0.1% shapes, 0.6%
nuclei, 0.8% grey_matter when the budget was chosen; at 600 steps
grey_matter still improved by ~2% per window; the output prints the check).
Windows (``accumulation_steps``) are 1/30 of the run (33 steps); patience 2,
cooldown 1, and ``rtol=1e-3`` (for ``recommended`` unless its preset sets
them): a window counts as better only if it beats the best by 0.1%, so a
converged run whose window means wander by sampling noise (a few % per window
here) is seen as a plateau -- the case where an intervention could hurt a
tuned run.

Speed (2 CPU cores). Each run's step is one jitted function of (run state,
data, batch order) with the learning rate a traced value in the run state,
so a strategy compiles once per optimizer and data set and every rate and
seed reuses it. Measured for a 150-step grid of 18 runs: vmapping the seeds
and rates into one step took 40.8 s, dispatching the same jitted step once
per run 13.6 s (a vmapped convolution with per-run kernels becomes a grouped
convolution, slow on XLA:CPU), with identical results; so ``--batching`` is
``loop`` on CPU and ``vmap`` elsewhere. A ``lax.fori_loop`` of 10 steps per
call ran at 10.2 ms per step against 3.6 ms for the Python loop, so steps are
dispatched from Python. XLA:CPU runs a program this small on the thread that
dispatches it and its intra-op threads do not speed up the tiny convolutions,
so intra-op threading is off and ``--threads`` host threads each drive a
share of the runs. A step costs ~3.6 ms of CPU (the focal loss ~1 ms of it):
one grid is ~65 CPU-seconds (~35 s of wall time with 2 threads; a lookahead row
~40 s, a lookahead-schedule-free row ~45-65 s), the full run (99 grids:
prodigy, prodigy-coef and escape-prodigy are shared by both optimizers) took
2270 s (38 min) on 2 idle cores (``results/lr_grid_default_run_cpu.txt``,
2026-12-04). On 2026-12-02 the 96 grids of then took 3224 s (54 min) on a
slower draw of the machine (the grids both runs share took 1.47x as long);
scaled to that speed today's run is ~55 min, inside 60. The opt-in rows
(``OPT_IN``: ``lookahead-prodigy``, ~60-90 s a grid, and
``recommended-unguarded``, the preset without its guard, an ablation) are
left out of it. Per-step monitored loss, learning rate, interventions and rollbacks
are written into on-device arrays inside the step and fetched once per grid. A persistent compilation cache
(``--compile-cache``) lets the data sets share a compile (~2 s per grid).

Run::

    python benchmarks/lr_grid.py                   # the full grid (38-55 min on 2 idle cores)
    python benchmarks/lr_grid.py --quick           # a < 60 s smoke test
    python benchmarks/lr_grid.py --data nuclei --optimizers adam \\
        --strategies constant,cosine,recommended --out grid.json --plot grid.png
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import functools
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
# A tiny convolution gains nothing from XLA:CPU's intra-op threads; the runs
# are spread over host threads instead (drive_runs). Set before jax starts.
if "xla_cpu_multi_thread_eigen" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + " --xla_cpu_multi_thread_eigen=false").strip()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402

import _common as C  # noqa: E402
from adaptive_optax import presets  # noqa: E402
from adaptive_optax.segmentation import data as data_lib  # noqa: E402
from adaptive_optax.segmentation.losses import loss_components, mixed_loss  # noqa: E402
from adaptive_optax.segmentation.metrics import confusion_counts, dice_iou  # noqa: E402
from adaptive_optax.segmentation.strategies import (  # noqa: E402
    RECOMMENDED,
    DEFAULT_LOOKAHEAD,
    LOOKAHEAD,
    RATE_FREE,
    SCHEDULE_FREE,
    STRATEGIES,
    eval_params,
    make_optimizer,
    policy_for,
)
from adaptive_optax.segmentation.train import state_readings  # noqa: E402
from strategies import largest_jump  # noqa: E402  (benchmarks/strategies.py)

ADAM_RATES = (3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1)
SGD_RATES = (3e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0)
PRODIGY_MULTIPLIERS = (0.03, 0.1, 0.3, 1.0, 3.0, 10.0)
SCHEDULE_FREE_SHIFT = 3.0  # schedule-free's grid is the optimizer's times this
DEFAULT_DATA = ("shapes", "nuclei", "grey_matter")
OPTIMIZERS = ("adam", "sgd")
# Rows measured once and published (docs/benchmarks.md) but left out of the default run,
# which must fit in 60 minutes on 2 cores: ask for them with --strategies.
OPT_IN = ("lookahead-prodigy", "recommended-unguarded")
SGD_MOMENTUM = 0.9
DICE_TOLERANCE = 0.01  # the "width" counts rates within this of the best Dice
CONVERGED = 0.01  # constant Adam's last windows must improve by less than this, per window
CONVERGENCE_WINDOWS = 10  # ... on the trend over this many windows
HISTORY = ("monitor", "learning_rate", "interventions", "rollbacks", "trial_choice")
LOOKAHEAD_ROW = "lookahead-t"  # lookahead-t<N>: the lookahead strategy with trials of N steps


# --------------------------------------------------------------------------- what is run

def trial_rows(cfg: argparse.Namespace) -> dict[str, int]:
    """``{row name: trial steps}`` of the lookahead rows (``--trial-steps``).

    The default trial length keeps the plain name ``lookahead`` (its runs are
    the same as without the flag); another length ``N`` is row
    ``lookahead-tN``. ``"window"`` is one plateau window (``--window``).
    """
    default = DEFAULT_LOOKAHEAD.steps
    steps = [cfg.window if t == "window" else int(t) for t in cfg.trial_steps or [default]]
    return {("lookahead" if n == default else f"{LOOKAHEAD_ROW}{n}"): n for n in steps}


def base_strategy(row: str) -> str:
    """The strategy of :data:`STRATEGIES` a grid row trains (``lookahead-t1`` -> ``lookahead``)."""
    return "lookahead" if row.startswith(LOOKAHEAD_ROW) else row


def expand_rows(cfg: argparse.Namespace) -> list[str]:
    """``--strategies`` with ``lookahead`` replaced by its ``--trial-steps`` rows."""
    rows: list[str] = []
    for strategy in cfg.strategies:
        rows.extend(trial_rows(cfg) if strategy == "lookahead" else [strategy])
    return rows


def rate_grid(strategy: str, optimizer: str, cfg: argparse.Namespace) -> tuple[float, ...]:
    """The rates (for ``prodigy``: multipliers) a strategy is trained at."""
    if strategy in RATE_FREE:
        return tuple(cfg.rates_prodigy)
    rates = cfg.rates_adam if optimizer == "adam" else cfg.rates_sgd
    if strategy in SCHEDULE_FREE:
        return tuple(SCHEDULE_FREE_SHIFT * r for r in rates)
    return tuple(rates)


def inner_optimizer(strategy: str, optimizer: str) -> tuple[Callable, dict[str, Any]]:
    """``(factory, keywords)`` of the optimizer a strategy wraps (see the module docstring)."""
    if optimizer == "adam" or strategy in RATE_FREE:
        return optax.adam, {}
    if strategy in SCHEDULE_FREE:  # schedule_free_sgd: its b1 averaging is the momentum
        return optax.sgd, {}
    return optax.sgd, {"momentum": SGD_MOMENTUM}


def batch_order(num_examples: int, batch_size: int, steps: int, seed: int) -> np.ndarray:
    """int32 ``[steps, batch_size]`` example indices: epochs of shuffled full batches.

    The permutation of epoch ``e`` is ``default_rng([seed, e])``'s, as in
    :func:`adaptive_optax.segmentation.data.batches` (the remainder of each epoch dropped).
    """
    per_epoch = num_examples // batch_size
    epochs = -(-steps // per_epoch)
    order = [np.random.default_rng([seed, e]).permutation(num_examples)[:per_epoch * batch_size]
             for e in range(epochs)]
    return np.concatenate(order).reshape(-1, batch_size)[:steps].astype(np.int32)


# --------------------------------------------------------------------------- one run's step

class Run(NamedTuple):
    """One run's device state; the learning rate is a value here, not a constant."""

    rate: jax.Array  # float32 [], the base rate (prodigy: multiplier)
    params: Any
    opt_state: Any
    step: jax.Array  # int32 []
    history: dict[str, jax.Array]  # float32 [steps] each, HISTORY


class GridFunctions(NamedTuple):
    """What :func:`grid_functions` builds for one strategy (jitted)."""

    init: Callable  # (rate, params, seed) -> Run
    step: Callable  # (Run, train data, order [steps, B]) -> Run
    evaluate: Callable  # (Run, val data) -> confusion counts [C, 3]


def grid_functions(row: str, optimizer: str, graphdef, rest, cfg) -> GridFunctions:
    """The init, train step and evaluation of one grid row, each traced once for all runs."""
    strategy = base_strategy(row)
    factory, keywords = inner_optimizer(strategy, optimizer)
    policy = policy_for(strategy)
    reference = dict(policy.initial_mix)
    names = policy.loss_names
    options = dict(total_steps=cfg.steps, optimizer=factory, accumulation_steps=cfg.window,
                   patience=cfg.patience, cooldown=cfg.cooldown, rtol=cfg.rtol, **keywords)
    if strategy in RECOMMENDED or strategy in LOOKAHEAD:
        # The preset is under test, so it wins over this benchmark's settings: leave its
        # keys to make_optimizer, which applies it with each strategy's own changes to it
        # (recommended-restore's guard, recommended-unguarded's none).
        preset = presets.recommended_options(cfg.window, lookahead=strategy in LOOKAHEAD)
        for key in preset.keys() - {"accumulation_steps"}:
            options.pop(key, None)
    if strategy == "lookahead":  # the row's trial length, the default's other settings
        options["lookahead"] = dataclasses.replace(DEFAULT_LOOKAHEAD, steps=trial_rows(cfg)[row])

    def tx_of(rate, seed=0):
        # The seed only draws the mix plan at init; it lives in the state after.
        return make_optimizer(strategy, rate, seed=seed, **options)

    @functools.partial(jax.jit, static_argnums=2)
    def init(rate, params, seed):
        history = {k: jnp.zeros(cfg.steps, jnp.float32) for k in HISTORY}
        return Run(rate, params, tx_of(rate, seed).init(params), jnp.zeros([], jnp.int32),
                   history)

    def step(run: Run, train: data_lib.SegmentationData, order: jax.Array) -> Run:
        index = order[run.step]
        images, masks, instances = (a[index] for a in train)
        weights = optax.tree.get(run.opt_state, "loss_weights")

        def loss_fn(params):
            logits = nnx.merge(graphdef, params, rest)(images)
            components = loss_components(logits, masks, instances, names=names)
            return mixed_loss(components, weights), components

        def value_fn(params, loss_weights):  # the lookahead strategy's trials, on this batch
            logits = nnx.merge(graphdef, params, rest)(images)
            components = loss_components(logits, masks, instances, names=names)
            return mixed_loss(components, loss_weights), mixed_loss(components, reference)

        (_, components), grads = jax.value_and_grad(loss_fn, has_aux=True)(run.params)
        monitor = mixed_loss(components, reference)
        updates, opt_state = tx_of(run.rate).update(grads, run.opt_state, run.params,
                                                     value=monitor, value_fn=value_fn)
        readings = state_readings(opt_state)
        row = dict(monitor=monitor, learning_rate=readings["learning_rate"],
                   interventions=readings["intervention_count"],
                   rollbacks=readings.get("rollback_count", 0),
                   trial_choice=readings.get("trial_choice", -1))
        history = {k: run.history[k].at[run.step].set(jnp.asarray(row[k], jnp.float32))
                   for k in HISTORY}
        return Run(run.rate, optax.apply_updates(run.params, updates), opt_state,
                   run.step + 1, history)

    def evaluate(run: Run, val: data_lib.SegmentationData) -> jax.Array:
        params = eval_params(strategy, run.opt_state, run.params)
        return confusion_counts(nnx.merge(graphdef, params, rest)(val.images), val.masks)

    if cfg.batching == "vmap":  # runs stacked [seed, rate]; the rates share a seed's batches
        step = jax.vmap(jax.vmap(step, (0, None, None)), (0, None, 0))
        evaluate = jax.vmap(jax.vmap(evaluate, (0, None)), (0, None))
    return GridFunctions(init, jax.jit(step, donate_argnums=0), jax.jit(evaluate))


# --------------------------------------------------------------------------- one grid

def model_params(seed: int, cfg) -> tuple[Any, Any, Any]:
    """``(graphdef, params, rest)`` of the benchmark's model for one seed."""
    model = C.TinyConvNet(cfg.width, rngs=nnx.Rngs(seed))
    return nnx.split(model, nnx.Param, ...)


def drive_runs(step: Callable, runs: list[list[Run]], train, orders, steps: int,
               threads: int) -> None:
    """Steps every run of ``runs[seed][rate]`` ``steps`` times, in place.

    The runs are independent, so ``threads`` host threads each drive a share
    of them from start to end: XLA:CPU runs a program this small on the
    thread that dispatches it, one at a time per thread. The first step of
    every run is taken on this thread, so the step compiles once.
    """
    jobs = [(i, j) for i, row in enumerate(runs) for j in range(len(row))]

    def drive(share, count):
        for _ in range(count):
            for i, j in share:
                runs[i][j] = step(runs[i][j], train, orders[i])

    drive(jobs, 1)
    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        list(pool.map(drive, [jobs[k::threads] for k in range(threads)],
                      [steps - 1] * threads))


def train_grid(row: str, optimizer: str, train, val, cfg) -> dict[str, Any]:
    """Trains one grid row at every rate and seed; returns finals and histories (host)."""
    strategy = base_strategy(row)
    rates = rate_grid(strategy, optimizer, cfg)
    seeds = list(range(cfg.seeds))
    graphdef, _, rest = model_params(0, cfg)
    fns = grid_functions(row, optimizer, graphdef, rest, cfg)
    train = data_lib.SegmentationData(*map(jnp.asarray, train))
    val = data_lib.SegmentationData(*map(jnp.asarray, val))
    orders = [jnp.asarray(batch_order(train.images.shape[0], cfg.batch_size, cfg.steps, s))
              for s in seeds]
    started = time.perf_counter()
    runs = [[fns.init(jnp.float32(r), model_params(s, cfg)[1], s) for r in rates] for s in seeds]
    if cfg.batching == "vmap":
        stacked = jax.tree.map(lambda *x: jnp.stack(x), *[jax.tree.map(
            lambda *y: jnp.stack(y), *row) for row in runs])
        for _ in range(cfg.steps):
            stacked = fns.step(stacked, train, jnp.stack(orders))
        counts, history = fns.evaluate(stacked, val), stacked.history
    else:
        drive_runs(fns.step, runs, train, orders, cfg.steps, cfg.threads)
        counts = jnp.stack([jnp.stack([fns.evaluate(run, val) for run in row]) for row in runs])
        history = {k: jnp.stack([jnp.stack([run.history[k] for run in row]) for row in runs])
                   for k in HISTORY}
    counts, history = jax.device_get((counts, history))  # the one transfer of the grid
    seconds = time.perf_counter() - started
    dice = np.array([[float(dice_iou(c)[0].mean()) for c in row] for row in counts])
    return dict(strategy=row, optimizer=optimizer, rates=list(rates), seeds=seeds,
                final_dice=dice.T.tolist(),  # [rate][seed]
                history={k: np.transpose(v, (1, 0, 2)) for k, v in history.items()},
                seconds=seconds)


# --------------------------------------------------------------------------- summaries

def intervention_steps(strategy: str, history: dict[str, np.ndarray]) -> list[int]:
    """Steps whose update intervened (for ``reduce-on-plateau``: cut the rate), one run."""
    if strategy == "reduce-on-plateau":
        lr = history["learning_rate"]
        return [i for i in range(1, len(lr)) if lr[i] < 0.5 * lr[i - 1]]
    count = history["interventions"]
    return [i for i in range(1, len(count)) if count[i] > count[i - 1]]


def run_summaries(result: dict, window: int) -> dict[str, np.ndarray]:
    """Per-run interventions, rollbacks and largest jump, ``[rate, seed]`` each."""
    shape = np.shape(result["final_dice"])
    out = {k: np.full(shape, np.nan) for k in ("interventions", "rollbacks", "jump")}
    for r, s in np.ndindex(*shape):
        run = {k: v[r, s] for k, v in result["history"].items()}
        steps = intervention_steps(result["strategy"], run)
        jump = largest_jump(run["monitor"], steps, window)
        out["interventions"][r, s] = len(steps)
        out["rollbacks"][r, s] = run["rollbacks"][-1]
        out["jump"][r, s] = np.nan if jump is None else jump
    return out


def choice_counts(result: dict) -> list[int] | None:
    """How often each candidate was committed over all runs of a lookahead row, or None.

    Read at the steps whose update intervened (the trial runs in that
    update); the last entry counts the trials where every candidate was
    non-finite (the step then takes no boost).
    """
    if base_strategy(result["strategy"]) not in LOOKAHEAD:
        return None
    k = len(DEFAULT_LOOKAHEAD.candidates)
    counts = [0] * (k + 1)
    choice, count = result["history"]["trial_choice"], result["history"]["interventions"]
    for r, s in np.ndindex(*choice.shape[:2]):
        for i in intervention_steps("lookahead", {"interventions": count[r, s]}):
            c = int(choice[r, s, i])
            counts[k if c == -2 else c] += 1
    return counts


def print_choices(title: str, results: dict[str, dict]) -> None:
    """Per lookahead row: how often each candidate won its trial."""
    labels = [c.label for c in DEFAULT_LOOKAHEAD.candidates] + ["all non-finite"]
    rows = []
    for r in results.values():
        counts = choice_counts(r)
        if counts is not None:
            total = sum(counts)
            rows.append([r["strategy"], total]
                        + [f"{c / total:.2f}" if total else "-" for c in counts])
    if rows:
        C.print_table(f"{title}: lookahead, share of interventions won by each candidate",
                      ["row", "trials"] + labels, rows)


def tolerance_width(rates: Sequence[float], dice: np.ndarray) -> float:
    """Decades spanned by the contiguous rates around the best within DICE_TOLERANCE of it."""
    best = int(np.nanargmax(dice))
    ok = dice >= dice[best] - DICE_TOLERANCE
    lo = hi = best
    while lo > 0 and ok[lo - 1]:
        lo -= 1
    while hi < len(rates) - 1 and ok[hi + 1]:
        hi += 1
    return math.log10(rates[hi] / rates[lo])


def summary_row(result: dict, window: int, reference: dict | None = None) -> list:
    """One row of the summary table.

    Args:
        result: :func:`train_grid`'s result.
        window: Steps per plateau window.
        reference: ``constant``'s result on the same grid, or None: the
            ``@const*`` columns are this strategy's Dice and worst jump at
            constant's best rate (a well-tuned run); "-" on another grid.

    Returns:
        The cells, in the order of :data:`SUMMARY_HEADERS`.
    """
    dice = np.asarray(result["final_dice"]).mean(axis=1)
    runs = run_summaries(result, window)
    best = int(np.argmax(dice))
    jumps = runs["jump"][np.isfinite(runs["jump"])]
    at_tuned: list = ["-", "-"]
    if reference is not None and reference["rates"] == result["rates"]:
        tuned = int(np.argmax(np.asarray(reference["final_dice"]).mean(axis=1)))
        tuned_jumps = runs["jump"][tuned][np.isfinite(runs["jump"][tuned])]
        at_tuned = [float(dice[tuned]), float(tuned_jumps.max()) if tuned_jumps.size else "-"]
    return [result["strategy"], float(dice[best]), f"{result['rates'][best]:g}",
            float(dice.mean()), float(tolerance_width(result["rates"], dice)), *at_tuned,
            float(runs["interventions"].mean()), float(runs["rollbacks"].mean()),
            float(jumps.max()) if jumps.size else "-", float(result["seconds"])]


SUMMARY_HEADERS = ["strategy", "tuned dice", "best rate", "grid mean", "width (dec)",
                   "dice@const*", "jump@const*", "interv.", "rollb.", "jump max", "s/grid"]


def print_tables(title: str, results: dict[str, dict], cfg) -> None:
    """The summary table and the per-rate tables (one per distinct rate grid)."""
    reference = results.get("constant")
    rows = [summary_row(r, cfg.window, reference) for r in results.values()]
    C.print_table(title, SUMMARY_HEADERS, rows)
    grids: dict[tuple, list[dict]] = {}
    for r in results.values():
        grids.setdefault(tuple(r["rates"]), []).append(r)
    for rates, group in grids.items():
        headers = ["strategy"] + [f"{x:g}" for x in rates]
        per_rate = [[r["strategy"]] + [float(np.mean(d)) for d in r["final_dice"]] for r in group]
        unit = "multiplier" if all(r["strategy"] in RATE_FREE for r in group) else "rate"
        C.print_table(f"{title}: final validation Dice (mean over seeds) per {unit}", headers,
                      per_rate)


def window_means(monitor: np.ndarray, window: int) -> np.ndarray:
    """Per-window means of a per-step series (the last partial window dropped)."""
    n = len(monitor) // window
    return monitor[:n * window].reshape(n, window).mean(axis=1)


def convergence(result: dict, window: int) -> dict[str, Any]:
    """Whether constant training at its best rate has converged by the end of the run.

    Window means of the monitored loss (mean over seeds) are noisy (a few %
    from window to window: every batch is a fresh draw), so the check is a
    trend: the least-squares slope over the last CONVERGENCE_WINDOWS windows,
    as a fraction of their mean, is the relative improvement per window; it
    must be below CONVERGED. ``last_improvements`` are the raw relative
    improvements of the last three windows on the one before each.
    """
    dice = np.asarray(result["final_dice"]).mean(axis=1)
    best = int(np.nanargmax(dice))
    means = window_means(np.nanmean(result["history"]["monitor"][best], axis=0), window)
    tail = means[-CONVERGENCE_WINDOWS:]
    slope = np.polyfit(np.arange(len(tail)), tail, 1)[0] if len(tail) > 1 else 0.0
    per_window = float(-slope / np.mean(tail))
    last = [float((means[i - 1] - means[i]) / means[i - 1])
            for i in range(max(1, len(means) - 3), len(means))]
    return dict(rate=result["rates"][best], windows=len(tail), per_window=per_window,
                last_improvements=last, converged=bool(per_window < CONVERGED),
                window_means=means.tolist())


def print_convergence(title: str, check: dict) -> None:
    """Prints :func:`convergence`'s check on one line."""
    last = ", ".join(f"{100 * x:+.2f}%" for x in check["last_improvements"])
    print(f"\n# convergence of constant at its best rate {check['rate']:g} ({title}): over the "
          f"last {check['windows']} windows the monitored loss improves by "
          f"{100 * check['per_window']:+.2f}% per window (trend; < {100 * CONVERGED:g}%: "
          f"{'yes' if check['converged'] else 'NO'}); the last windows, raw: {last}")


# --------------------------------------------------------------------------- plot

def strategy_colors(panels: dict[tuple[str, str], dict[str, dict]]) -> dict[str, tuple]:
    """One colour per strategy over all panels, in the order the strategies first appear.

    Panels may hold different rows (files merged by ``lr_grid_targets.py``), and the plot
    has one legend for the figure, so a colour must not depend on a row's place in its
    panel.
    """
    import matplotlib

    names = list(dict.fromkeys(s for results in panels.values() for s in results))
    if len(names) <= 20:
        return {s: matplotlib.colormaps["tab20"](i) for i, s in enumerate(names)}
    spread = matplotlib.colormaps["gist_ncar"]
    return {s: spread(i / (len(names) - 1)) for i, s in enumerate(names)}


def plot(path: str, panels: dict[tuple[str, str], dict[str, dict]]) -> None:
    """Final validation Dice vs base rate, one panel per (data set, optimizer).

    Prodigy has no base rate: its rows are drawn as a horizontal line at their
    Dice at its default multiplier 1 (or the grid's middle multiplier).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data_names = sorted({d for d, _ in panels})
    optimizers = sorted({o for _, o in panels})
    colors = strategy_colors(panels)
    fig, axes = plt.subplots(len(data_names), len(optimizers), squeeze=False,
                             figsize=(6 * len(optimizers), 4 * len(data_names)))
    handles: dict[str, Any] = {}
    for (data_name, optimizer), results in panels.items():
        ax = axes[data_names.index(data_name)][optimizers.index(optimizer)]
        for strategy, r in results.items():
            dice = np.asarray(r["final_dice"])
            color = colors[strategy]
            if strategy in RATE_FREE:
                rates = r["rates"]
                at = rates.index(1.0) if 1.0 in rates else len(rates) // 2
                line = ax.axhline(dice[at].mean(), color=color, ls="--")
                handles.setdefault(f"{strategy} (x{rates[at]:g})", line)
                continue
            (line,) = ax.plot(r["rates"], dice.mean(axis=1), marker="o", ms=3, color=color)
            handles.setdefault(strategy, line)
            ax.fill_between(r["rates"], dice.min(axis=1), dice.max(axis=1), color=color,
                            alpha=0.15)
        ax.set_xscale("log")
        ax.set_xlabel("base learning rate")
        ax.set_ylabel("final validation Dice")
        ax.set_title(f"{data_name}, {optimizer}")
    columns = 4 if len(optimizers) > 1 else 2
    legend_rows = math.ceil(len(handles) / columns)
    height = fig.get_figheight()
    fig.legend(list(handles.values()), list(handles), loc="upper center", ncol=columns,
               fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0, 1, 1 - (0.2 * legend_rows + 0.2) / height))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"\nwrote {path}")


# --------------------------------------------------------------------------- main

def _floats(text: str) -> list[float]:
    """A comma-separated list of numbers (an argparse type)."""
    return [float(x) for x in text.split(",") if x.strip()]


def _names(text: str) -> list[str]:
    """A comma-separated list of names (an argparse type)."""
    return [x.strip() for x in text.split(",") if x.strip()]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The flags, with the defaults of the full or the ``--quick`` run filled in."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="smoke test: 1 seed, 2 rates, 40 steps, 3 strategies, shapes, adam")
    parser.add_argument("--strategies", type=_names, default=None,
                        help="comma-separated subset of " + ",".join(STRATEGIES)
                        + " (default all but " + ",".join(OPT_IN) + ")")
    parser.add_argument("--rates-adam", type=_floats, default=None,
                        help="Adam's rate grid (default " + ",".join(map(str, ADAM_RATES)) + ")")
    parser.add_argument("--rates-sgd", type=_floats, default=None,
                        help="SGD's rate grid (default " + ",".join(map(str, SGD_RATES)) + ")")
    parser.add_argument("--rates-prodigy", type=_floats, default=None,
                        help="prodigy's multipliers (default "
                             + ",".join(map(str, PRODIGY_MULTIPLIERS)) + ")")
    parser.add_argument("--seeds", type=int, default=None, help="seeds per rate (default 3)")
    parser.add_argument("--steps", type=int, default=None, help="steps per run (default 1000)")
    parser.add_argument("--window", type=int, default=None,
                        help="steps per plateau window (default steps // 30)")
    parser.add_argument("--data", type=_names, default=None,
                        help="comma-separated data sets from "
                             f"{','.join(data_lib.DATASET_NAMES)} (default "
                             f"{','.join(DEFAULT_DATA)})")
    parser.add_argument("--optimizers", type=_names, default=None,
                        help="comma-separated subset of adam,sgd (default both)")
    parser.add_argument("--trial-steps", type=_names, default=None,
                        help="trial lengths of the lookahead strategy, comma-separated ints or "
                             "'window' (one plateau window): one row per length, lookahead-tN "
                             f"(the default {DEFAULT_LOOKAHEAD.steps} keeps the name lookahead)")
    parser.add_argument("--patience", type=int, default=None, help="default 2 (quick 0)")
    parser.add_argument("--cooldown", type=int, default=1)
    parser.add_argument("--rtol", type=float, default=1e-3)
    parser.add_argument("--width", type=int, default=8, help="conv net width")
    parser.add_argument("--size", type=int, default=32, help="crop size")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--num-train", type=int, default=None,
                        help="training crops (default 256, quick 64)")
    parser.add_argument("--batching", choices=("auto", "loop", "vmap"), default="auto",
                        help="one jitted step per run (loop, faster on CPU) or all runs in one "
                             "vmapped step (vmap); auto: loop on CPU, vmap elsewhere")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                        help="host threads driving the runs with --batching loop "
                             "(default: the CPU count)")
    parser.add_argument("--compile-cache", default="tmp",
                        help="persistent compilation cache: 'tmp' (default), 'off' or a directory")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    parser.add_argument("--plot", default=None, help="save the Dice-vs-rate plot here")
    cfg = parser.parse_args(argv)
    quick = dict(strategies=["constant", "recommended", "schedule-free"], rates_adam=[1e-3, 1e-2],
                 rates_sgd=[1e-2, 1e-1], rates_prodigy=[0.3, 1.0], seeds=1, steps=40, window=4,
                 data=["shapes"], optimizers=["adam"], patience=0, num_train=64)
    full = dict(strategies=[s for s in STRATEGIES if s not in OPT_IN], rates_adam=list(ADAM_RATES),
                rates_sgd=list(SGD_RATES), rates_prodigy=list(PRODIGY_MULTIPLIERS), seeds=3,
                steps=1000, window=None, data=list(DEFAULT_DATA), optimizers=list(OPTIMIZERS),
                patience=2, num_train=256)
    for key, value in (quick if cfg.quick else full).items():
        if getattr(cfg, key) is None:
            setattr(cfg, key, value)
    if cfg.window is None:
        cfg.window = max(1, cfg.steps // 30)
    _check(parser, cfg)
    if cfg.batching == "auto":
        cfg.batching = "loop" if jax.default_backend() == "cpu" else "vmap"
    return cfg


def _check(parser: argparse.ArgumentParser, cfg: argparse.Namespace) -> None:
    """Rejects bad flags under their own names before anything is trained."""
    for flag, names, allowed in (("--strategies", cfg.strategies, STRATEGIES),
                                 ("--data", cfg.data, data_lib.DATASET_NAMES),
                                 ("--optimizers", cfg.optimizers, OPTIMIZERS)):
        unknown = [n for n in names if n not in allowed]
        if unknown or not names:
            parser.error(f"{flag} must be a comma-separated subset of {','.join(allowed)}, "
                         f"got {','.join(names) or 'nothing'}")
    for flag, rates in (("--rates-adam", cfg.rates_adam), ("--rates-sgd", cfg.rates_sgd),
                        ("--rates-prodigy", cfg.rates_prodigy)):
        if not rates or any(not (r > 0 and math.isfinite(r)) for r in rates):
            parser.error(f"{flag} must be rates > 0, got {rates}")
        if list(rates) != sorted(set(rates)):
            parser.error(f"{flag} must be increasing, got {rates}")
    for flag, value, low in (("--seeds", cfg.seeds, 1), ("--steps", cfg.steps, 2),
                             ("--window", cfg.window, 1), ("--patience", cfg.patience, 0),
                             ("--cooldown", cfg.cooldown, 0), ("--width", cfg.width, 1),
                             ("--size", cfg.size, 3), ("--batch-size", cfg.batch_size, 1),
                             ("--threads", cfg.threads, 1)):
        if value < low:
            parser.error(f"{flag} must be >= {low}, got {value}")
    for t in cfg.trial_steps or []:
        if t != "window" and not (t.isdigit() and 1 <= int(t) <= 10_000):
            parser.error(f"--trial-steps must be ints in [1, 10000] or 'window', got {t!r}")
    if cfg.trial_steps and "lookahead" not in cfg.strategies:
        parser.error("--trial-steps needs the lookahead strategy in --strategies")
    if len(set(trial_rows(cfg))) != len(cfg.trial_steps or [0]):
        parser.error(f"--trial-steps must be distinct lengths, got {cfg.trial_steps} "
                     f"(window = {cfg.window})")
    if cfg.num_train < cfg.batch_size:
        parser.error(f"--num-train must be >= --batch-size {cfg.batch_size}, got {cfg.num_train}")
    if not 0 <= cfg.rtol < 1:
        parser.error(f"--rtol must be in [0, 1), got {cfg.rtol}")


def load(name: str, cfg) -> tuple[Any, Any] | None:
    """``(train, val)`` of a data set, or None (printed) if its extra is not installed."""
    kwargs = dict(size=cfg.size, num_train=cfg.num_train)
    if name == "shapes":  # the crop sets tile a fixed held-out region instead
        kwargs["num_val"] = 64
    try:
        return data_lib.load_dataset(name, **kwargs)
    except ImportError as err:
        print(f"\n## {name}: skipped ({err})")
        return None


def main(argv: list[str] | None = None) -> int:
    """Runs every (data set, optimizer, strategy) grid; prints, plots and writes the results."""
    cfg = parse_args(argv)
    tmp = C.set_compile_cache(cfg.compile_cache)
    env = C.print_header("learning-rate grid: strategies x rates x seeds", timed=False)
    print(f"# settings: {', '.join(f'{k}={v}' for k, v in sorted(vars(cfg).items()))}")
    print(f"# model: TinyConvNet width {cfg.width} "
          f"({C.count(model_params(0, cfg)[1])} params), {cfg.size}x{cfg.size} crops, batch "
          f"{cfg.batch_size}; {cfg.steps} steps, windows of {cfg.window}, patience "
          f"{cfg.patience}, cooldown {cfg.cooldown}, rtol {cfg.rtol:g}; batching {cfg.batching}")
    # "recommended" is whatever the preset says today: record it with the results.
    preset = {k: repr(v) for k, v in presets.recommended_options(cfg.window).items()}
    print(f"# recommended = plateau_escape(**{preset})")
    with_lookahead = {k: repr(v) for k, v in
                      presets.recommended_options(cfg.window, lookahead=True).items()}
    print(f"# lookahead rows = plateau_escape(**{with_lookahead})")
    started = time.perf_counter()
    out: dict[str, Any] = {"environment": env, "args": vars(cfg), "recommended_options": preset,
                           "lookahead_options": with_lookahead, "results": {}, "convergence": {}}
    panels: dict[tuple[str, str], dict[str, dict]] = {}
    for data_name in cfg.data:
        loaded = load(data_name, cfg)
        if loaded is None:
            continue
        train, val = loaded
        print(f"\n# {data_name}: {train.images.shape[0]} train / {val.images.shape[0]} val "
              f"crops of {cfg.size}x{cfg.size}", flush=True)
        shared: dict[str, dict] = {}  # prodigy is Adam-type: trained once per data set
        for optimizer in cfg.optimizers:
            results = {}
            for strategy in expand_rows(cfg):
                if strategy in shared:
                    results[strategy] = shared[strategy]
                    continue
                r = train_grid(strategy, optimizer, train, val, cfg)
                results[strategy] = (shared.setdefault(strategy, r) if strategy in RATE_FREE
                                     else r)
                best = np.asarray(r["final_dice"]).mean(axis=1)
                print(f"  {data_name} {optimizer} {strategy:17s} dice per rate "
                      f"{' '.join(f'{d:.3f}' for d in best)} ({r['seconds']:.1f} s)", flush=True)
            title = f"{data_name}, {optimizer}"
            print_tables(title, results, cfg)
            print_choices(title, results)
            if set(RATE_FREE) & set(results) and optimizer != "adam":
                print("(prodigy is Adam-type: its rows are the same runs as in the adam table)")
            if "constant" in results:
                check = convergence(results["constant"], cfg.window)
                print_convergence(title, check)
                out["convergence"][title] = check
            out["results"].setdefault(data_name, {})[optimizer] = {
                s: {k: v for k, v in r.items() if k != "history"}
                | {"summary": dict(zip(SUMMARY_HEADERS, summary_row(
                    r, cfg.window, results.get("constant")))),
                   "trial_choice_counts": choice_counts(r),
                   "runs": {k: np.where(np.isfinite(v), v, None).tolist()  # [rate][seed]
                            for k, v in run_summaries(r, cfg.window).items()},
                   "monitor_window_means": [[window_means(m, cfg.window).tolist() for m in row]
                                            for row in r["history"]["monitor"]]}
                for s, r in results.items()}
            panels[(data_name, optimizer)] = results
    if cfg.plot and panels:
        plot(cfg.plot, panels)
    out["elapsed_s"] = time.perf_counter() - started
    print(f"\nelapsed: {out['elapsed_s']:.1f} s")
    C.write_json(cfg.out, out)
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
