"""The demo CLI: options, one-line errors, a tiny end-to-end run and --resume."""

import json
import os
import shutil
import subprocess
import sys

import pytest

from adaptive_optax import demo

TINY = ["--data", "shapes", "--epochs", "4", "--steps-per-epoch", "2", "--batch-size", "8",
        "--depth", "1", "--width", "4", "--patience", "0", "--cooldown", "0", "--rtol", "0.3",
        "--checkpoint-every", "2", "--no-progress"]


def test_help_lists_every_option(capsys):
    with pytest.raises(SystemExit) as exit_info:
        demo.main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for option in ["--strategy", "--data", "--epochs", "--seed", "--out", "--resume",
                   "--devices", "--checkpoint-every", "--lr", "--patience"]:
        assert option in out
    for strategy in ["adaptive", "legacy", "reduce-on-plateau", "constant"]:
        assert strategy in out


@pytest.mark.parametrize("argv, word", [
    (["--epochs", "0"], "--epochs"),
    (["--strategy", "magic"], "--strategy"),
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


def test_console_script_module_exits_2_on_bad_input():
    proc = subprocess.run([sys.executable, "-m", "adaptive_optax.demo", "--batch-size", "0"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "--batch-size" in proc.stderr


def test_tiny_run_writes_outputs_and_resume_is_bit_identical(tmp_path, capsys):
    full, part = str(tmp_path / "full"), str(tmp_path / "part")
    assert demo.main(TINY + ["--out", full]) == 0
    out = capsys.readouterr().out
    assert "[intervention 1]" in out and "grad-norm EMA" in out and "base x" in out
    assert "\nshape " in out and "nucleus" not in out and "Dice" in out  # --data shapes
    for name in ["history.json", "config.json", "run.png"]:
        assert os.path.exists(os.path.join(full, name))

    # Pretend the run died after epoch 1: keep only that checkpoint, then resume.
    shutil.copytree(full, part)
    shutil.rmtree(os.path.join(part, "checkpoints", "3"))
    assert demo.main(TINY + ["--out", part, "--resume"]) == 0
    assert "resumed from epoch 1" in capsys.readouterr().out
    with open(os.path.join(full, "history.json")) as f, open(os.path.join(part, "history.json")) as g:
        a, b = json.load(f), json.load(g)
    assert a["steps"]["loss"] == b["steps"]["loss"]
    assert a["interventions"] == b["interventions"]
    assert a["evals"] == b["evals"]


def test_resume_with_another_config_is_refused(tmp_path, capsys):
    out = str(tmp_path / "run")
    argv = TINY + ["--epochs", "2", "--out", out]
    assert demo.main(argv) == 0
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        demo.main(TINY + ["--epochs", "2", "--out", out, "--resume", "--lr", "0.5"])
    assert exit_info.value.code == 2
    assert "lr" in capsys.readouterr().err


def test_checkpoint_every_is_not_part_of_the_run_config():
    # It changes when checkpoints are written, not the numbers: --resume may differ in it.
    a = demo.run_config(demo.build_parser().parse_args(TINY + ["--checkpoint-every", "1"]))
    b = demo.run_config(demo.build_parser().parse_args(TINY + ["--checkpoint-every", "2"]))
    assert a == b and "checkpoint_every" not in a


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
