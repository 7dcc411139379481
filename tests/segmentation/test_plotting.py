"""Plots read from a History, and the 1-D loss-landscape slice."""

import math
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

matplotlib = pytest.importorskip("matplotlib")
matplotlib.use("Agg")

from matplotlib.collections import LineCollection, PolyCollection  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from adaptive_optax.segmentation import plotting  # noqa: E402
from adaptive_optax.segmentation.loop import History  # noqa: E402

NAN, INF = math.nan, math.inf


def synthetic_history(with_rollback: bool = False) -> History:
    """12 steps, windows of 3 steps; windows 2 and 4 do not improve and trigger interventions.

    plateau_count stays 0 throughout, as with patience=0 (a plateau resets it
    on the step it triggers), so shading must not rely on it.
    """
    base = 1e-3
    multiplier = [1.0] * 5 + [5.0] * 6 + [3.5]
    weights = {"dice": [0.4] * 5 + [0.5] * 6 + [0.6],
               "focal": [0.3] * 5 + [0.5] * 6 + [0.4],
               "bce": [0.3] * 5 + [0.0] * 6 + [0.0]}
    steps = {
        "loss": [1.1, 1.0, 0.9, 1.0, 1.0, 0.97, 0.8, 0.8, 0.8, 0.9, 0.8, 0.85],
        "monitor": [1.1, 1.0, 0.9, 1.0, 1.0, 0.97, 0.8, 0.8, 0.8, 0.9, 0.8, 0.85],
        "windows_completed": [0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3, 4],
        "window_value": [NAN, NAN, 1.0, 1.0, 1.0, 0.99, 0.99, 0.99, 0.8, 0.8, 0.8, 0.85],
        "best_value": [INF, INF, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.8, 0.8, 0.8, 0.8],
        "plateau_count": [0] * 12,
        "learning_rate": [base * m for m in multiplier],
        "base_learning_rate": [base] * 12,
        "lr_multiplier": multiplier,
        "intervention_count": [0] * 5 + [1] * 6 + [2],
        "grad_norm_ema": [0.05] * 12,
        **{f"weight/{k}": v for k, v in weights.items()},
    }
    interventions = [
        dict(kind="intervention", number=1, step=5, epoch=1, window=2, grad_norm_ema=0.04,
             lr_before=base, lr_after=5 * base, mix_before="initial", mix_after="mixes[1]",
             weights_before={}, weights_after={}),
        dict(kind="intervention", number=2, step=11, epoch=3, window=4, grad_norm_ema=0.2,
             lr_before=5 * base, lr_after=3.5 * base, mix_before="mixes[1]", mix_after="final",
             weights_before={}, weights_after={}),
    ]
    if with_rollback:
        interventions.append(dict(kind="rollback", number=2, step=8, epoch=2, window=3,
                                  grad_norm_ema=0.1, lr_before=5 * base, lr_after=5 * base))
        interventions.sort(key=lambda e: e["step"])
    evals = {"epoch": [0, 1, 2, 3], "step": [3, 6, 9, 12], "dice": [0.2, 0.4, 0.5, 0.6],
             "iou": [0.1, 0.25, 0.33, 0.43]}
    return History(steps=steps, evals=evals, interventions=interventions)


def by_gid(artists, gid):
    return [a for a in artists if a.get_gid() == gid]


# --------------------------------------------------------------------------- plot_monitor


def test_plot_monitor_shades_every_non_improving_window_and_marks_interventions():
    history = synthetic_history()
    fig = plotting.plot_monitor(history)
    assert isinstance(fig, Figure) and len(fig.axes) == 1
    ax = fig.axes[0]
    spans = by_gid(ax.patches, "plateau_window")
    # Windows 2 (steps 3-5) and 4 (steps 9-11) did not beat the best, although
    # plateau_count never rose (patience=0 resets it on the triggering step).
    assert len(spans) == 2
    assert sorted(round(p.get_x() + p.get_width() / 2) for p in spans) == [4, 10]
    markers = by_gid(ax.collections, "intervention")
    assert len(markers) == 1
    offsets = markers[0].get_offsets()
    assert len(offsets) == len(history.interventions)
    np.testing.assert_allclose(offsets, [[5, 0.99], [11, 0.85]])
    means = by_gid(ax.collections, "window_means")
    assert len(means) == 1 and isinstance(means[0], LineCollection)
    assert len(means[0].get_segments()) == 4
    (line,) = by_gid(ax.lines, "monitor")
    np.testing.assert_allclose(line.get_ydata(), history.steps["monitor"])


