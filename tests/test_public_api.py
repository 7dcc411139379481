"""The package's public API: everything in __all__ exists; optional extras stay lazy."""

import subprocess
import sys

import adaptive_optax as ao


def test_all_names_exist_and_are_sorted():
    assert ao.__all__ == sorted(ao.__all__)
    for name in ao.__all__:
        assert getattr(ao, name) is not None, name


def test_import_does_not_pull_the_optional_extras():
    code = ("import sys, adaptive_optax; "
            "print(any(m.split('.')[0] in ('orbax', 'matplotlib', 'tifffile', 'tqdm') "
            "for m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"
