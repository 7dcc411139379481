"""Figures of a training run, read from its :class:`~adaptive_optax.segmentation.loop.History`.

Every plot here draws what the optimizer state recorded, step by step, during
:func:`adaptive_optax.segmentation.loop.fit`: the monitored value and the plateau
detector's windows, the effective and base learning rates, the loss-mix
weights and the per-epoch validation scores. Interventions (and rollbacks)
come from ``history.interventions``.

================================  ============================================
:func:`plot_monitor`              monitored value, window means, non-improving
                                  windows shaded, interventions marked
:func:`plot_learning_rate`        effective and base learning rate (log scale),
                                  each intervention annotated
:func:`plot_loss_weights`         loss-mix weights as a stacked area
:func:`plot_validation`           per-epoch validation Dice and IoU
:func:`plot_comparison`           validation Dice and monitored window means of
                                  several runs, one line per run
:func:`plot_run`                  the four panels above in one figure, and
                                  optionally the comparison below them
:func:`loss_along_line`           loss on the segment between two parameter sets
:func:`plot_loss_slice`           that 1-D slice of the loss landscape
================================  ============================================

matplotlib is an optional dependency (``pip install 'adaptive-optax[demo]'``),
imported only when a plot is drawn. Figures are created as
``matplotlib.figure.Figure`` objects, not through ``pyplot``: nothing is
registered in pyplot's global figure list (no leak in loops, no duplicate
display in notebooks). Return the figure from a notebook cell to show it, or
call ``fig.savefig(path)``. Functions that take ``ax`` draw into that axes
instead and return its figure.

Example:
    >>> from adaptive_optax.segmentation.loop import History
    >>> history = History(steps={"monitor": [1.0, 0.9], "windows_completed": [1, 2],
    ...                          "window_value": [1.0, 0.9], "best_value": [1.0, 0.9]})
    >>> fig = plot_monitor(history)
    >>> len(fig.axes)
    1
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

    from adaptive_optax.segmentation.loop import History

__all__ = [
    "loss_along_line",
    "plot_comparison",
    "plot_learning_rate",
    "plot_loss_slice",
    "plot_loss_weights",
    "plot_monitor",
    "plot_run",
    "plot_validation",
]

_INSTALL_HINT = "pip install 'adaptive-optax[demo]'"

# One colour per event kind, shared by all panels so a run reads as one story.
_EVENT_STYLE = {
    "intervention": dict(color="tab:red", marker="v"),
    "rollback": dict(color="black", marker="x"),
}
_PLATEAU_COLOR = "tab:orange"


# --------------------------------------------------------------------------- helpers


def _figure_class():
    """Imports matplotlib lazily (an optional dependency) and returns ``Figure``."""
    try:
        from matplotlib.figure import Figure
    except ImportError as err:
        raise ImportError(
            "adaptive_optax.segmentation.plotting needs matplotlib, an optional dependency; "
            f"install it with: {_INSTALL_HINT}") from err
    return Figure


def _root_figure(ax: Axes) -> Figure:
    # ax.figure is a SubFigure when ax lives in one; its .figure is the root.
    fig = ax.figure
    return getattr(fig, "figure", None) or fig


def _axes(ax: Axes | None, figsize: tuple[float, float]) -> tuple[Figure, Axes]:
    """The given axes and its figure, or a fresh single-axes figure."""
    figure_class = _figure_class()
    if ax is None:
        fig = figure_class(figsize=figsize, layout="constrained")
        return fig, fig.add_subplot()
    if not hasattr(ax, "plot") or not hasattr(ax, "figure"):
        raise TypeError(f"ax must be a matplotlib Axes or None, got {type(ax).__name__}.")
    return _root_figure(ax), ax


def _check_history(history: Any) -> None:
    for field in ("steps", "evals", "interventions"):
        if not hasattr(history, field):
            raise TypeError("history must be an adaptive_optax.segmentation.loop.History (as "
                            f"returned by fit), got {type(history).__name__} without .{field}.")
    if not isinstance(history.steps, Mapping):
        raise TypeError("history.steps must be a dict of lists, got "
                        f"{type(history.steps).__name__}.")


def _series(history: History, *names: str) -> dict[str, np.ndarray]:
    """Per-step series as float arrays, with a clear error if any is missing."""
    _check_history(history)
    missing = [name for name in names if name not in history.steps]
    if missing:
        raise ValueError(
            f"history.steps lacks {missing} (it has {sorted(history.steps)}); record the "
            "run with adaptive_optax.segmentation.loop.fit, whose history holds every state "
            "reading.")
    out = {name: np.asarray(history.steps[name], dtype=np.float64) for name in names}
    shapes = {name: values.shape for name, values in out.items()}
    if any(len(shape) != 1 for shape in shapes.values()):
        raise ValueError(f"history.steps series must be 1-D lists, got shapes {shapes}.")
    # Every series, not only the requested ones: the panels index them by step.
    lengths = {name: len(values) for name, values in history.steps.items()}
    if len(set(lengths.values())) > 1:
        raise ValueError(f"history.steps series must all have one entry per step, got "
                         f"lengths {lengths}.")
    if next(iter(out.values())).shape[0] == 0:
        raise ValueError("history has no steps yet; train with "
                         "adaptive_optax.segmentation.loop.fit first.")
    return out


def _events(history: History) -> list[dict]:
    """Intervention and rollback records that fall inside the recorded steps."""
    n = len(next(iter(history.steps.values()), []))
    events = []
    for i, event in enumerate(history.interventions):
        if not isinstance(event, Mapping) or "step" not in event:
            raise ValueError(f"history.interventions[{i}] must be a dict with a 'step', "
                             f"got {event!r}.")
        if 0 <= int(event["step"]) < n:
            events.append(event)
    return events


def _windows(history: History) -> list[tuple[int, int, float, bool]]:
    """``(first_step, last_step, mean, improved)`` of every window the detector closed.

    A window closes on the step where ``windows_completed`` rises. It improved
    when ``best_value`` changed on that step. This also catches the window
    that triggers a plateau with ``patience=0`` and non-improving windows in
    cooldown, which ``plateau_count`` (reset on a plateau, frozen in cooldown)
    does not show.
    """
    s = _series(history, "windows_completed", "window_value", "best_value")
    completed, value, best = s["windows_completed"], s["window_value"], s["best_value"]
    # A history from fit starts at the run's first step (completed is 0 or 1 there);
    # otherwise the first row is taken not to close a window (its start is unknown).
    before = np.concatenate([[0.0 if completed[0] <= 1 else completed[0]], completed[:-1]])
    closes = np.flatnonzero(completed > before)
    windows = []
    start = 0
    for close in closes:
        if close == 0:
            improved = bool(np.isfinite(best[0]))
        else:
            improved = bool(best[close] != best[close - 1])
        windows.append((start, int(close), float(value[close]), improved))
        start = int(close) + 1
    return windows


def _mark_events(ax: Axes, events: Sequence[Mapping], *, label: bool = True) -> None:
    """Vertical lines at each intervention/rollback step (gid = the event kind)."""
    seen = set()
    for event in events:
        kind = event.get("kind", "intervention")
        style = _EVENT_STYLE.get(kind, _EVENT_STYLE["intervention"])
        ax.axvline(event["step"], color=style["color"], linestyle=":", linewidth=1.2,
                   gid=kind, label=kind if label and kind not in seen else None)
        seen.add(kind)


# --------------------------------------------------------------------------- run plots


def plot_monitor(history: History, ax: Axes | None = None) -> Figure:
    """The monitored value per step, its window means, plateaus and interventions.

    Draws the per-step monitored value (thin), the mean of every closed
    window (one horizontal segment per window, the value the plateau detector
    compares), shades each *non-improving* window (its mean did not beat the
    best so far by ``rtol``/``atol``; these are the windows that count towards
    ``patience``) and marks each intervention (red triangle) and rollback
    (black cross) at the window mean that triggered it.

    Artists carry a ``gid`` for programmatic access: ``"monitor"`` (line),
    ``"window_means"`` (segments), ``"plateau_window"`` (one span per
    non-improving window), ``"intervention"`` / ``"rollback"`` (markers).

    Args:
        history: The run's history, from :func:`adaptive_optax.segmentation.loop.fit`.
        ax: Axes to draw into; a new figure if ``None``.

    Returns:
        The figure holding the plot.

    Raises:
        ValueError: If the history has no steps or lacks a needed series.

    Example:
        >>> from adaptive_optax.segmentation.loop import History
        >>> h = History(steps={"monitor": [1.0, 1.0], "windows_completed": [1, 2],
        ...                    "window_value": [1.0, 1.0], "best_value": [1.0, 1.0]})
        >>> fig = plot_monitor(h)  # the second window did not improve: shaded
    """
    s = _series(history, "monitor")
    windows = _windows(history)
    events = _events(history)
    fig, ax = _axes(ax, (9, 3.5))
    steps = np.arange(s["monitor"].shape[0])
    ax.plot(steps, s["monitor"], color="tab:blue", alpha=0.35, linewidth=0.8,
            label="per step", gid="monitor")
    first_shaded = True
    for start, end, _, improved in windows:
        if not improved:
            ax.axvspan(start - 0.5, end + 0.5, color=_PLATEAU_COLOR, alpha=0.18, linewidth=0,
                       gid="plateau_window",
                       label="non-improving window" if first_shaded else None)
            first_shaded = False
    if windows:
        means = np.array([w[2] for w in windows])
        ax.hlines(means, [w[0] - 0.5 for w in windows], [w[1] + 0.5 for w in windows],
                  color="tab:blue", linewidth=2.0, label="window mean", gid="window_means")
    window_value = _series(history, "window_value")["window_value"]
    for kind, style in _EVENT_STYLE.items():
        at = [int(e["step"]) for e in events if e.get("kind", "intervention") == kind]
        if at:
            ax.scatter(at, window_value[at], s=70, zorder=5, marker=style["marker"],
                       color=style["color"], label=kind, gid=kind)
    ax.set_xlabel("step")
    ax.set_ylabel("monitored value")
    ax.set_title("Monitored value and plateau windows")
    ax.legend(loc="upper right", fontsize=8)
    return fig


def _boost_labels(history: History, events: Sequence[Mapping]) -> list[str]:
    """One annotation per event: number, boost over the base schedule and grad-norm EMA."""
    n = len(history.steps["learning_rate"])
    multiplier = (np.asarray(history.steps["lr_multiplier"], np.float64)
                  if "lr_multiplier" in history.steps else None)
    steps = [int(e["step"]) for e in events]
    labels = []
    for j, event in enumerate(events):
        kind = event.get("kind", "intervention")
        step = steps[j]
        following = [t for t in steps[j + 1:] if t > step]
        end = following[0] if following else n
        if multiplier is not None:
            # The peak until the next event: the boost target even with a warm-up ramp.
            value = multiplier[step] if kind == "rollback" else multiplier[step:end].max()
            boost = f"\u00d7{value:.3g} base"
        else:
            before, after = event.get("lr_before"), event.get("lr_after")
            boost = f"\u00d7{after / before:.3g}" if before and after is not None else "?"
        head = "rollback" if kind == "rollback" else f"#{event.get('number', j + 1)}"
        norm = event.get("grad_norm_ema")
        norm_text = "" if norm is None else f"\n|g| EMA {float(norm):.3g}"
        labels.append(f"{head} {boost}{norm_text}")
    return labels


def plot_learning_rate(history: History, ax: Axes | None = None) -> Figure:
    """Effective and base learning rate (log scale) with each intervention annotated.

    Each intervention gets a dotted vertical line and a label with its number,
    its boost as a multiple of the base schedule (the peak ``lr_multiplier``
    before the next event, so a warm-up ramp shows its target) and the
    gradient-norm EMA that chose it. Boosts are relative to the base, never
    compounded, so a damped second boost can be *below* the first.

    Artists carry a ``gid``: ``"learning_rate"``, ``"base_learning_rate"``,
    ``"intervention"`` / ``"rollback"`` (vertical lines) and
    ``"intervention_label"`` (annotations).

    Args:
        history: The run's history, from :func:`adaptive_optax.segmentation.loop.fit`.
        ax: Axes to draw into; a new figure if ``None``.

    Returns:
        The figure holding the plot.

    Raises:
        ValueError: If the history has no steps or no ``learning_rate``.

    Example:
        >>> from adaptive_optax.segmentation.loop import History
        >>> h = History(steps={"learning_rate": [1e-3, 5e-3], "base_learning_rate": [1e-3, 1e-3]})
        >>> fig = plot_learning_rate(h)
    """
    s = _series(history, "learning_rate")
    events = _events(history)
    fig, ax = _axes(ax, (9, 3.5))
    steps = np.arange(s["learning_rate"].shape[0])
    ax.plot(steps, s["learning_rate"], color="tab:green", linewidth=1.6,
            label="effective", gid="learning_rate")
    if "base_learning_rate" in history.steps:
        base = _series(history, "learning_rate", "base_learning_rate")["base_learning_rate"]
        ax.plot(steps, base, color="gray", linestyle="--", linewidth=1.0,
                label="base schedule", gid="base_learning_rate")
    ax.set_yscale("log")
    _mark_events(ax, events)
    if events:
        # Headroom above the curve (a third of the log range) for the labels.
        low, high = ax.get_ylim()
        if low > 0:
            ax.set_ylim(low, high * (high / low) ** 0.45)
    for j, (event, text) in enumerate(zip(events, _boost_labels(history, events))):
        # Staggered rows keep labels of nearby interventions from overlapping.
        ax.annotate(text, xy=(event["step"], 1.0), xycoords=("data", "axes fraction"),
                    xytext=(3, -3 - 24 * (j % 3)), textcoords="offset points", va="top",
                    fontsize=7.5, gid="intervention_label",
                    bbox=dict(boxstyle="round,pad=0.2", facecolor="white", alpha=0.8,
                              linewidth=0))
    ax.set_xlabel("step")
    ax.set_ylabel("learning rate")
    ax.set_title("Learning rate")
    ax.legend(loc="lower right", fontsize=8)
    return fig


def plot_loss_weights(history: History, ax: Axes | None = None) -> Figure:
    """The loss-mix weights over steps as a stacked area (one band per loss).

    The weights are those in the optimizer state after each step, i.e. the mix
    the *next* step optimises. Interventions are marked with dotted lines.

    Args:
        history: The run's history, from :func:`adaptive_optax.segmentation.loop.fit`
            (series ``weight/<name>``).
        ax: Axes to draw into; a new figure if ``None``.

    Returns:
        The figure holding the plot.

    Raises:
        ValueError: If the history has no steps or no ``weight/...`` series.

    Example:
        >>> from adaptive_optax.segmentation.loop import History
        >>> h = History(steps={"weight/dice": [0.5, 0.7], "weight/focal": [0.5, 0.3]})
        >>> len(plot_loss_weights(h).axes[0].collections)
        2
    """
    _check_history(history)
    names = sorted(k for k in history.steps if k.startswith("weight/"))
    if not names:
        raise ValueError("history.steps has no 'weight/<name>' series; record the run with "
                         "adaptive_optax.segmentation.loop.fit around a plateau_escape optimizer.")
    s = _series(history, *names)
    events = _events(history)
    fig, ax = _axes(ax, (9, 3.0))
    values = np.stack([s[name] for name in names])
    steps = np.arange(values.shape[1])
    # step="post": the weights read after step i are the mix of steps i+1, i+2, ...
    ax.stackplot(steps, values, labels=[name[len("weight/"):] for name in names], alpha=0.85,
                 step="post")
    _mark_events(ax, events, label=False)
    total = values.sum(axis=0).max()
    ax.set_ylim(0.0, 1.05 * total if total > 0 else 1.0)
    ax.set_xlim(steps[0], steps[-1])
    ax.set_xlabel("step")
    ax.set_ylabel("loss weight")
    ax.set_title("Loss-mix weights")
    # Legend top to bottom in the order of the bands.
    handles, labels = ax.get_legend_handles_labels()
    ax.legend(handles[::-1], labels[::-1], loc="upper left", bbox_to_anchor=(1.0, 1.0),
              fontsize=8)
    return fig


def plot_validation(history: History, ax: Axes | None = None, *, x: str = "step") -> Figure:
    """Per-epoch validation Dice and IoU (mean over classes).

    Args:
        history: The run's history, from :func:`adaptive_optax.segmentation.loop.fit`.
        ax: Axes to draw into; a new figure if ``None``.
        x: ``"step"`` (the step count at each evaluation, lines up with the
            other panels and marks interventions) or ``"epoch"``.

    Returns:
        The figure holding the plot.

    Raises:
        ValueError: If ``x`` is unknown or the history has no evaluations.

    Example:
        >>> from adaptive_optax.segmentation.loop import History
        >>> h = History(evals={"epoch": [0, 1], "step": [8, 16], "dice": [0.5, 0.6],
        ...                    "iou": [0.3, 0.4]})
        >>> fig = plot_validation(h, x="epoch")
    """
    _check_history(history)
    if x not in ("step", "epoch"):
        raise ValueError(f"x must be 'step' or 'epoch', got x = {x!r}.")
    evals = history.evals
    missing = [k for k in (x, "dice", "iou") if k not in evals]
    if missing:
        raise ValueError(f"history.evals lacks {missing} (it has {sorted(evals)}); "
                         "fit evaluates after every epoch.")
    xs = np.asarray(evals[x], np.float64)
    if xs.size == 0:
        raise ValueError("history has no evaluations yet; fit evaluates after every epoch.")
    fig, ax = _axes(ax, (9, 3.0))
    ax.plot(xs, np.asarray(evals["dice"], np.float64), "o-", markersize=3, label="Dice",
            gid="dice")
    ax.plot(xs, np.asarray(evals["iou"], np.float64), "s-", markersize=3, label="IoU",
            gid="iou")
    if x == "step":
        _mark_events(ax, _events(history), label=False)
    ax.set_ylim(0.0, 1.0)
    ax.set_xlabel(x)
    ax.set_ylabel("validation score")
    ax.set_title("Validation")
    ax.legend(loc="lower right", fontsize=8)
    return fig


def _check_runs(runs: Any) -> dict[str, History]:
    """``runs`` as a dict of named histories, each with per-epoch evaluations."""
    if not isinstance(runs, Mapping) or not runs:
        raise ValueError("runs must be a non-empty dict of run name -> History, got "
                         f"{type(runs).__name__} {runs!r:.60}.")
    for name, history in runs.items():
        if not isinstance(name, str):
            raise TypeError(f"run names must be strings, got {name!r}.")
        _check_history(history)
        missing = [k for k in ("epoch", "step", "dice") if not history.evals.get(k)]
        if missing:
            raise ValueError(f"run {name!r} has no evaluations (history.evals lacks "
                             f"{missing}); fit evaluates after every epoch.")
    return dict(runs)


def _epoch_coordinates(history: History, steps_done: Sequence[int]) -> np.ndarray:
    """Where ``steps_done`` steps fall on the epoch axis of ``history.evals``.

    Epoch ``e`` ends at ``evals["step"][e]`` steps (its evaluation); a step
    count in between is placed linearly, and the run's first epoch starts at
    step 0 (``fit`` records a history from the run's first step).
    """
    at = np.asarray(history.evals["step"], np.float64)
    epoch = np.asarray(history.evals["epoch"], np.float64)
    return np.interp(np.asarray(steps_done, np.float64), np.concatenate([[0.0], at]),
                     np.concatenate([[epoch[0] - 1.0], epoch]))


def plot_comparison(runs: Mapping[str, History], axes: Sequence[Axes] | None = None, *,
                    marked: str | None = None) -> Figure:
    """Validation Dice and the monitored value of several runs, one line per run.

    The left axes draws each run's validation Dice (mean over classes) after
    every epoch; the right one the mean of every window the plateau detector
    closed (the value it compares), at the epoch where the window ended
    (fractional when a window ends inside an epoch), on a log scale when
    every mean is positive. Both share the epoch
    axis, numbered as in the intervention log (0 is the first epoch). The
    interventions and rollbacks of the ``marked`` run are dotted vertical
    lines on both, at the epoch of the window that triggered them.

    Runs keep their order: run ``i`` is drawn in colour ``C{i}``, the first
    one solid, the others dashed over it (where runs agree, both colours
    show). Artists
    carry a ``gid`` and are labelled with the run's name: ``"dice"`` (left
    lines), ``"window_mean"`` (right lines), ``"intervention"`` /
    ``"rollback"`` (vertical lines of the marked run).

    Args:
        runs: Run name -> history (from :func:`adaptive_optax.segmentation.loop.fit`),
            e.g. ``{"recommended": history, "constant": baseline}``.
        axes: Two axes to draw into (Dice, monitored value); a new 1x2
            figure if ``None``.
        marked: The run whose interventions are marked (default: the first).

    Returns:
        The figure holding the plot.

    Raises:
        ValueError: If ``runs`` is empty, a run has no steps or evaluations,
            ``axes`` is not two axes, or ``marked`` is not a run.
        TypeError: If a run is not a ``History`` or its name not a string.

    Example:
        >>> fig = plot_comparison({"recommended": history, "constant": baseline})  # doctest: +SKIP
        >>> fig.savefig("comparison.png")  # doctest: +SKIP
    """
    runs = _check_runs(runs)
    figure_class = _figure_class()
    from matplotlib.ticker import MaxNLocator

    marked = next(iter(runs)) if marked is None else marked
    if marked not in runs:
        raise ValueError(f"marked must be one of the runs {list(runs)}, got marked = {marked!r}.")
    windows = {name: _windows(history) for name, history in runs.items()}  # checks the steps
    if axes is None:
        fig = figure_class(figsize=(10, 3.5), layout="constrained")
        axes = fig.subplots(1, 2, sharex=True)
    elif len(axes) != 2:
        raise ValueError(f"axes must be two matplotlib Axes (Dice, monitored value), got "
                         f"{len(axes)}.")
    fig, dice_ax = _axes(axes[0], (10, 3.5))
    _, monitor_ax = _axes(axes[1], (10, 3.5))
    for i, (name, history) in enumerate(runs.items()):
        # The first run solid, the others dashed on top: where runs agree, both colours show.
        style = dict(color=f"C{i}", marker="o" if i == 0 else "s", markersize=3, linewidth=1.4,
                     linestyle="-" if i == 0 else "--", zorder=2 + min(i, 1), label=name)
        dice_ax.plot(np.asarray(history.evals["epoch"], np.float64),
                     np.asarray(history.evals["dice"], np.float64), gid="dice", **style)
        closed = windows[name]
        monitor_ax.plot(_epoch_coordinates(history, [end + 1 for _, end, _, _ in closed]),
                        np.array([mean for _, _, mean, _ in closed], np.float64),
                        gid="window_mean", **style)
    events = _events(runs[marked])
    at = _epoch_coordinates(runs[marked], [int(e["step"]) + 1 for e in events])
    for ax in (dice_ax, monitor_ax):
        seen = set()
        for event, x in zip(events, at):
            kind = event.get("kind", "intervention")
            ax.axvline(x, color=_EVENT_STYLE.get(kind, _EVENT_STYLE["intervention"])["color"],
                       linestyle=":", linewidth=1.2, gid=kind,
                       label=f"{kind} ({marked})" if kind not in seen else None)
            seen.add(kind)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.legend(loc="best", fontsize=8)
    means = np.array([mean for closed in windows.values() for _, _, mean, _ in closed])
    means = means[np.isfinite(means)]
    if means.size and np.all(means > 0):
        monitor_ax.set_yscale("log")  # the late windows, where runs part, stay readable
    dice_ax.set_ylabel("validation Dice")
    dice_ax.set_title("Validation Dice")
    monitor_ax.set_ylabel("monitored value (window mean)")
    monitor_ax.set_title("Monitored value per window")
    return fig


def plot_run(history: History, title: str | None = None, *,
             compare: Mapping[str, History] | None = None, name: str = "this run") -> Figure:
    """A 4-panel summary: monitor, learning rate, loss weights, validation.

    The panels share the step axis, so an intervention lines up with its
    plateau, its boost, its mix change and the validation that followed.
    A history without evaluations gets a note in the last panel. With
    ``compare``, a row below them holds :func:`plot_comparison` of this run
    (first, its interventions marked) and the others.

    Args:
        history: The run's history, from :func:`adaptive_optax.segmentation.loop.fit`.
        title: Optional figure title.
        compare: Other runs to compare with (name -> history), e.g. the
            baseline trained on the same data and seed.
        name: This run's name in the comparison's legends.

    Returns:
        The figure (``fig.savefig("run.png")`` writes it).

    Raises:
        ValueError: If the history has no steps or lacks a needed series, or
            a run of ``compare`` is also called ``name``.

    Example:
        >>> fig = plot_run(history, title="adaptive")  # doctest: +SKIP
        >>> fig = plot_run(history, name="recommended",
        ...                compare={"constant": baseline})  # doctest: +SKIP
        >>> fig.savefig("run.png")  # doctest: +SKIP
    """
    _series(history, "monitor", "learning_rate")  # fail before drawing anything
    runs = None
    if compare is not None:
        if not isinstance(compare, Mapping):
            raise TypeError("compare must be a dict of run name -> History or None, got "
                            f"{type(compare).__name__}.")
        if name in compare:
            raise ValueError(f"compare must not hold a run called {name!r}, this run's name.")
        runs = _check_runs({name: history, **compare}) if compare else None
    rows = 5 if runs else 4
    fig = _figure_class()(figsize=(10, 14.5 if runs else 11), layout="constrained")
    grid = fig.add_gridspec(rows, 2, height_ratios=[1.0] * 4 + [1.2] * (rows - 4))
    axes = [fig.add_subplot(grid[0, :])]
    axes += [fig.add_subplot(grid[i, :], sharex=axes[0]) for i in range(1, 4)]
    plot_monitor(history, ax=axes[0])
    plot_learning_rate(history, ax=axes[1])
    plot_loss_weights(history, ax=axes[2])
    if history.evals.get("step"):
        plot_validation(history, ax=axes[3])
    else:
        axes[3].text(0.5, 0.5, "no validation data", ha="center", va="center",
                     transform=axes[3].transAxes)
        axes[3].set_title("Validation")
    for ax in axes[:-1]:
        ax.set_xlabel("")
        ax.tick_params(labelbottom=False)
    axes[-1].set_xlabel("step")
    if runs:
        left = fig.add_subplot(grid[4, 0])
        plot_comparison(runs, [left, fig.add_subplot(grid[4, 1], sharex=left)], marked=name)
    if title is not None:
        fig.suptitle(title)
    return fig


# --------------------------------------------------------------------------- landscape


def loss_along_line(
    loss_fn: Callable[[Any], jax.Array],
    params_a: Any,
    params_b: Any,
    alphas: Sequence[float] | np.ndarray | jax.Array,
    *,
    batch_size: int | None = None,
) -> np.ndarray:
    """The loss at ``(1 - a) * params_a + a * params_b`` for every ``a`` in ``alphas``.

    A 1-D slice of the loss landscape (Goodfellow et al., 2015): ``a = 0`` is
    ``params_a``, ``a = 1`` is ``params_b``; values outside ``[0, 1]``
    extrapolate beyond either end. The loop over ``alphas`` runs inside one
    jitted ``jax.lax.map`` (compiled once per call, parameters passed as
    arguments, not baked in as constants). Each interpolated leaf is cast
    back to its dtype, so bfloat16 parameters stay bfloat16.

    Args:
        loss_fn: ``params -> scalar`` loss, traceable by JAX (e.g. a model
            merged from ``params`` applied to a fixed batch).
        params_a: The parameter pytree at ``a = 0``.
        params_b: The parameter pytree at ``a = 1``, same structure, shapes
            and dtypes as ``params_a``.
        alphas: 1-D sequence of finite interpolation coefficients.
        batch_size: Alphas evaluated together per ``lax.map`` iteration
            (vectorised with ``vmap``); ``None`` evaluates one at a time,
            which keeps memory at one forward pass.

    Returns:
        ``np.ndarray`` of shape ``[len(alphas)]`` with the losses.

    Raises:
        ValueError: If ``alphas`` is not a non-empty 1-D finite sequence, the
            parameter trees differ in structure, shape or dtype, a leaf is
            not floating point, ``loss_fn`` does not return a scalar, or
            ``batch_size`` is not a positive int.

    Example:
        >>> import jax.numpy as jnp
        >>> loss = lambda p: jnp.sum((p["w"] - 1.0) ** 2)
        >>> loss_along_line(loss, {"w": jnp.zeros(2)}, {"w": jnp.full(2, 2.0)}, [0.0, 0.5, 1.0])
        array([2., 0., 2.], dtype=float32)
    """
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable, got {type(loss_fn).__name__}.")
    alpha_values = np.asarray(alphas, dtype=np.float64)
    if alpha_values.ndim != 1 or alpha_values.size == 0:
        raise ValueError("alphas must be a non-empty 1-D sequence, got shape "
                         f"{alpha_values.shape}.")
    if not np.all(np.isfinite(alpha_values)):
        raise ValueError(f"alphas must be finite, got {alpha_values.tolist()}.")
    if batch_size is not None and (isinstance(batch_size, bool)
                                   or not isinstance(batch_size, numbers.Integral)
                                   or batch_size < 1):
        raise ValueError("batch_size must be None or an int >= 1, got "
                         f"batch_size = {batch_size!r}.")
    _check_same_tree(params_a, params_b)
    out = jax.eval_shape(loss_fn, params_a)
    if not hasattr(out, "shape") or out.shape != ():
        raise ValueError("loss_fn must return a scalar loss, got "
                         f"{getattr(out, 'shape', type(out).__name__)}; reduce it (e.g. jnp.mean).")

    def interpolate(alpha, a, b):
        return jax.tree.map(lambda x, y: ((1 - alpha) * x + alpha * y).astype(x.dtype), a, b)

    @jax.jit
    def along(a, b, coefficients):
        return jax.lax.map(lambda alpha: loss_fn(interpolate(alpha, a, b)), coefficients,
                           batch_size=batch_size)

    # float32 coefficients (float64 under jax_enable_x64), like the parameters.
    return np.asarray(along(params_a, params_b, jnp.asarray(alpha_values)))


def _check_same_tree(params_a: Any, params_b: Any) -> None:
    leaves_a, tree_a = jax.tree_util.tree_flatten_with_path(params_a)
    leaves_b, tree_b = jax.tree.flatten(params_b)
    if tree_a != tree_b:
        raise ValueError("params_a and params_b must have the same pytree structure, got "
                         f"{tree_a} and {tree_b}.")
    if not leaves_a:
        raise ValueError("params_a has no array leaves to interpolate.")
    for (path, a), b in zip(leaves_a, leaves_b):
        name = jax.tree_util.keystr(path) or "<root>"
        a_shape, b_shape = np.shape(a), np.shape(b)
        a_dtype, b_dtype = jnp.result_type(a), jnp.result_type(b)
        if a_shape != b_shape or a_dtype != b_dtype:
            raise ValueError(f"params leaf {name} differs: {a_dtype}{list(a_shape)} in params_a, "
                             f"{b_dtype}{list(b_shape)} in params_b.")
        if not jnp.issubdtype(a_dtype, jnp.inexact):
            raise ValueError(f"params leaf {name} has dtype {a_dtype}; only floating-point "
                             "leaves can be interpolated.")


def plot_loss_slice(
    alphas: Sequence[float] | np.ndarray,
    losses: Sequence[float] | np.ndarray,
    ax: Axes | None = None,
    *,
    labels: tuple[str, str] = (r"before ($\alpha=0$)", r"after ($\alpha=1$)"),
    log_scale: bool = False,
) -> Figure:
    """Plots a 1-D slice of the loss landscape from :func:`loss_along_line`.

    The curve is drawn over the sorted ``alphas``; dotted lines and markers
    show the two end points ``a = 0`` and ``a = 1`` (their losses
    interpolated when they are not among ``alphas``).

    Artists carry a ``gid``: ``"slice"`` (the curve), ``"endpoint"`` (the
    two vertical lines) and ``"endpoints"`` (the two markers).

    Args:
        alphas: 1-D interpolation coefficients (at least 2, finite).
        losses: The loss at each alpha, same length (non-finite values, e.g.
            from a diverging extrapolation, are left out of the curve).
        ax: Axes to draw into; a new figure if ``None``.
        labels: Legend labels of the ``a = 0`` and ``a = 1`` points.
        log_scale: Use a logarithmic loss axis.

    Returns:
        The figure holding the plot.

    Raises:
        ValueError: If the inputs are not 1-D, differ in length, hold fewer
            than 2 points, or ``alphas`` is not finite.

    Example:
        >>> import numpy as np
        >>> alphas = np.linspace(-0.5, 1.5, 21)
        >>> fig = plot_loss_slice(alphas, (alphas - 0.7) ** 2)
    """
    a = np.asarray(alphas, dtype=np.float64)
    loss = np.asarray(losses, dtype=np.float64)
    if a.ndim != 1 or loss.ndim != 1:
        raise ValueError(f"alphas and losses must be 1-D, got shapes {a.shape} and {loss.shape}.")
    if a.shape != loss.shape:
        raise ValueError(f"alphas and losses must have the same length, got {a.size} and "
                         f"{loss.size}.")
    if a.size < 2:
        raise ValueError(f"a loss slice needs at least 2 points, got {a.size}.")
    if not np.all(np.isfinite(a)):
        raise ValueError(f"alphas must be finite, got {a.tolist()}.")
    order = np.argsort(a)
    a, loss = a[order], loss[order]
    finite = np.isfinite(loss)
    if not finite.any():
        raise ValueError("losses holds no finite value to plot.")
    fig, ax = _axes(ax, (6, 3.5))
    ax.plot(a[finite], loss[finite], color="tab:purple", linewidth=1.6, marker=".",
            markersize=4, gid="slice", label="loss along the line")
    ends = np.array([0.0, 1.0])
    end_losses = np.interp(ends, a[finite], loss[finite])
    colors = ("tab:blue", "tab:red")
    for end, color in zip(ends, colors):
        ax.axvline(end, color=color, linestyle=":", linewidth=1.0, gid="endpoint")
    ax.scatter(ends, end_losses, c=list(colors), s=50, zorder=5, gid="endpoints")
    for end, value, color, label in zip(ends, end_losses, colors, labels):
        ax.annotate(label, xy=(end, value), xytext=(4, 6), textcoords="offset points",
                    color=color, fontsize=8)
    if log_scale:
        ax.set_yscale("log")
    # Mathtext, not Unicode sub/superscripts: every font renders it without glyph warnings.
    ax.set_xlabel(r"$\alpha$   ($\theta = (1-\alpha)\,\theta_a + \alpha\,\theta_b$)")
    ax.set_ylabel("loss")
    ax.set_title("1-D slice of the loss landscape")
    return fig