def test_plot_monitor_marks_rollbacks_separately():
    fig = plotting.plot_monitor(synthetic_history(with_rollback=True))
    ax = fig.axes[0]
    assert len(by_gid(ax.collections, "intervention")[0].get_offsets()) == 2
    (rollbacks,) = by_gid(ax.collections, "rollback")
    np.testing.assert_allclose(rollbacks.get_offsets(), [[8, 0.8]])


def test_plot_monitor_without_interventions_has_no_markers():
    history = synthetic_history()
    history.interventions = []
    ax = plotting.plot_monitor(history).axes[0]
    assert by_gid(ax.collections, "intervention") == []


# --------------------------------------------------------------------------- plot_learning_rate


def test_plot_learning_rate_is_log_scale_with_one_annotated_line_per_intervention():
    history = synthetic_history()
    ax = plotting.plot_learning_rate(history).axes[0]
    assert ax.get_yscale() == "log"
    (lr,) = by_gid(ax.lines, "learning_rate")
    np.testing.assert_allclose(lr.get_ydata(), history.steps["learning_rate"])
    (base,) = by_gid(ax.lines, "base_learning_rate")
    np.testing.assert_allclose(base.get_ydata(), 1e-3)
    lines = by_gid(ax.lines, "intervention")
    assert [line.get_xdata()[0] for line in lines] == [5, 11]
    labels = [t.get_text() for t in by_gid(ax.texts, "intervention_label")]
    assert len(labels) == len(history.interventions)
    assert labels[0] == "#1 \u00d75 base\n|g| EMA 0.04"
    assert labels[1] == "#2 \u00d73.5 base\n|g| EMA 0.2"


def test_plot_learning_rate_boost_is_the_peak_of_a_warmup_ramp():
    history = synthetic_history()
    # A 3-step warm-up towards 5x: the label shows the target, not the first ramp value.
    history.steps["lr_multiplier"][5:11] = [2.0, 3.0, 5.0, 5.0, 5.0, 5.0]
    ax = plotting.plot_learning_rate(history).axes[0]
    assert by_gid(ax.texts, "intervention_label")[0].get_text().startswith("#1 \u00d75 base")


def test_plot_learning_rate_falls_back_to_the_lr_ratio_without_a_multiplier():
    history = synthetic_history()
    del history.steps["lr_multiplier"]
    ax = plotting.plot_learning_rate(history).axes[0]
    texts = [t.get_text() for t in by_gid(ax.texts, "intervention_label")]
    assert texts[0].startswith("#1 \u00d75\n") and texts[1].startswith("#2 \u00d70.7\n")


# --------------------------------------------------------------------------- plot_loss_weights


def test_plot_loss_weights_stacks_one_collection_per_loss():
    history = synthetic_history()
    ax = plotting.plot_loss_weights(history).axes[0]
    areas = [c for c in ax.collections if isinstance(c, PolyCollection)]
    assert len(areas) == 3
    # Legend top to bottom like the bands: the last (top) loss first.
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["focal", "dice", "bce"]
    # The top edge of the stack is the total weight (1 everywhere here).
    top = areas[-1].get_paths()[0].vertices[:, 1].max()
    assert top == pytest.approx(1.0)
    assert len(by_gid(ax.lines, "intervention")) == 2


def test_plot_loss_weights_needs_weight_series():
    history = synthetic_history()
    history.steps = {k: v for k, v in history.steps.items() if not k.startswith("weight/")}
    with pytest.raises(ValueError, match="weight/<name>"):
        plotting.plot_loss_weights(history)


# --------------------------------------------------------------------------- plot_validation


def test_plot_validation_draws_dice_and_iou_per_epoch():
    history = synthetic_history()
    ax = plotting.plot_validation(history).axes[0]
    (dice,) = by_gid(ax.lines, "dice")
    (iou,) = by_gid(ax.lines, "iou")
    np.testing.assert_allclose(dice.get_xdata(), [3, 6, 9, 12])
    np.testing.assert_allclose(dice.get_ydata(), history.evals["dice"])
    np.testing.assert_allclose(iou.get_ydata(), history.evals["iou"])
    assert len(by_gid(ax.lines, "intervention")) == 2
    ax = plotting.plot_validation(history, x="epoch").axes[0]
    np.testing.assert_allclose(by_gid(ax.lines, "dice")[0].get_xdata(), [0, 1, 2, 3])


