"""The README's example runs as printed."""

import pathlib
import re


def test_readme_example_runs():
    text = (pathlib.Path(__file__).parents[1] / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    assert blocks, "README has no python example"
    namespace: dict = {}
    exec(compile(blocks[0], "README.md", "exec"), namespace)  # noqa: S102
    state = namespace["state"]
    import optax

    assert int(optax.tree.get(state, "intervention_count")) >= 1
    assert float(namespace["loss"]) < 1.0


def test_every_readme_example_runs():
    text = (pathlib.Path(__file__).parents[1] / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    assert len(blocks) >= 2
    for i, block in enumerate(blocks[1:], 1):
        namespace: dict = {}
        exec(compile(block, f"README.md, example {i + 1}", "exec"), namespace)  # noqa: S102


# README's rows of the targets table and the strategy each one names in the grid files.
_TABLE_ROWS = {
    "`recommended_options(w)` around Adam/SGD": "recommended",
    "`recommended_options(w, lookahead=True)` around Adam/SGD": "lookahead",
    "around schedule-free (`boost_neutral_schedule_free`)": "escape-schedule-free",
    "around schedule-free, with the lookahead": "lookahead-schedule-free",
}


def test_readme_targets_table_matches_the_stored_grid_files():
    """The published counts are recomputed from the result files that the plot's
    command (``results/lr_grid_all_cpu.txt``) names, so they cannot go stale."""
    import shlex
    import sys

    root = pathlib.Path(__file__).parents[1]
    sys.path.insert(0, str(root / "benchmarks"))
    import lr_grid_targets as T

    command = (root / "benchmarks/results/lr_grid_all_cpu.txt").read_text().splitlines()[0]
    assert command.startswith("# command: python benchmarks/lr_grid_targets.py ")
    argv = shlex.split(command.removeprefix("# command: "))[2:]
    paths = [str(root / a) for a in argv if a.endswith(".json")]
    replace = tuple(argv[argv.index("--replace") + 1].split(","))
    merged = T.merge(paths, replace)

    text = (root / "README.md").read_text()
    heading = re.search(r"Targets met, of (\d+)", text)
    table = text[heading.end():].split("\n\n")[1].splitlines()
    # The header names each column's number of targets: "tuning sets (18)", ...
    columns = [int(n) for n in re.findall(r"\((\d+)\)", table[0])]
    rows = {}
    for line in table[2:]:  # after the header and its rule
        cells = [c.strip().strip("*") for c in line.strip("|").split("|")]
        rows[cells[0]] = tuple(int(c) for c in cells[1:])
    assert set(rows) == set(_TABLE_ROWS)
    for label, strategy in _TABLE_ROWS.items():
        tuning = T.count_met(merged, strategy, T.TUNING_SETS)
        confirmation = T.count_met(merged, strategy, T.CONFIRMATION_SETS)
        totals = [tuning[1], confirmation[1], tuning[1] + confirmation[1]]
        assert columns == totals and int(heading.group(1)) == totals[-1], (strategy, totals)
        assert rows[label] == (tuning[0], confirmation[0], tuning[0] + confirmation[0]), label
    # The summary line of the plot's own log agrees too.
    log = (root / "benchmarks/results/lr_grid_all_cpu.txt").read_text()
    met, total = T.count_met(merged, "lookahead-schedule-free")
    assert f"\n{met} of {total} targets met" in log
