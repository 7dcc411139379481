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
