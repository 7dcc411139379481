"""What the lookahead costs: off a plateau (one predicate) and on one (the trials).

Variants, each a jitted, donated train step -- forward, backward,
``tx.update(grads, state, params, value=..., value_fn=...)``,
``optax.apply_updates`` -- on the same model and batch:

(c) ``plateau_escape(optax.adam, lr)`` (its defaults; ``value_fn`` is passed
    and ignored by Adam)
(l) ``plateau_escape(optax.adam, lr, lookahead=Lookahead())`` (the default
    candidates and trial length)
(m) with ``--max-update-ratio R`` only: (l) with ``max_update_ratio=R`` (the
    lookahead preset's limit is ``presets.MAX_UPDATE_RATIO``); its extra
    inner update runs on intervening steps only, so (m)/(l) off a plateau is
    the cost of its predicate and on one the cost of the limit in a trial step

Off a plateau the monitored value is the loss of a run that improves, and no
window ever plateaus (``patience`` past the run): (l)/(c) is the cost of the
lookahead's ``lax.cond`` and its record. On a plateau the monitored value is a
constant and every step intervenes (``patience=0``, no cooldown, no guard,
no cap in practice): (l)/(c) there is the cost of one step with a trial, and
``(l - c) / c`` the trial's cost in plain steps (about ``K * (steps + 1)``
forward passes and ``K * steps`` backward passes for ``K`` candidates).

Run::

    python benchmarks/lookahead_cost.py            # demo U-Net (depth 2, width 8, 64x64, batch 16)
    python benchmarks/lookahead_cost.py --quick    # small U-Net, a few seconds
    python benchmarks/lookahead_cost.py --max-update-ratio 0.005   # with the preset's limit
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402

import _common as C  # noqa: E402
from adaptive_optax import plateau_escape  # noqa: E402
from adaptive_optax.lookahead import Lookahead  # noqa: E402
from adaptive_optax.segmentation.unet import UNet  # noqa: E402

LR = 1e-3
NEVER = 10**6  # patience that no run reaches: no plateau


def make_tx(name: str, on_plateau: bool, lookahead: Lookahead,
            max_update_ratio: float | None = None):
    options = (dict(patience=0, cooldown=0, max_interventions=10_000, rollback=None)
               if on_plateau else dict(patience=NEVER))
    if name == "c":
        return plateau_escape(optax.adam, LR, **options)
    return plateau_escape(optax.adam, LR, lookahead=lookahead,
                          max_update_ratio=max_update_ratio if name == "m" else None, **options)


def make_step(graphdef, rest, tx, on_plateau: bool):
    def loss_fn(params, x, y):
        return C.bce_loss(nnx.merge(graphdef, params, rest)(x), y)

    def step(params, opt_state, x, y):
        def value_fn(p, weights):
            del weights  # the default policy has no loss mixes
            loss = loss_fn(p, x, y)
            return loss, loss

        loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
        value = jnp.float32(1.0) if on_plateau else loss
        updates, opt_state = tx.update(grads, opt_state, params, value=value, value_fn=value_fn)
        return optax.apply_updates(params, updates), opt_state, loss

    return jax.jit(step, donate_argnums=(0, 1))


def section(title, model, x, y, args, on_plateau: bool, lookahead: Lookahead) -> dict:
    graphdef, params, rest = C.split_params(model)
    runners = {}
    for name in ("c", "l") + (("m",) if args.max_update_ratio is not None else ()):
        tx = make_tx(name, on_plateau, lookahead, args.max_update_ratio)
        runner = C.StepRunner(make_step(graphdef, rest, tx, on_plateau), params, tx.init(params),
                              (x, y))
        runner.warmup()
        runners[name] = runner
    steps = C.calibrate_steps(runners["c"], args.block_seconds)
    wall, cpu = C.interleaved_times(runners, repeats=args.repeats, steps=steps)
    stats = C.ratio_stats(wall, "c", cpu)
    rows = [[f"({n})", s["min_s"] * 1e3, s["median_s"] * 1e3, s["ratio_min"],
             s["ratio_median"], s["paired_median"], s["cpu_ratio_median"]]
            for n, s in stats.items()]
    C.print_table(f"{title}: {args.repeats} repeats x {steps} steps",
                  ["variant", "min ms", "median ms", "ratio min", "ratio median",
                   "paired median", "cpu ratio med"], rows)
    return stats


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line; timing arguments resolved (``--quick`` shortens them)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    C.add_timing_args(parser, "a small U-Net and few repeats")
    parser.add_argument("--trial-steps", type=int, default=None,
                        help="Lookahead(steps=...) (default: Lookahead's)")
    parser.add_argument("--memory", choices=("auto", "vmap", "map"), default=None,
                        help="Lookahead(memory=...) (default: Lookahead's)")
    parser.add_argument("--max-update-ratio", type=float, default=None,
                        help="also time (m): (l) with plateau_escape(max_update_ratio=...)")
    return C.resolve_timing_args(parser.parse_args(argv))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    env = C.print_header("lookahead cost: jitted train step, (l) lookahead vs (c) plateau_escape")
    config = {k: v for k, v in (("steps", args.trial_steps), ("memory", args.memory))
              if v is not None}
    lookahead = Lookahead(**config)
    print(f"(l): {lookahead}")
    if args.max_update_ratio is not None:
        print(f"(m): (l) with max_update_ratio={args.max_update_ratio}")
    started = time.perf_counter()
    if args.quick:
        unet_cfg, size, batch = dict(depth=0, base_width=4), 16, 4
    else:
        unet_cfg, size, batch = dict(depth=2, base_width=8), 64, 16
    images, masks = C.shapes_batch(batch, size)
    x, y = jnp.asarray(images), jnp.asarray(masks)
    results = {"environment": env, "args": vars(args), "lookahead": repr(lookahead)}
    for key, on_plateau in (("off_plateau", False), ("on_plateau", True)):
        model = UNet(1, 1, **unet_cfg, rngs=nnx.Rngs(0))
        results[key] = section(f"U-Net {unet_cfg}, {key.replace('_', ' ')}", model, x, y, args,
                               on_plateau, lookahead)
    off = results["off_plateau"]["l"]
    on = results["on_plateau"]
    trial = (on["l"]["median_s"] - on["c"]["median_s"]) / on["c"]["median_s"]
    C.print_table("summary", ["quantity", "value"], [
        ["off plateau (l)/(c), wall median", off["ratio_median"]],
        ["off plateau (l)/(c), paired median", off["paired_median"]],
        ["off plateau (l)/(c), cpu median", off["cpu_ratio_median"]],
        ["one trial, in plain steps (wall median)", trial],
        ["K * (steps + 1)", len(lookahead.candidates) * (lookahead.steps + 1)]]
        + ([["off plateau (m)/(l), paired median",
             results["off_plateau"]["m"]["paired_median"] / off["paired_median"]],
            ["on plateau (m)/(l), wall median",
             on["m"]["median_s"] / on["l"]["median_s"]]]
           if args.max_update_ratio is not None else []))
    results["trial_in_plain_steps"] = trial
    results["elapsed_s"] = time.perf_counter() - started
    print(f"\nelapsed: {results['elapsed_s']:.1f} s")
    C.write_json(args.out, results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
