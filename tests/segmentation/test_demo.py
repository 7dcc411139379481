"""The demo CLI: options, one-line errors, a tiny end-to-end run, --compare and --resume."""

import contextlib
import io
import json
import os
import shutil
import subprocess
import sys

import pytest

from adaptive_optax.lookahead import Candidate
from adaptive_optax.segmentation import demo
from adaptive_optax.segmentation.loop import History
from adaptive_optax.segmentation.strategies import STRATEGIES

TINY = ["--data", "shapes", "--epochs", "4", "--steps-per-epoch", "2", "--batch-size", "8",
        "--depth", "1", "--width", "4", "--patience", "0", "--cooldown", "0", "--rtol", "0.3",
        "--checkpoint-every", "2", "--no-progress"]


def run_demo(argv) -> str:
    """Runs the demo, returns what it printed (also from a module-scoped fixture)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert demo.main(argv) == 0
    return out.getvalue()


def table_rows(out: str) -> dict[str, list[str]]:
    """The final table: strategy -> [Dice, IoU, best Dice, (epoch), interventions, rollbacks]."""
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("strategy "))
    assert lines[start].split() == ["strategy", "Dice", "IoU", "best", "Dice", "(epoch)",
                                    "interventions", "rollbacks"]
    rows = {}
    for line in lines[start + 1:]:
        if line.startswith("wrote ") or " per class" in line:
            break
        name, *fields = line.split()
        rows[name] = fields
    return rows


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """The tiny run with the defaults: recommended, and constant beside it."""
    out_dir = str(tmp_path_factory.mktemp("demo") / "full")
    return out_dir, run_demo(TINY + ["--out", out_dir])


def read_json(out_dir: str, name: str = "history.json") -> dict:
    with open(os.path.join(out_dir, name)) as f:
        return json.load(f)


def test_help_lists_every_option(capsys):
    with pytest.raises(SystemExit) as exit_info:
        demo.main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for option in ["--strategy", "--compare", "--data", "--epochs", "--seed", "--out",
                   "--resume", "--devices", "--checkpoint-every", "--lr", "--patience"]:
        assert option in out
    for strategy in ["adaptive", "legacy", "reduce-on-plateau", "constant", "recommended"]:
        assert strategy in out
    args = demo.build_parser().parse_args([])
    assert (args.strategy, args.compare) == ("recommended", "constant")


@pytest.mark.parametrize("argv, word", [
    (["--epochs", "0"], "--epochs"),
    (["--strategy", "magic"], "--strategy"),
    (["--compare", "bogus"], "--compare"),
    (["--lr", "-1"], "--lr"),
    (["--data", "mnist"], "--data"),
    (["--devices", "64"], "--devices"),
    # The flag and its range, not a library argument or a parser function's name:
    (["--epochs", "1.5"], "--epochs: must be an integer >= 1, got '1.5'"),
    (["--rtol", "x"], "--rtol: must be a number in [0, 1)"),
    (["--lr", "1e-46"], "--lr: must be a number in (0,"),  # 0 in float32
    (["--lr", "1e40"], "--lr: must be a number in (0, 3.40282e+38]"),
    (["--depth", "7"], "--depth must be in [0, 6]"),  # 64x64 crops: a traceback before
    (["--width", "70000"], "--width x 2**--depth must be at most 65536"),
    (["--epochs", "200000000"], "--epochs 200000000 x 16 steps per epoch must be at most"),
    (["--rtol", "0.99999999999"], "--rtol: must be in [0, 1) (also in float32)"),
    (["--max-interventions", "20000"], "--max-interventions: must be an integer in [0, 10000]"),
])
def test_bad_arguments_give_one_line_and_exit_code_2(argv, word, capsys):
    with pytest.raises(SystemExit) as exit_info:
        demo.main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert word in err
    assert "_int" not in err and "_float" not in err


def test_bad_compare_names_the_flag_and_every_allowed_strategy(capsys):
    with pytest.raises(SystemExit) as exit_info:
        demo.main(["--compare", "bogus"])
    assert exit_info.value.code == 2
    (err,) = capsys.readouterr().err.strip().splitlines()
    assert "--compare" in err and "'bogus'" in err
    for name in ("none", *STRATEGIES):
        assert name in err


def test_console_script_module_exits_2_on_bad_input():
    proc = subprocess.run([sys.executable, "-m", "adaptive_optax.demo", "--batch-size", "0"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "--batch-size" in proc.stderr


def test_tiny_run_writes_outputs_and_resume_is_bit_identical(tiny_run, tmp_path):
    full, out = tiny_run
    assert "[intervention 1]" in out and "grad-norm EMA" in out and "base x" in out
    assert "(class: shape)" in out and "nucleus" not in out and "Dice" in out  # --data shapes
    assert "(constant) [" not in out  # the baseline never intervenes
    for name in ["history.json", "config.json", "run.png"]:
        assert os.path.exists(os.path.join(full, name))
    assert read_json(full, "config.json")["compare"] == "constant"

    # Pretend the run died after epoch 1: keep only that checkpoint, then resume.
    part = str(tmp_path / "part")
    shutil.copytree(full, part)
    shutil.rmtree(os.path.join(part, "checkpoints", "3"))
    resumed = run_demo(TINY + ["--out", part, "--resume"])
    assert "resumed from epoch 1" in resumed
    assert "trained 2 epochs of recommended and 4 of constant beside it" in resumed
    a, b = read_json(full), read_json(part)
    assert a["steps"]["loss"] == b["steps"]["loss"]
    assert a["interventions"] == b["interventions"]
    assert a["evals"] == b["evals"]
    # The baseline is not checkpointed: trained again from scratch, to the same numbers.
    assert a["compare"] == b["compare"]
    assert table_rows(out) == table_rows(resumed)


def test_compare_constant_gives_a_row_and_a_history_per_run(tiny_run):
    full, out = tiny_run
    rows = table_rows(out)
    assert list(rows) == ["recommended", "constant"]
    record = read_json(full)
    assert record["strategy"] == "recommended" and record["compare"]["strategy"] == "constant"
    runs = demo.load_histories(os.path.join(full, "history.json"))
    assert list(runs) == ["recommended", "constant"]
    for name, history in runs.items():
        assert isinstance(history, History)
        evals = history.evals
        assert evals["epoch"] == [0, 1, 2, 3] and len(history.steps["loss"]) == 4 * 2
        best = max(evals["dice"])
        interventions = sum(e["kind"] == "intervention" for e in history.interventions)
        rollbacks = sum(e["kind"] == "rollback" for e in history.interventions)
        assert rows[name] == [f"{evals['dice'][-1]:.4f}", f"{evals['iou'][-1]:.4f}",
                              f"{best:.4f}", f"({evals['epoch'][evals['dice'].index(best)]})",
                              str(interventions), str(rollbacks)]
    assert rows["recommended"][4] != "0" and rows["constant"][4:] == ["0", "0"]
    # Same data and seed: the first step sees the same batch from the same weights.
    first = {name: h.steps["loss"][0] for name, h in runs.items()}
    assert first["recommended"] == first["constant"]


def test_compare_none_gives_one_row_and_the_same_main_run(tiny_run, tmp_path):
    full, _ = tiny_run
    out = run_demo(TINY + ["--out", str(tmp_path), "--compare", "none"])
    assert list(table_rows(out)) == ["recommended"]
    assert "beside it" not in out
    record = read_json(str(tmp_path))
    assert "compare" not in record
    # The baseline's thread does not change the main run's numbers.
    with_baseline = read_json(full)
    for key in ("steps", "evals", "interventions"):
        assert record[key] == with_baseline[key]


def test_compare_equal_to_the_strategy_is_not_trained_twice(tmp_path):
    out = run_demo(TINY + ["--out", str(tmp_path), "--epochs", "2", "--strategy", "constant"])
    assert list(table_rows(out)) == ["constant"]
    assert read_json(str(tmp_path), "config.json")["compare"] == "none"


def test_a_failing_main_run_stops_the_baseline(tmp_path, monkeypatch):
    baseline_steps = []
    fit = demo.fit

    def counting_fit(*args, on_step=None, **kwargs):
        def step():
            on_step()
            baseline_steps.append(1)
        return fit(*args, on_step=step if on_step.__name__ == "baseline_step" else on_step,
                   **kwargs)

    def disk_full(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(demo, "fit", counting_fit)
    monkeypatch.setattr(demo.checkpoint, "save", disk_full)
    with pytest.raises(OSError, match="disk full"):  # the main run's error, after epoch 1
        run_demo(TINY + ["--out", str(tmp_path), "--epochs", "40"])
    assert len(baseline_steps) < 40 * 2  # stopped long before its last step


def test_results_table_lists_the_main_runs_classes_when_there_are_several():
    def history(dice):
        return History(evals={"epoch": [0, 1], "dice": [0.5, dice], "iou": [0.4, 0.5],
                              "dice_per_class": [[0.5, 0.5], [dice - 0.1, dice + 0.1]],
                              "iou_per_class": [[0.4, 0.4], [0.45, 0.55]]},
                       interventions=[{"kind": "intervention"}, {"kind": "rollback"}])

    table = demo.results_table({"adaptive": history(0.7), "constant": History(
        evals=history(0.4).evals)})
    lines = table.splitlines()
    assert lines[0] == "validation after the last epoch (mean of 2 classes)"
    assert lines[2].split() == ["adaptive", "0.7000", "0.5000", "0.7000", "(1)", "1", "1"]
    assert lines[3].split() == ["constant", "0.4000", "0.5000", "0.5000", "(0)", "0", "0"]
    assert lines[4].split() == ["adaptive", "per", "class", "Dice", "IoU"]
    assert lines[5].split() == ["class", "0", "0.6000", "0.4500"]
    assert lines[6].split() == ["class", "1", "0.8000", "0.5500"]


def test_resume_with_another_config_is_refused(tmp_path, capsys):
    out = str(tmp_path / "run")
    argv = TINY + ["--epochs", "2", "--out", out, "--compare", "none"]
    assert demo.main(argv) == 0
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        demo.main(TINY + ["--epochs", "2", "--out", out, "--resume", "--lr", "0.5",
                          "--compare", "none"])
    assert exit_info.value.code == 2
    assert "lr" in capsys.readouterr().err


def test_checkpoint_every_is_not_part_of_the_run_config():
    # It changes when checkpoints are written, not the numbers: --resume may differ in it.
    a = demo.run_config(demo.build_parser().parse_args(TINY + ["--checkpoint-every", "1"]))
    b = demo.run_config(demo.build_parser().parse_args(TINY + ["--checkpoint-every", "2"]))
    assert a == b and "checkpoint_every" not in a
    # Nor --compare: the baseline is trained again on --resume, the main run does not see it.
    c = demo.run_config(demo.build_parser().parse_args(TINY + ["--compare", "cosine"]))
    assert c == a and "compare" not in c


def test_resume_without_checkpoint(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        demo.main(TINY + ["--out", str(tmp_path / "empty"), "--resume"])
    assert exit_info.value.code == 2
    assert "--resume: no checkpoint in" in capsys.readouterr().err


@pytest.mark.multidevice
def test_data_parallel_demo_run_in_a_fresh_process(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "adaptive_optax.demo", *TINY, "--epochs", "2", "--devices", "2",
         "--out", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "x2" in proc.stdout and "Dice" in proc.stdout


def test_batch_size_must_split_over_devices(capsys):
    with pytest.raises(SystemExit) as exit_info:
        demo.main(["--batch-size", "3", "--devices", "2"])
    assert exit_info.value.code == 2
    assert "--batch-size" in capsys.readouterr().err


def _event(**extra):
    return dict(kind="intervention", number=1, epoch=3, window=5, grad_norm_ema=0.01,
                lr_before=1e-3, lr_after=2e-3, boost=2.0, mix_before=0, mix_after=2,
                weights_after={"dice": 0.5, "focal": 0.5, "variance": 0.0}, **extra)


def test_an_intervention_line_names_each_candidates_trial_value_and_stars_the_winner():
    plain = demo.format_intervention(_event())
    assert plain == ("[intervention 1] epoch 3 | plateau window 5 | grad-norm EMA 0.01 | lr "
                     "0.001 -> 0.002 (base x2) | mix 0 -> 2 (dice 0.5, focal 0.5)")
    values = [0.41, 0.398, 0.40, float("nan"), 0.405]
    line = demo.format_intervention(_event(trial_values=values, trial_choice=1))
    assert line.startswith(plain + " | trial: ")
    assert line.endswith("policy 0.41, no boost 0.398*, x0.5 0.4, x2 nan, x1 next 0.405")
    # Candidates the caller names; an unnamed count falls back to their indices.
    two = (Candidate(1.0), Candidate(3.0))
    assert demo.format_intervention(_event(trial_values=[0.5, 0.4], trial_choice=1),
                                    two).endswith("| trial: policy 0.5, x3 0.4*")
    assert demo.format_intervention(_event(trial_values=[0.5, 0.4], trial_choice=0)).endswith(
        "| trial: #0 0.5*, #1 0.4")
    nonfinite = demo.format_intervention(_event(trial_values=[float("nan")] * 2,
                                                trial_choice=-2), two)
    assert nonfinite.endswith("policy nan, x3 nan (all non-finite: no boost)")


def test_every_bundled_data_set_names_its_foreground_class():
    from adaptive_optax.segmentation.data import DATASET_NAMES

    assert set(demo._CLASS_NAMES) == set(DATASET_NAMES)
    assert demo._CLASS_NAMES["textures"] == "grass"