def test_plot_validation_rejects_bad_input():
    with pytest.raises(ValueError, match="x must be 'step' or 'epoch'"):
        plotting.plot_validation(synthetic_history(), x="time")
    with pytest.raises(ValueError, match="lacks"):
        plotting.plot_validation(History(steps=synthetic_history().steps))
    with pytest.raises(ValueError, match="no evaluations"):
        plotting.plot_validation(History(evals={"step": [], "dice": [], "iou": []}))


# --------------------------------------------------------------------------- plot_run and axes


def test_plot_run_has_four_panels_and_a_title():
    fig = plotting.plot_run(synthetic_history(), title="run")
    assert isinstance(fig, Figure)
    assert len(fig.axes) == 4
    assert fig.get_suptitle() == "run"
    assert [ax.get_title() for ax in fig.axes] == [
        "Monitored value and plateau windows", "Learning rate", "Loss-mix weights", "Validation"]
    assert len(by_gid(fig.axes[1].texts, "intervention_label")) == 2


def test_plot_run_without_evaluations_notes_it():
    history = synthetic_history()
    history.evals = {}
    fig = plotting.plot_run(history)
    assert [t.get_text() for t in fig.axes[3].texts] == ["no validation data"]


def baseline_history() -> History:
    """A run beside ``synthetic_history``: no interventions, window means 10 % higher."""
    history = synthetic_history()
    for name in ("monitor", "window_value", "best_value"):
        history.steps[name] = [1.1 * v for v in history.steps[name]]
    history.evals["dice"] = [0.1, 0.2, 0.3, 0.35]
    history.interventions = []
    return history


def test_plot_comparison_draws_one_line_per_run_with_its_data():
    main, baseline = synthetic_history(with_rollback=True), baseline_history()
    fig = plotting.plot_comparison({"adaptive": main, "constant": baseline})
    dice_ax, monitor_ax = fig.axes
    dice = by_gid(dice_ax.lines, "dice")
    assert [line.get_label() for line in dice] == ["adaptive", "constant"]
    for line, history in zip(dice, (main, baseline)):
        np.testing.assert_allclose(line.get_xdata(), [0, 1, 2, 3])  # epochs
        np.testing.assert_allclose(line.get_ydata(), history.evals["dice"])
    means = by_gid(monitor_ax.lines, "window_mean")
    assert [line.get_label() for line in means] == ["adaptive", "constant"]
    # Windows of 3 steps close with epochs 0-3 (evaluated after steps 3, 6, 9, 12).
    for line, scale in zip(means, (1.0, 1.1)):
        np.testing.assert_allclose(line.get_xdata(), [0, 1, 2, 3])
        np.testing.assert_allclose(line.get_ydata(), scale * np.array([1.0, 0.99, 0.8, 0.85]))
    assert means[0].get_color() != means[1].get_color()
    assert [line.get_linestyle() for line in means] == ["-", "--"]  # the baseline dashed
    assert monitor_ax.get_yscale() == "log" and dice_ax.get_yscale() == "linear"
    # The main run's events, at the epoch of the window that triggered them, on both axes.
    for ax in fig.axes:
        assert [line.get_xdata()[0] for line in by_gid(ax.lines, "intervention")] == [1, 3]
        assert [line.get_xdata()[0] for line in by_gid(ax.lines, "rollback")] == [2]
        assert ax.get_xlabel() == "epoch"
    legend = [t.get_text() for t in dice_ax.get_legend().get_texts()]
    assert legend == ["adaptive", "constant", "intervention (adaptive)", "rollback (adaptive)"]


def test_plot_comparison_marks_the_chosen_run_and_places_windows_inside_epochs():
    main, baseline = synthetic_history(), baseline_history()
    ax = plotting.plot_comparison({"adaptive": main, "constant": baseline},
                                  marked="constant").axes[0]
    assert by_gid(ax.lines, "intervention") == []  # the baseline never intervened
    # Epochs of 6 steps, windows of 3: a window ends halfway through each epoch.
    main.evals = {"epoch": [0, 1], "step": [6, 12], "dice": [0.3, 0.6], "iou": [0.2, 0.4]}
    fig = plotting.plot_comparison({"adaptive": main})
    (line,) = by_gid(fig.axes[1].lines, "window_mean")
    np.testing.assert_allclose(line.get_xdata(), [-0.5, 0.0, 0.5, 1.0])
    # Interventions at steps 5 and 11: the ends of epochs 0 and 1.
    assert [x.get_xdata()[0] for x in by_gid(fig.axes[1].lines, "intervention")] == [0, 1]


