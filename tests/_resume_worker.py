"""A small U-Net run that can be checkpointed, and resumed in a fresh process.

Shared by tests/test_reliability.py (which runs the uninterrupted reference in
the test process) and by this file's ``main`` (run as a subprocess), which
restores a checkpoint into a freshly built state and finishes the run:

    python tests/_resume_worker.py CONFIG_JSON CKPT_DIR OUT_PREFIX [CKPT_DIR OUT_PREFIX]...
        [--mismatch OTHER_CONFIG_JSON CKPT_DIR OUT_JSON]

For each checkpoint it writes ``OUT_PREFIX.json`` (the history) and
``OUT_PREFIX.npz`` (the final train state as flat arrays) for a bit-for-bit
comparison. Several checkpoints share one process and one compiled step.

``--mismatch`` then restores ``CKPT_DIR`` (saved with ``CONFIG_JSON``) into a
state built from ``OTHER_CONFIG_JSON`` and writes the exception's type and
message to ``OUT_JSON``. It runs here rather than in the test process because a
restore that fails on an array *shape* leaves orbax's aborted reads behind;
seconds later they raise "Event loop is closed" / "coroutine ... was never
awaited" from background threads, which pytest (warnings as errors) pins on
whichever test runs then (see docs/reliability.md).
"""

from __future__ import annotations

import json
import sys
from typing import Any

import jax
import numpy as np
import optax
from flax import nnx

import adaptive_optax as ao
from adaptive_optax.segmentation.policies import adaptive_mix_policy
from adaptive_optax.segmentation import checkpoint
from adaptive_optax.segmentation.data import SegmentationData, synthetic_shapes
from adaptive_optax.segmentation.loop import History, fit
from adaptive_optax.segmentation.train import init_train_state, make_eval_step, make_train_step
from adaptive_optax.segmentation.unet import UNet

# Patience 1, cooldown 2 and windows of 2 steps over epochs of 3 steps: epoch
# ends fall mid-window, mid-plateau (plateau_count 1) and mid-cooldown.
CONFIG: dict[str, Any] = dict(depth=1, width=4, size=16, num_train=12, num_val=4, batch=4,
                              steps_per_epoch=3, epochs=8, lr=3e-3, patience=1, cooldown=2,
                              accumulation_steps=2, rtol=0.02, max_interventions=3,
                              rollback=False, seed=0)


def init_state(config: dict[str, Any]):
    """Returns ``(graphdef, state)``: the model and optimizer of ``config``, nothing else."""
    tx = ao.plateau_escape(
        optax.adam, config["lr"], patience=config["patience"], cooldown=config["cooldown"],
        accumulation_steps=config["accumulation_steps"], rtol=config["rtol"],
        max_interventions=config["max_interventions"], seed=config["seed"],
        policy=adaptive_mix_policy(), rollback=ao.RollbackGuard() if config["rollback"] else None)
    # An "rbg" key: threefry initialisation compiles many small eager kernels,
    # seconds of start-up on a 2-core machine.
    model = UNet(depth=config["depth"], base_width=config["width"], norm="group",
                 rngs=nnx.Rngs(jax.random.key(config["seed"], impl="rbg")))
    return init_train_state(model, tx)


def build(config: dict[str, Any]):
    """Returns ``(graphdef, state, train_step, eval_step, train, val)`` for ``config``."""
    policy = adaptive_mix_policy()
    graphdef, state = init_state(config)
    train = synthetic_shapes(config["num_train"], size=config["size"], seed=config["seed"])
    val = SegmentationData(*synthetic_shapes(config["num_val"], size=config["size"],
                                             seed=config["seed"] + 1))
    step = make_train_step(graphdef, reference_weights=policy.initial_mix)
    return graphdef, state, step, make_eval_step(graphdef), train, val


def run(config, step, eval_step, state, train, val, *, start_epoch=0, history=None,
        on_epoch_end=None):
    """Runs ``fit`` to ``config["epochs"]`` from ``start_epoch``."""
    return fit(step, eval_step, state, train, val, epochs=config["epochs"],
               batch_size=config["batch"], steps_per_epoch=config["steps_per_epoch"],
               seed=config["seed"], start_epoch=start_epoch, history=history,
               on_epoch_end=on_epoch_end)


def flat_state(state) -> dict[str, np.ndarray]:
    """The train state as ``{path: array}`` (parameters and the whole optimizer state)."""
    leaves = jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(state))[0]
    return {jax.tree_util.keystr(path): np.asarray(leaf) for path, leaf in leaves}


def _load(path: str) -> dict[str, Any]:
    with open(path) as f:
        return json.load(f)


def try_restore(config: dict[str, Any], other: dict[str, Any], checkpoint_dir: str,
                out_path: str) -> None:
    """Restores a checkpoint of ``config`` into a state of ``other``; records the error."""
    try:
        checkpoint.restore(checkpoint_dir, init_state(other)[1], config)
        result = {"type": None, "message": ""}
    except Exception as err:  # noqa: BLE001 - the test asserts on the type
        result = {"type": type(err).__name__, "message": str(err)}
    with open(out_path, "w") as f:
        json.dump(result, f)


def main(config_path: str, *args: str) -> None:
    mismatch = None
    if "--mismatch" in args:
        i = args.index("--mismatch")
        mismatch, args = args[i + 1:i + 4], args[:i]
    config = _load(config_path)
    _, fresh, step, eval_step, train, val = build(config)
    for checkpoint_dir, out_prefix in zip(args[::2], args[1::2], strict=True):
        # restore() reads only the structure of `fresh` and returns new arrays,
        # so one template serves every checkpoint.
        state, history, epoch = checkpoint.restore(checkpoint_dir, fresh, config)
        assert isinstance(history, History)
        state, history = run(config, step, eval_step, state, train, val,
                             start_epoch=epoch + 1, history=history)
        with open(out_prefix + ".json", "w") as f:
            f.write(history.to_json())
        np.savez(out_prefix + ".npz", **flat_state(state))
    if mismatch is not None:
        # Last, so that its aborted reads cannot interfere with the runs above.
        other_path, checkpoint_dir, out_path = mismatch
        try_restore(config, _load(other_path), checkpoint_dir, out_path)


if __name__ == "__main__":
    main(*sys.argv[1:])
