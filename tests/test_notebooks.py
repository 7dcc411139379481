"""Every notebook in notebooks/ runs top to bottom without error (on CPU, in minutes)."""

import pathlib
import sys
import time

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")
pytest.importorskip("matplotlib")

NOTEBOOK_DIR = pathlib.Path(__file__).resolve().parent.parent / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
# Each notebook takes about a minute on 2 CPU cores; the limit leaves room for a busy machine.
CELL_TIMEOUT_S = 600


def _kernel_runs_this_python():
    # The python3 kernelspec says "python"; jupyter_client replaces that name with
    # sys.executable, so the kernel imports this environment's adaptive_optax.
    from jupyter_client.kernelspec import KernelSpecManager

    spec = KernelSpecManager().get_kernel_spec("python3")
    return spec.argv[0] in ("python", "python3", sys.executable)


def test_the_notebooks_are_there_and_stored_without_outputs():
    assert {"01_quickstart.ipynb", "02_strategy_lab.ipynb"} <= {p.name for p in NOTEBOOKS}
    for path in NOTEBOOKS:
        nb = nbformat.read(path, as_version=4)
        nbformat.validate(nb)
        for cell in nb.cells:
            if cell.cell_type == "code":
                assert cell.outputs == [] and cell.execution_count is None, path.name


def test_the_notebooks_match_their_builder():
    sys.path.insert(0, str(NOTEBOOK_DIR))
    try:
        import build_notebooks
    finally:
        sys.path.remove(str(NOTEBOOK_DIR))
    assert build_notebooks.main(["--check"]) == 0, "run python notebooks/build_notebooks.py"


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs_top_to_bottom(path, tmp_path):
    assert _kernel_runs_this_python()
    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(
        nb, timeout=CELL_TIMEOUT_S, kernel_name="python3",
        # Run where the notebook lives, as Jupyter would.
        resources={"metadata": {"path": str(NOTEBOOK_DIR)}},
    )
    start = time.perf_counter()
    client.execute()  # raises CellExecutionError, naming the cell, on any error
    elapsed = time.perf_counter() - start
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs
              if o.output_type == "error"]
    assert not errors
    images = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs
              if "image/png" in o.get("data", {})]
    assert images, "the notebook drew no figure"
    print(f"{path.name}: {elapsed:.1f} s")