def test_plot_comparison_draws_into_given_axes_and_rejects_bad_input():
    fig = Figure()
    axes = fig.subplots(1, 3)
    assert plotting.plot_comparison({"a": synthetic_history()}, axes[1:]) is fig
    assert by_gid(axes[1].lines, "dice") and by_gid(axes[2].lines, "window_mean")
    assert not axes[0].lines
    with pytest.raises(ValueError, match="two matplotlib Axes"):
        plotting.plot_comparison({"a": synthetic_history()}, axes)
    with pytest.raises(ValueError, match="non-empty dict"):
        plotting.plot_comparison({})
    with pytest.raises(ValueError, match="marked must be one of the runs"):
        plotting.plot_comparison({"a": synthetic_history()}, marked="b")
    no_evals = synthetic_history()
    no_evals.evals = {}
    with pytest.raises(ValueError, match="run 'b' has no evaluations"):
        plotting.plot_comparison({"a": synthetic_history(), "b": no_evals})
    with pytest.raises(TypeError, match="History"):
        plotting.plot_comparison({"a": {"steps": {}}})


def test_plot_run_with_compare_adds_the_comparison_row():
    main, baseline = synthetic_history(), baseline_history()
    fig = plotting.plot_run(main, title="run", name="adaptive", compare={"constant": baseline})
    assert [ax.get_title() for ax in fig.axes] == [
        "Monitored value and plateau windows", "Learning rate", "Loss-mix weights", "Validation",
        "Validation Dice", "Monitored value per window"]
    dice_ax, monitor_ax = fig.axes[4:]
    assert [line.get_label() for line in by_gid(dice_ax.lines, "dice")] == ["adaptive",
                                                                             "constant"]
    np.testing.assert_allclose(by_gid(monitor_ax.lines, "window_mean")[1].get_ydata(),
                               1.1 * np.array([1.0, 0.99, 0.8, 0.85]))
    assert len(by_gid(monitor_ax.lines, "intervention")) == 2
    # The four panels of the main run are unchanged.
    assert _drawn(fig)[:4] == _drawn(plotting.plot_run(main))
    assert len(plotting.plot_run(main, compare={}).axes) == 4
    with pytest.raises(ValueError, match="must not hold a run called 'this run'"):
        plotting.plot_run(main, compare={"this run": baseline})
    with pytest.raises(TypeError, match="compare must be a dict"):
        plotting.plot_run(main, compare=[baseline])


def test_plots_draw_into_a_given_axes():
    fig = Figure()
    axes = fig.subplots(1, 2)
    history = synthetic_history()
    assert plotting.plot_learning_rate(history, ax=axes[1]) is fig
    assert plotting.plot_monitor(history, ax=axes[0]) is fig
    assert len(fig.axes) == 2
    assert by_gid(axes[1].lines, "learning_rate") and by_gid(axes[0].lines, "monitor")
    with pytest.raises(TypeError, match="ax must be a matplotlib Axes"):
        plotting.plot_monitor(history, ax="left")


@pytest.mark.parametrize("plot", [plotting.plot_monitor, plotting.plot_learning_rate,
                                  plotting.plot_loss_weights, plotting.plot_run])
def test_an_empty_history_is_a_clear_error(plot):
    with pytest.raises(ValueError, match="history"):
        plot(History())


def test_bad_histories_are_clear_errors():
    history = synthetic_history()
    history.steps["monitor"] = history.steps["monitor"][:-1]
    with pytest.raises(ValueError, match="one entry per step"):
        plotting.plot_monitor(history)
    history = synthetic_history()
    del history.steps["best_value"]
    with pytest.raises(ValueError, match=r"lacks \['best_value'\]"):
        plotting.plot_monitor(history)
    with pytest.raises(TypeError, match="History"):
        plotting.plot_monitor({"monitor": [1.0]})
    history = synthetic_history()
    history.interventions = [{"kind": "intervention"}]
    with pytest.raises(ValueError, match=r"interventions\[0\]"):
        plotting.plot_learning_rate(history)


