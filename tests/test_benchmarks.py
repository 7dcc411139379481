"""The benchmark scripts' --quick modes run and print their tables (so they cannot rot).

Each script runs in a subprocess with this interpreter, exactly as a user
would start it; the assertions check the exit code and the table headers and
rows, not the timings (those depend on the machine). Measured here (2 shared
CPU cores): overhead --quick ~35 s (marked slow), strategies --quick ~20 s,
grad_norm_trap --quick ~11 s, gpu_kernels --quick ~10 s (the local target: CI has
no CUDA plugin for the deviceless GPU compile).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCHMARKS = os.path.join(ROOT, "benchmarks")


def run_script(name: str, *args: str, timeout: float = 300) -> str:
    """Runs ``benchmarks/<name>`` and returns its stdout; fails with the output on error."""
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, os.path.join(BENCHMARKS, name), *args],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, (
        f"{name} {' '.join(args)} exited {proc.returncode}\n"
        f"--- stdout ---\n{proc.stdout[-4000:]}\n--- stderr ---\n{proc.stderr[-4000:]}")
    return proc.stdout


def assert_header(out: str) -> None:
    assert "# command: " in out
    assert "# device: " in out
    assert "# jax " in out


def test_help():
    # One script only: each start imports jax (seconds); the quick runs below cover the rest.
    out = run_script("strategies.py", "--help", timeout=120)
    for flag in ("--quick", "--out", "--seeds", "--data", "--plot"):
        assert flag in out, flag


@pytest.mark.slow
def test_overhead_quick(tmp_path):
    path = tmp_path / "overhead.json"
    out = run_script("overhead.py", "--quick", "--out", str(path))
    assert_header(out)
    for row in ["(a)      optax.adam", "(b)      adam + contrib.reduce_on_plateau",
                "(c)      plateau_escape(adam)", "(d)      plateau_escape(adam, rollback",
                "(e)      clip_by_global_norm(1) + adam"]:
        assert out.count(row) >= 2, row  # tiny conv net and U-Net tables
    for header in ["## tiny conv net", "## U-Net", "optimizer only", "## targets",
                   "## model-size sweep", "## batch sweep", "## state-leaf cost",
                   "## compiles and host transfers"]:
        assert header in out, header
    assert "ratio min" in out and "ratio median" in out and "extra B" in out
    # The in-graph design: one compile, no host transfer, 3 interventions.
    assert out.count("compiles: 1, transfers: 0, interventions: 3") == 3
    result = json.loads(path.read_text())
    stats = result["tiny"]["stats"]
    assert set(stats) == {"a", "b", "c", "d", "e"}
    assert stats["a"]["ratio_median"] == pytest.approx(1.0)
    leaf = result["leaf_cost"]
    cases = ("8 scalars", "32 scalars", "U-Net parameter shapes")
    assert set(leaf) == {f"{c}: {held}" for c in cases for held in ("leaves", "vector")}
    assert all("per_leaf_us" in leaf[f"{c}: leaves"] for c in cases)
    facts = result["tiny"]["facts"]
    params_bytes = result["tiny"]["params"]["bytes"]
    # (c) adds O(1) scalars; (d) adds one parameter copy (plus scalars).
    assert 0 < facts["c"]["state_bytes"] - facts["a"]["state_bytes"] < 1024
    extra_d = facts["d"]["state_bytes"] - facts["a"]["state_bytes"]
    assert params_bytes <= extra_d < params_bytes + 1024


def test_grad_norm_trap_quick(tmp_path):
    path = tmp_path / "trap.json"
    out = run_script("grad_norm_trap.py", "--quick", "--out", str(path))
    assert_header(out)
    assert "## tiny conv net" in out and "## explanation" in out
    for variant in ["adam", "library", "clip", "ravel", "host-float", "callback", "per-leaf",
                    "float64", "cond", "plateau"]:
        assert f"\n{variant} " in out, variant
    result = json.loads(path.read_text())
    hlo = result["tiny"]["hlo"]
    # What the explanation rests on, read from the optimized HLO.
    # (Counts relative to adam: on GPU convolutions are custom calls too.)
    assert hlo["ravel"]["concatenated_x_params"] == 1.0  # every gradient written once more
    assert hlo["callback"]["custom-call"] > hlo["adam"]["custom-call"]
    assert hlo["cond"]["conditional"] > hlo["adam"]["conditional"]
    assert hlo["float64"]["f64_values"] > 0
    for key in ("conditional", "custom-call", "f64_values"):
        assert hlo["library"][key] == hlo["adam"][key], key
    # The library joins only leaves of <= SMALL_LEAF_SIZE elements (all of the
    # tiny net's), in one concatenate; larger leaves are never copied
    # (tests/test_grad_norm.py checks a model with a large leaf).
    assert hlo["library"]["concatenate_all"] - hlo["adam"]["concatenate_all"] == 1


def test_strategies_quick(tmp_path):
    path = tmp_path / "strategies.json"
    plot = tmp_path / "loss.png"
    # One strategy of each kind through the library's train step, on one data set: the
    # seed's rules, optax's reduce_on_plateau, no intervention, the lookahead, a
    # learning-rate-free optimizer, and schedule-free (evaluated at its average) with the
    # lookahead. Each strategy here costs a U-Net compile (~2 s); every strategy's
    # optimizer is built and updated in tests/segmentation/test_strategies.py, and the
    # loaders are tested in tests/segmentation/test_data.py.
    chosen = ["adaptive", "legacy", "reduce-on-plateau", "constant", "lookahead", "prodigy",
              "lookahead-schedule-free"]
    out = run_script("strategies.py", "--quick", "--data", "shapes", "--strategies",
                     ",".join(chosen), "--out", str(path), "--plot", str(plot))
    assert_header(out)
    assert "## shapes:" in out and "## nuclei" not in out
    for header in ["final dice", "best dice", "interv.", "jump max"]:
        assert header in out
    for strategy in chosen:
        assert f"\n{strategy} " in out, strategy
    assert plot.stat().st_size > 0
    result = json.loads(path.read_text())
    runs = result["data"]["shapes"]
    assert {r["strategy"] for r in runs} == set(chosen)
    # patience=0 in quick mode: the intervening strategies do intervene.
    for strategy in ("adaptive", "lookahead", "lookahead-schedule-free"):
        assert any(r["interventions"] > 0 for r in runs if r["strategy"] == strategy), strategy


def test_gpu_kernels_quick(tmp_path):
    path = tmp_path / "gpu.json"
    out = run_script("gpu_kernels.py", "--quick", "--out", str(path))
    assert_header(out)
    on_cpu = jax.default_backend() == "cpu"
    assert f"# target: local {jax.default_backend()}" in out
    assert "## tiny: optimizer-only update" in out
    result = json.loads(path.read_text())["tiny"]
    assert set(result) == {"a", "c", "e"}
    # The counts are real: plain Adam compiles to fewer ops than plateau_escape.
    assert 0 < result["a"]["entry_ops"] < result["c"]["entry_ops"]
    # The non-finite skip is a conditional on CPU only.
    assert result["c"]["conditionals"] == (1 if on_cpu else 0)


def test_hlo_counts_include_what_a_conditional_runs():
    # A conditional is one entry op but runs a whole branch: executed_ops counts it.
    from helpers import hlo_counts

    def f(pred, x):
        return jax.lax.cond(pred, lambda x: jnp.sin(x) * jnp.cos(x) + jnp.exp(x),
                            lambda x: x, x)

    text = jax.jit(f).lower(True, jnp.ones(8)).compile().as_text()
    counts = hlo_counts(text)
    if counts["conditional"]:  # XLA kept the conditional (it does on CPU)
        assert counts["executed_ops"] > counts["entry_ops"]
    else:
        assert counts["executed_ops"] == counts["entry_ops"]


def test_lr_grid_quick(tmp_path):
    path = tmp_path / "lr_grid.json"
    plot = tmp_path / "lr_grid.png"
    out = run_script("lr_grid.py", "--quick", "--out", str(path), "--plot", str(plot),
                     timeout=120)
    assert_header(out)
    strategies = ("constant", "recommended", "schedule-free")  # --quick's
    assert "## shapes, adam" in out
    for header in ["tuned dice", "best rate", "grid mean", "width (dec)", "dice@const*",
                   "jump@const*", "interv.", "rollb.", "jump max"]:
        assert header in out, header
    assert "per rate" in out and "# convergence of constant at its best rate" in out
    for strategy in strategies:
        assert f"\n{strategy} " in out, strategy
    assert plot.stat().st_size > 0
    results = json.loads(path.read_text())["results"]["shapes"]["adam"]
    assert set(results) == set(strategies)
    for strategy, r in results.items():
        finals = r["final_dice"]  # [rate][seed]
        assert len(finals) == len(r["rates"]) == 2 and all(len(f) == 1 for f in finals), strategy
        assert all(0.0 <= d <= 1.0 for f in finals for d in f), (strategy, finals)
    # schedule-free's own grid: the optimizer's times 3.
    assert results["schedule-free"]["rates"] == pytest.approx([3e-3, 3e-2])


def test_lr_grid_trial_steps_gives_a_row_per_length_and_counts_the_winners(tmp_path):
    path = tmp_path / "trials.json"
    out = run_script("lr_grid.py", "--quick", "--strategies", "lookahead", "--trial-steps",
                     "1,window", "--window", "8", "--steps", "120", "--rates-adam", "3e-2",
                     "--out", str(path), timeout=120)
    assert "lookahead, share of interventions won by each candidate" in out
    results = json.loads(path.read_text())["results"]["shapes"]["adam"]
    assert set(results) == {"lookahead-t1", "lookahead-t8"}  # "window" is --window's 8
    for row, r in results.items():
        counts = r["trial_choice_counts"]  # the 5 default candidates, then "all non-finite"
        assert len(counts) == 6, row
        interventions = sum(n for per_rate in r["runs"]["interventions"] for n in per_rate)
        assert interventions > 0 and sum(counts) == interventions, (row, counts)


@pytest.mark.parametrize("argv, message", [
    (["--strategies", "constant", "--trial-steps", "4"], "needs the lookahead strategy"),
    (["--strategies", "lookahead", "--trial-steps", "0"], "ints in [1, 10000] or 'window'"),
    (["--strategies", "lookahead", "--trial-steps", "4,window"], "distinct lengths"),
])
def test_lr_grid_refuses_bad_trial_steps(argv, message, monkeypatch):
    sys.path.insert(0, BENCHMARKS)
    # lr_grid sets XLA_FLAGS for its own run on import: keep it out of later subprocesses.
    monkeypatch.setenv("XLA_FLAGS", os.environ.get("XLA_FLAGS", ""))
    import lr_grid

    with pytest.raises(SystemExit) as exit_info, contextlib.redirect_stderr(io.StringIO()) as err:
        lr_grid.parse_args(["--quick", *argv])  # --quick's window is 4
    assert exit_info.value.code == 2 and message in err.getvalue()


def test_lr_grid_default_run_leaves_out_only_the_opt_in_rows(monkeypatch):
    sys.path.insert(0, BENCHMARKS)
    monkeypatch.setenv("XLA_FLAGS", os.environ.get("XLA_FLAGS", ""))
    import lr_grid
    from adaptive_optax.segmentation.strategies import STRATEGIES

    default = lr_grid.parse_args([]).strategies
    assert set(lr_grid.OPT_IN) <= set(STRATEGIES) and not set(lr_grid.OPT_IN) & set(default)
    assert set(default) | set(lr_grid.OPT_IN) == set(STRATEGIES)
    assert lr_grid.parse_args(["--strategies", "lookahead-prodigy"]).strategies == [
        "lookahead-prodigy"]


def _grid_result(tuned, mean, jump, final):
    return {"final_dice": final,
            "summary": {"tuned dice": tuned, "grid mean": mean, "jump max": jump}}


def test_lr_grid_targets_checks_and_refuses_mixed_runs(tmp_path):
    sys.path.insert(0, BENCHMARKS)
    import lr_grid_targets as T

    base = {"constant": _grid_result(0.80, 0.70, "-", [[0.8]]),
            "schedule-free": _grid_result(0.84, 0.75, "-", [[0.84]])}
    rec = {"recommended": _grid_result(0.836, 0.74, 1.6, [[0.83]])}
    paths = []
    for i, results in enumerate([base, rec]):
        paths.append(tmp_path / f"{i}.json")
        paths[-1].write_text(json.dumps({"results": {"shapes": {"adam": results}}}))
    merged = T.merge([str(p) for p in paths])
    rows = T.check(merged["shapes"]["adam"])
    # grid mean 0.74 < 0.75 (schedule-free); tuned 0.836 >= 0.84 - 0.005; jump 1.6 >= 1.5.
    assert [r[-1] for r in rows] == ["NO", "yes", "NO"]
    assert T.count_met(merged) == (1, 3)
    assert T.count_met(merged, datasets=("nuclei",)) == (0, 0)
    assert "schedule-free" in rows[0][2]
    assert rows[2][2] == "-"  # no window means: no noise floor
    # The noise floor: constant's largest rise of a window over the previous one.
    constant = dict(base["constant"], monitor_window_means=[[[1.0, 0.5, 0.8, 0.4],
                                                             [1.0, float("nan"), 0.9, 0.3]]])
    assert T.natural_rise(constant) == pytest.approx(1.6)
    rows = T.check({**base, **rec, "constant": constant})
    assert rows[2][2] == "constant's own rise 1.600"
    # The same strategy with other results in two files: not the same runs.
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"results": {"shapes": {"adam": {
        "constant": _grid_result(0.80, 0.70, "-", [[0.79]])}}}}))
    with pytest.raises(ValueError, match="constant on shapes/adam differs"):
        T.merge([str(paths[0]), str(other)])


def test_nested_conv_times_every_placement_and_prints_the_layouts():
    out = run_script("nested_conv.py", "--repeats", "1", "--skip-unet", timeout=120)
    assert_header(out)
    for name in ("conv forward", "conv kernel gradient", "conv input gradient"):
        assert f"\n{name} " in out, name
    for place in ("top level", "lax.cond", "lax.scan"):
        assert f"# conv kernel gradient, {place}: dim_labels [" in out, place


def test_lookahead_cost_builds_its_variants_with_the_limit_it_is_given(monkeypatch):
    # The timing run is too long for the suite (~35 s --quick); this checks that
    # --max-update-ratio parses and reaches (m), and only (m).
    sys.path.insert(0, BENCHMARKS)
    import lookahead_cost
    from adaptive_optax.lookahead import Lookahead

    calls = []
    monkeypatch.setattr(lookahead_cost, "plateau_escape",
                        lambda inner, lr, **kwargs: calls.append(kwargs))
    lookahead = Lookahead()
    for on_plateau in (False, True):
        for name in ("c", "l", "m"):
            lookahead_cost.make_tx(name, on_plateau, lookahead, 0.005)
    assert [c.get("max_update_ratio") for c in calls] == [None, None, 0.005] * 2
    assert [c.get("lookahead") for c in calls] == [None, lookahead, lookahead] * 2
    assert calls[3]["patience"] == 0 and calls[0]["patience"] == lookahead_cost.NEVER
    assert lookahead_cost.parse_args(["--max-update-ratio", "0.005"]).max_update_ratio == 0.005
    assert lookahead_cost.parse_args([]).max_update_ratio is None


def test_lr_grid_plot_colours_a_strategy_alike_in_every_panel(monkeypatch):
    # One legend serves all panels, so merged files whose panels hold different rows
    # must still draw each strategy in one colour.
    sys.path.insert(0, BENCHMARKS)
    monkeypatch.setenv("XLA_FLAGS", os.environ.get("XLA_FLAGS", ""))
    import lr_grid

    panels = {("a", "adam"): {"constant": {}, "cosine": {}},
              ("b", "adam"): {"cosine": {}, "prodigy": {}, "constant": {}}}
    colors = lr_grid.strategy_colors(panels)
    assert list(colors) == ["constant", "cosine", "prodigy"]
    assert len(set(colors.values())) == 3
    many = {("a", "adam"): {f"s{i}": {} for i in range(25)}}
    assert len(set(lr_grid.strategy_colors(many).values())) == 25
