"""Checks the recommended configuration against the learning-rate grid's targets.

Reads one or more JSON files written by ``benchmarks/lr_grid.py --out`` and,
for every data set and inner optimizer, compares ``recommended`` with the
baselines (strategies that are not plateau escape: ``constant``, ``cosine``,
``warmup-cosine``, ``sgdr``, ``reduce-on-plateau``, ``prodigy`` (its
multiplier grid), ``prodigy-coef`` (its ``estim_lr_coef`` grid),
``schedule-free``) on the three targets of the grid:

1. robustness: its grid mean >= every baseline's grid mean;
2. tuned: its best over the grid >= the best tuned baseline - 0.005;
3. safety: no post-intervention jump >= 1.5x.

Next to the jump, the table gives its noise floor: the largest rise of one
window's mean monitored loss over the previous window's in the ``constant``
runs of the same panel, which never intervene (``natural_rise``). A jump
below it cannot be told apart from the run's own spikes.

Several files can be merged (a full run of the baselines and a later run of
``recommended`` alone, say). The runs are deterministic, so a strategy that
appears in two files must have identical per-seed results there: this is
checked, and a file pair that disagrees is refused rather than mixed.

Run::

    python benchmarks/lr_grid_targets.py benchmarks/results/lr_grid_cpu.json \\
        benchmarks/results/lr_grid_recommended_cpu.json --replace recommended \\
        --plot benchmarks/results/lr_grid_cpu.png
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _common as C  # noqa: E402

BASELINES = ("constant", "cosine", "warmup-cosine", "sgdr", "reduce-on-plateau", "prodigy",
             "prodigy-coef", "schedule-free")
# The sets the defaults were chosen on, and the ones held back to confirm them
# (docs/benchmarks.md says when each confirmation set was first looked at).
TUNING_SETS = ("shapes", "nuclei", "grey_matter")
CONFIRMATION_SETS = ("nuclei_3d", "white_matter", "textures", "coins", "bricks")
TUNED_SLACK = 0.005
JUMP_LIMIT = 1.5


def merge(paths: list[str], replace: tuple[str, ...] = ()) -> dict:
    """``{data: {optimizer: {strategy: result}}}`` from all files; later files add strategies.

    Args:
        paths: JSON files of ``lr_grid.py --out``.
        replace: Strategies whose rows in a later file replace an earlier file's
            (a re-run after a fix), instead of having to agree with them.

    Raises:
        ValueError: If a strategy present in two files has different final Dice.
    """
    merged: dict = {}
    for path in paths:
        with open(path) as f:
            results = json.load(f)["results"]
        for data, by_opt in results.items():
            for opt, by_strategy in by_opt.items():
                slot = merged.setdefault(data, {}).setdefault(opt, {})
                for strategy, result in by_strategy.items():
                    if (strategy in slot and strategy not in replace
                            and slot[strategy]["final_dice"] != result["final_dice"]):
                        raise ValueError(f"{strategy} on {data}/{opt} differs between the files "
                                         f"(last: {path}): the runs are not the same runs.")
                    slot[strategy] = result
    return merged


def _jump(result: dict) -> float | None:
    value = result["summary"].get("jump max")
    return None if value in (None, "-") else float(value)


def natural_rise(result: dict | None) -> float | None:
    """The largest ``window[w] / window[w - 1]`` of the mean monitored loss, over
    every run and window of ``result`` (``lr_grid.py``'s ``monitor_window_means``,
    ``[rate, seed, window]``), or None without them."""
    means = None if result is None else result.get("monitor_window_means")
    if not means:
        return None
    worst = None
    for per_seed in means:
        for windows in per_seed:
            for before, after in zip(windows, windows[1:]):
                if before > 0 and not math.isnan(after):  # NaN before fails before > 0
                    worst = after / before if worst is None else max(worst, after / before)
    return worst


def check(by_strategy: dict, candidate: str = "recommended") -> list[list]:
    """One row per target: the candidate's figure, the baseline's, and whether it is met."""
    baselines = {s: by_strategy[s]["summary"] for s in BASELINES if s in by_strategy}
    if candidate not in by_strategy or not baselines:
        return []
    mine = by_strategy[candidate]["summary"]
    best_mean = max(baselines, key=lambda s: baselines[s]["grid mean"])
    best_tuned = max(baselines, key=lambda s: baselines[s]["tuned dice"])
    jump = _jump(by_strategy[candidate])
    rise = natural_rise(by_strategy.get("constant"))
    floor = "-" if rise is None else f"constant's own rise {rise:.3f}"
    return [
        ["grid mean >= every baseline's", f"{mine['grid mean']:.3f}",
         f"{baselines[best_mean]['grid mean']:.3f} ({best_mean})",
         "yes" if mine["grid mean"] >= baselines[best_mean]["grid mean"] else "NO"],
        [f"tuned >= best tuned baseline - {TUNED_SLACK}", f"{mine['tuned dice']:.3f}",
         f"{baselines[best_tuned]['tuned dice']:.3f} ({best_tuned})",
         "yes" if mine["tuned dice"] >= baselines[best_tuned]["tuned dice"] - TUNED_SLACK
         else "NO"],
        [f"largest jump < {JUMP_LIMIT}x", "-" if jump is None else f"{jump:.3f}", floor,
         "yes" if jump is None or jump < JUMP_LIMIT else "NO"],
    ]


def count_met(merged: dict, candidate: str = "recommended",
              datasets: tuple[str, ...] | None = None) -> tuple[int, int]:
    """``(targets met, targets checked)`` for ``candidate`` over ``merge``'s panels.

    Args:
        merged: ``{data: {optimizer: {strategy: result}}}`` from :func:`merge`.
        candidate: The strategy to check.
        datasets: Only these data sets (all when None).

    Returns:
        The two counts; panels without the candidate or without baselines count 0 of 0.

    Example::

        met, total = count_met(merge(paths), "lookahead-schedule-free", TUNING_SETS)
    """
    met = total = 0
    for data, by_opt in merged.items():
        if datasets is not None and data not in datasets:
            continue
        for by_strategy in by_opt.values():
            rows = check(by_strategy, candidate)
            met += sum(r[-1] == "yes" for r in rows)
            total += len(rows)
    return met, total


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("paths", nargs="+", help="JSON files from lr_grid.py --out")
    parser.add_argument("--candidate", default="recommended",
                        help="the strategy to check (default: recommended)")
    parser.add_argument("--replace", default="",
                        help="comma-separated strategies whose rows in later files replace "
                             "earlier ones (a re-run after a fix)")
    parser.add_argument("--plot", default=None,
                        help="redraw lr_grid.py's Dice-vs-rate plot from the merged rows")
    args = parser.parse_args(argv)
    print(f"# command: {C.command_line()}")
    replace = tuple(s for s in args.replace.split(",") if s)
    if replace:
        print(f"# rows of {', '.join(replace)} taken from the last file that has them")
    merged = merge(args.paths, replace)
    met = total = 0
    for data, by_opt in merged.items():
        for opt, by_strategy in by_opt.items():
            rows = check(by_strategy, args.candidate)
            if not rows:
                continue
            C.print_table(f"{data}, {opt}: {args.candidate} against the baselines",
                          ["target", args.candidate, "best baseline", "met"], rows)
            met += sum(r[-1] == "yes" for r in rows)
            total += len(rows)
    print(f"\n{met} of {total} targets met")
    for name, sets in (("tuning", TUNING_SETS), ("confirmation", CONFIRMATION_SETS)):
        part_met, part_total = count_met(merged, args.candidate, sets)
        if part_total:
            print(f"  on the {name} sets ({', '.join(sets)}): {part_met} of {part_total}")
    if args.plot:
        import lr_grid  # imports jax and flax: only when a plot is asked for

        lr_grid.plot(args.plot, {(d, o): by_strategy for d, by_opt in merged.items()
                                 for o, by_strategy in by_opt.items()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
