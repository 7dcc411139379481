"""Small shared builders for the training-side tests (tiny sizes: CPU, 2 cores)."""

import os
import re
import sys

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from adaptive_optax.segmentation import data, strategies, train
from adaptive_optax.segmentation.unet import UNet

# One HLO op counter for the benchmarks and the tests' size guards.
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "benchmarks"))
from _common import _entry_computation, hlo_counts  # noqa: E402, F401


def compiled_update_text(tx, params, grads) -> str:
    """The optimized HLO module of a donated ``update + apply_updates``."""
    def update(params, state, grads):
        updates, state = tx.update(grads, state, params, value=jnp.float32(1.0))
        return optax.apply_updates(params, updates), state

    return jax.jit(update, donate_argnums=(0, 1)).lower(
        params, tx.init(params), grads).compile().as_text()


def compiled_update_entry(tx, params, grads) -> str:
    """The ENTRY computation of :func:`compiled_update_text`."""
    return _entry_computation(compiled_update_text(tx, params, grads))


def concatenate_sizes(hlo_text: str) -> list[int]:
    """Element counts of the 1-D ``concatenate`` results in an HLO module, in order."""
    return [int(n) for n in re.findall(r"\[(\d+)\]\{0\} concatenate\(", hlo_text)]


def tiny_data(n_train=32, n_val=8, size=32, seed=0, difficulty=0.3):
    tr = data.synthetic_shapes(n_train, size=size, seed=seed, difficulty=difficulty)
    va = data.synthetic_shapes(n_val, size=size, seed=seed + 1000, difficulty=difficulty)
    return tr, va


def tiny_run(strategy="adaptive", *, lr=3e-3, patience=0, accumulation_steps=2, width=4,
             depth=1, seed=0, **kwargs):
    """Model + optimizer + jitted steps for a tiny U-Net."""
    model = UNet(1, 1, depth=depth, base_width=width, rngs=nnx.Rngs(jax.random.key(seed, impl="rbg")))
    tx = strategies.make_optimizer(strategy, lr, total_steps=100, patience=patience,
                                   accumulation_steps=accumulation_steps, cooldown=0, seed=seed,
                                   **kwargs)
    graphdef, state = train.init_train_state(model, tx)
    policy = strategies.policy_for(strategy)
    return dict(graphdef=graphdef, state=state, policy=policy,
                train_step=train.make_train_step(graphdef, reference_weights=policy.initial_mix),
                eval_step=train.make_eval_step(graphdef))