def _drawn(fig) -> list:
    """What every axis of ``fig`` shows: line data, marker offsets, texts, spans."""
    out = []
    for ax in fig.axes:
        out.append(sorted(
            [("line", a.get_gid(), np.asarray(a.get_xdata(), float).tolist(),
              np.asarray(a.get_ydata(), float).tolist()) for a in ax.lines]
            + [("points", a.get_gid(), np.asarray(a.get_offsets(), float).tolist())
               for a in ax.collections]
            + [("text", a.get_gid(), a.get_text()) for a in ax.texts]
            + [("span", a.get_gid(), a.get_x(), a.get_width()) for a in ax.patches
               if a.get_gid() is not None], key=repr))
    return out


def test_a_json_round_trip_plots_the_same(tmp_path):
    original = synthetic_history(with_rollback=True)
    history = History.from_json(original.to_json())
    fig = plotting.plot_run(history)
    assert _drawn(fig) == _drawn(plotting.plot_run(original))
    assert any(item[1] == "rollback" for ax in _drawn(fig) for item in ax)  # markers compared
    fig.savefig(tmp_path / "run.png")
    assert (tmp_path / "run.png").stat().st_size > 0


def test_missing_matplotlib_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(ImportError, match=r"pip install 'adaptive-optax\[demo\]'"):
        plotting.plot_monitor(synthetic_history())


# --------------------------------------------------------------------------- loss landscape


def quadratic(params):
    # (w0 - 1)^2 + w1^2 + (b - 2)^2 with params = {"w": [w0, w1], "b": b}
    return jnp.sum((params["w"] - jnp.array([1.0, 0.0])) ** 2) + (params["b"] - 2.0) ** 2


def test_loss_along_line_on_a_quadratic():
    a = {"w": jnp.array([0.0, 0.0]), "b": jnp.float32(0.0)}
    b = {"w": jnp.array([2.0, 0.0]), "b": jnp.float32(2.0)}
    alphas = [-0.5, 0.0, 0.5, 1.0, 1.5]
    # w0 = 2a, b = 2a: (2a - 1)^2 + (2a - 2)^2
    expected = [4.0 + 9.0, 1.0 + 4.0, 0.0 + 1.0, 1.0 + 0.0, 4.0 + 1.0]
    losses = plotting.loss_along_line(quadratic, a, b, alphas)
    assert isinstance(losses, np.ndarray) and losses.shape == (5,)
    np.testing.assert_allclose(losses, expected, rtol=1e-6)
    for batch_size in (1, 2, 5, 8):
        np.testing.assert_allclose(
            plotting.loss_along_line(quadratic, a, b, alphas, batch_size=batch_size), expected,
            rtol=1e-6)


def test_loss_along_line_traces_the_loss_once_not_per_alpha():
    calls = []

    def loss(params):
        calls.append(1)
        return quadratic(params)

    a = {"w": jnp.zeros(2), "b": jnp.float32(0.0)}
    b = {"w": jnp.ones(2), "b": jnp.float32(1.0)}
    plotting.loss_along_line(loss, a, b, np.linspace(-1, 2, 31))
    assert len(calls) <= 2  # one shape check, one trace of the lax.map body


def test_loss_along_line_keeps_leaf_dtypes():
    seen = []

    def loss(params):
        seen.append(params["w"].dtype)
        return jnp.sum(params["w"].astype(jnp.float32) ** 2)

    a = {"w": jnp.zeros(3, jnp.bfloat16)}
    b = {"w": jnp.ones(3, jnp.bfloat16)}
    np.testing.assert_allclose(plotting.loss_along_line(loss, a, b, [0.0, 1.0, 2.0]),
                               [0.0, 3.0, 12.0])
    assert set(seen) == {jnp.dtype(jnp.bfloat16)}


def test_loss_along_line_rejects_bad_input():
    a = {"w": jnp.zeros(2), "b": jnp.float32(0.0)}
    b = {"w": jnp.ones(2), "b": jnp.float32(1.0)}
    with pytest.raises(ValueError, match="non-empty 1-D"):
        plotting.loss_along_line(quadratic, a, b, [])
    with pytest.raises(ValueError, match="non-empty 1-D"):
        plotting.loss_along_line(quadratic, a, b, [[0.0, 1.0]])
    with pytest.raises(ValueError, match="finite"):
        plotting.loss_along_line(quadratic, a, b, [0.0, np.nan])
    with pytest.raises(ValueError, match="same pytree structure"):
        plotting.loss_along_line(quadratic, a, {"w": jnp.ones(2)}, [0.0])
    with pytest.raises(ValueError, match=r"leaf \['w'\] differs"):
        plotting.loss_along_line(quadratic, a, {"w": jnp.ones(3), "b": jnp.float32(1.0)}, [0.0])
    with pytest.raises(ValueError, match="floating-point"):
        plotting.loss_along_line(lambda p: jnp.float32(0.0), {"n": jnp.arange(2)},
                                 {"n": jnp.arange(2)}, [0.0])
    with pytest.raises(ValueError, match="scalar"):
        plotting.loss_along_line(lambda p: p["w"], a, b, [0.0])
    with pytest.raises(ValueError, match="batch_size"):
        plotting.loss_along_line(quadratic, a, b, [0.0], batch_size=0)


