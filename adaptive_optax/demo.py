"""``python -m adaptive_optax.demo``: runs the segmentation demo.

The demo lives in :mod:`adaptive_optax.segmentation.demo` (``--help`` lists
its options); this module only keeps the short command working. It imports
the demo, and with it flax, when the demo runs, not when it is imported.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    """Runs :func:`adaptive_optax.segmentation.demo.main`; returns the exit code."""
    from adaptive_optax.segmentation import demo

    return demo.main(argv)


if __name__ == "__main__":
    sys.exit(main())
