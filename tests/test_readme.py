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