# --------------------------------------------------------------------------- plot_loss_slice


def test_plot_loss_slice_draws_the_curve_and_both_end_points():
    alphas = np.linspace(1.5, -0.5, 9)  # unsorted on purpose
    losses = (alphas - 0.25) ** 2
    ax = plotting.plot_loss_slice(alphas, losses).axes[0]
    (curve,) = by_gid(ax.lines, "slice")
    np.testing.assert_allclose(curve.get_xdata(), np.sort(alphas))
    np.testing.assert_allclose(curve.get_ydata(), (np.sort(alphas) - 0.25) ** 2)
    assert [line.get_xdata()[0] for line in by_gid(ax.lines, "endpoint")] == [0.0, 1.0]
    (ends,) = by_gid(ax.collections, "endpoints")
    np.testing.assert_allclose(ends.get_offsets(), [[0.0, 0.0625], [1.0, 0.5625]])


def test_plot_loss_slice_skips_non_finite_losses_and_supports_log_scale():
    ax = plotting.plot_loss_slice([0.0, 0.5, 1.0, 2.0], [1.0, 0.5, 0.8, np.inf],
                                  log_scale=True).axes[0]
    assert ax.get_yscale() == "log"
    assert len(by_gid(ax.lines, "slice")[0].get_xdata()) == 3


def test_plot_loss_slice_rejects_bad_input():
    with pytest.raises(ValueError, match="same length"):
        plotting.plot_loss_slice([0.0, 1.0], [1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="at least 2"):
        plotting.plot_loss_slice([0.0], [1.0])
    with pytest.raises(ValueError, match="1-D"):
        plotting.plot_loss_slice(np.zeros((2, 2)), np.zeros((2, 2)))
    with pytest.raises(ValueError, match="finite"):
        plotting.plot_loss_slice([0.0, np.nan], [1.0, 2.0])
    with pytest.raises(ValueError, match="no finite value"):
        plotting.plot_loss_slice([0.0, 1.0], [np.nan, np.inf])


# --------------------------------------------------------------------------- a real run


def test_plots_of_a_real_tiny_run_match_its_intervention_log():
    from flax import nnx

    import adaptive_optax as ao
    from adaptive_optax.segmentation.policies import adaptive_mix_policy
    from adaptive_optax.segmentation.data import synthetic_shapes
    from adaptive_optax.segmentation.loop import fit
    from adaptive_optax.segmentation.train import init_train_state, make_eval_step, make_train_step
    from adaptive_optax.segmentation.unet import UNet

    train = synthetic_shapes(16, size=16, seed=0)
    val = synthetic_shapes(8, size=16, seed=1)
    model = UNet(depth=1, base_width=4, rngs=nnx.Rngs(jax.random.key(0, impl="rbg")))
    policy = adaptive_mix_policy()
    # rtol=0.5: almost no window improves by half, so plateaus come at once.
    tx = ao.plateau_escape(optax.adam, 1e-3, patience=0, accumulation_steps=2, rtol=0.5,
                           policy=policy, max_interventions=2)
    graphdef, state = init_train_state(model, tx)
    train_step = make_train_step(graphdef, reference_weights=policy.initial_mix)
    _, history = fit(train_step, make_eval_step(graphdef), state, train, val, epochs=3,
                     batch_size=4, mix_label=policy.mix_label)
    assert len(history.interventions) == 2
    fig = plotting.plot_run(history)
    monitor_ax, lr_ax, weights_ax, _ = fig.axes
    assert len(by_gid(monitor_ax.collections, "intervention")[0].get_offsets()) == 2
    assert len(by_gid(lr_ax.texts, "intervention_label")) == 2
    assert len([c for c in weights_ax.collections if isinstance(c, PolyCollection)]) == 4
    # Windows that set a new best are exactly the ones not shaded.
    improved = np.diff(history.array("best_value")[1::2], prepend=np.inf) != 0
    assert len(by_gid(monitor_ax.patches, "plateau_window")) == int((~improved).sum())
