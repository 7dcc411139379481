"""adaptive_optax: optax transformations that get stuck training runs unstuck.

The main export is :func:`plateau_escape`, an ``optax.GradientTransformation``
that detects loss plateaus and intervenes in-graph: it boosts the learning rate
by a factor chosen from the gradient-norm EMA, damps later boosts, switches the
loss mix, and can roll back an intervention that made things worse.

The segmentation side (losses, U-Net, train step, data, training loop) is
re-exported here too; :mod:`adaptive_optax.checkpoint` (Orbax),
:mod:`adaptive_optax.plotting` (matplotlib) and :mod:`adaptive_optax.parallel`
are imported on their own.
"""

from adaptive_optax.boost import boost_multiplier
from adaptive_optax.data import SegmentationData, load_dataset
from adaptive_optax.grad_norm import GradNormState, global_norm
from adaptive_optax.loop import History, fit
from adaptive_optax.losses import loss_components, mixed_loss
from adaptive_optax.plateau import PlateauDetector, PlateauState, WindowEvent
from adaptive_optax import presets
from adaptive_optax.policy import (
    BALANCED_MIX,
    DEFAULT_INITIAL_MIX,
    SEED_MIXES,
    InterventionPolicy,
    InterventionState,
    adaptive_policy,
    legacy_policy,
)
from adaptive_optax.rollback import RollbackGuard, RollbackState
from adaptive_optax.strategies import STRATEGIES, make_optimizer
from adaptive_optax.train import init_train_state, make_eval_step, make_train_step
from adaptive_optax.state import PlateauEscapeState, find_state, state_field
from adaptive_optax.transform import plateau_escape
from adaptive_optax.unet import UNet

__version__ = "0.1.0"

__all__ = [
    "BALANCED_MIX",
    "DEFAULT_INITIAL_MIX",
    "GradNormState",
    "History",
    "InterventionPolicy",
    "InterventionState",
    "PlateauDetector",
    "PlateauEscapeState",
    "PlateauState",
    "RollbackGuard",
    "RollbackState",
    "SEED_MIXES",
    "STRATEGIES",
    "SegmentationData",
    "UNet",
    "WindowEvent",
    "adaptive_policy",
    "boost_multiplier",
    "find_state",
    "fit",
    "global_norm",
    "init_train_state",
    "legacy_policy",
    "load_dataset",
    "loss_components",
    "make_eval_step",
    "make_optimizer",
    "make_train_step",
    "mixed_loss",
    "plateau_escape",
    "presets",
    "state_field",
]
