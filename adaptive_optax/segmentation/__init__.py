"""adaptive_optax.segmentation: a segmentation trainer built on the optimizer core.

The application that :func:`adaptive_optax.plateau_escape` was first written
for, as its own package on top of the core: the loss terms and their mixes
(:mod:`~adaptive_optax.segmentation.losses`), the seed's two intervention
policies with their loss mixes (:mod:`~adaptive_optax.segmentation.policies`), Dice/IoU
(:mod:`~adaptive_optax.segmentation.metrics`), a Flax NNX U-Net
(:mod:`~adaptive_optax.segmentation.unet`), the bundled data sets
(:mod:`~adaptive_optax.segmentation.data`), the jitted train and eval steps
(:mod:`~adaptive_optax.segmentation.train`), the epoch loop with its history
(:mod:`~adaptive_optax.segmentation.loop`), the strategies the benchmarks
compare (:mod:`~adaptive_optax.segmentation.strategies`) and the command-line
demo (:mod:`~adaptive_optax.segmentation.demo`). It needs flax; the core
(``import adaptive_optax``) does not. :mod:`adaptive_optax.segmentation.checkpoint`
(Orbax) and :mod:`adaptive_optax.segmentation.plotting` (matplotlib) pull
optional dependencies, so they are imported on their own.

Example:
    >>> from flax import nnx
    >>> from adaptive_optax.segmentation import (
    ...     UNet, fit, init_train_state, load_dataset, make_eval_step, make_optimizer,
    ...     make_train_step)
    >>> train, val = load_dataset("shapes", size=16, num_train=8, num_val=4)
    >>> tx = make_optimizer("recommended", 1e-3, total_steps=2, accumulation_steps=1)
    >>> model = UNet(1, 1, depth=1, base_width=4, rngs=nnx.Rngs(0))
    >>> graphdef, state = init_train_state(model, tx)
    >>> reference = {"dice": 0.4, "focal": 0.3, "variance": 0.1, "bce": 0.2}  # the monitored mix
    >>> step = make_train_step(graphdef, reference_weights=reference)
    >>> state, history = fit(step, make_eval_step(graphdef), state, train, val,
    ...                      epochs=1, batch_size=4)
    >>> len(history.steps["monitor"]), len(history.evals["dice"])
    (2, 1)
"""

from adaptive_optax.segmentation.data import SegmentationData, load_dataset
from adaptive_optax.segmentation.loop import History, fit
from adaptive_optax.segmentation.losses import loss_components, mixed_loss
from adaptive_optax.segmentation.policies import (
    BALANCED_MIX,
    INITIAL_MIX,
    MIX_TABLE,
    adaptive_mix_policy,
    scripted_policy,
)
from adaptive_optax.segmentation.strategies import STRATEGIES, make_optimizer
from adaptive_optax.segmentation.train import init_train_state, make_eval_step, make_train_step
from adaptive_optax.segmentation.unet import UNet

__all__ = [
    "BALANCED_MIX",
    "History",
    "INITIAL_MIX",
    "MIX_TABLE",
    "STRATEGIES",
    "SegmentationData",
    "UNet",
    "adaptive_mix_policy",
    "fit",
    "init_train_state",
    "load_dataset",
    "loss_components",
    "make_eval_step",
    "make_optimizer",
    "make_train_step",
    "mixed_loss",
    "scripted_policy",
]
