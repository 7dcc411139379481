"""Why a lookahead trial costs more than its step count on CPU: convolution
gradients inside a nested computation.

A trial runs under ``jax.lax.cond`` (and ``lax.scan`` / ``lax.map`` inside it).
On XLA:CPU a convolution's gradient is several times slower there than at the
top level of a program: at the top level, layout assignment puts the
gradient's convolutions (kernel gradient ``dim_labels=f01b_i01o->01bf``, input
gradient with a flipped kernel) into the canonical ``b01f_01io->b01f`` form
that the fast Eigen kernels take, with transposes around them; in a branch or
loop body it leaves them as they are and the slow generic loop runs them.
This is the upstream jax-ml/jax#12868 ("Convolution is significantly slower
inside a loop body (CPU)", open). The convolutions are the user's model, so
the library cannot reorder them; forward passes are not affected.

This script times, side by side, one function at the top level, inside a
``lax.cond`` with a true predicate and inside a ``lax.scan``; and prints the
``dim_labels`` of the kernel gradient's convolution in both places::

    python benchmarks/nested_conv.py
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

import _common as C  # noqa: E402
from adaptive_optax.segmentation.unet import UNet  # noqa: E402


def best_ms(fn, *args, repeats: int) -> float:
    """The fastest of ``repeats`` calls of the jitted ``fn``, in ms (after a warm-up call)."""
    jitted = jax.jit(fn)
    jax.block_until_ready(jitted(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(jitted(*args))
        times.append(time.perf_counter() - start)
    return 1e3 * min(times)


def placements(fn):
    """``{place: f(pred, *args)}``: ``fn`` at the top level, in a ``lax.cond``, in a 1-step scan.

    The predicate is an argument (a traced value, true when called), so XLA
    cannot fold the conditional away.
    """
    def top(pred, *args):
        del pred
        return fn(*args)

    def in_cond(pred, *args):
        return jax.lax.cond(pred, fn, lambda *a: jnp.zeros([], jnp.float32), *args)

    def in_scan(pred, *args):
        del pred
        return jax.lax.scan(lambda c, _: (c, fn(*args)), 0, None, length=1)[1][0]

    return {"top level": top, "lax.cond": in_cond, "lax.scan": in_scan}


def conv_dim_labels(fn, *args) -> list[str]:
    """The ``dim_labels`` of every convolution in the compiled ``fn``."""
    text = jax.jit(fn).lower(*args).compile().as_text()
    return re.findall(r"convolution\(.*?dim_labels=([\w>-]+)", text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--skip-unet", action="store_true",
                        help="time the single convolution only (a smoke test)")
    args = parser.parse_args(argv)
    C.print_header("convolution gradients at the top level and in nested computations (CPU)",
                   timed=False)
    print("# timings: the best of --repeats calls of each jitted function, one after another")

    x = jnp.ones((8, 32, 32, 16))
    w = jnp.full((3, 3, 16, 16), 0.01)

    def conv_loss(w, x):
        out = jax.lax.conv_general_dilated(x, w, (1, 1), "SAME",
                                           dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return jnp.sum(out ** 2)

    def scalar(f):  # every placement returns one array of a fixed shape
        return lambda *a: jnp.sum(jnp.stack([jnp.sum(t) for t in jax.tree.leaves(f(*a))]))

    cases = {
        "conv forward": (scalar(conv_loss), (w, x)),
        "conv kernel gradient": (scalar(jax.grad(conv_loss, 0)), (w, x)),
        "conv input gradient": (scalar(jax.grad(conv_loss, 1)), (w, x)),
    }
    if not args.skip_unet:  # the demo's U-Net (depth 2, width 8) on a batch of 8 32x32 crops
        graphdef, params = nnx.split(UNet(depth=2, base_width=8, rngs=nnx.Rngs(0)))
        images = jnp.ones((8, 32, 32, 1))

        def unet_loss(params):
            return jnp.mean(nnx.merge(graphdef, params)(images) ** 2)

        cases["U-Net forward"] = (scalar(unet_loss), (params,))
        cases["U-Net gradient"] = (scalar(jax.grad(unet_loss)), (params,))
    rows = []
    for name, (fn, fn_args) in cases.items():
        ms = {place: best_ms(f, jnp.bool_(True), *fn_args, repeats=args.repeats)
              for place, f in placements(fn).items()}
        rows.append([name, *ms.values(), ms["lax.cond"] / ms["top level"],
                     ms["lax.scan"] / ms["top level"]])
    C.print_table("best of repeats, ms", ["function", "top level", "lax.cond", "lax.scan",
                                          "cond / top", "scan / top"], rows)
    kernel_grad = scalar(jax.grad(conv_loss, 0))
    for place, f in placements(kernel_grad).items():
        print(f"# conv kernel gradient, {place}: dim_labels "
              f"{conv_dim_labels(f, jnp.bool_(True), w, x)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
