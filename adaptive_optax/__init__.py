"""adaptive_optax: optax transformations that get stuck training runs unstuck.

The main export is :func:`plateau_escape`, an ``optax.GradientTransformation``
that detects loss plateaus and intervenes in-graph: it boosts the learning rate
by a factor chosen from the gradient-norm EMA, damps later boosts, switches the
loss mix, and can roll back an intervention that made things worse.
"""

from adaptive_optax.boost import boost_multiplier
from adaptive_optax.grad_norm import GradNormState, global_norm
from adaptive_optax.plateau import PlateauDetector, PlateauState, WindowEvent
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
from adaptive_optax.transform import PlateauEscapeState, plateau_escape

__version__ = "0.1.0"

__all__ = [
    "BALANCED_MIX",
    "DEFAULT_INITIAL_MIX",
    "GradNormState",
    "InterventionPolicy",
    "InterventionState",
    "PlateauDetector",
    "PlateauEscapeState",
    "PlateauState",
    "RollbackGuard",
    "RollbackState",
    "SEED_MIXES",
    "WindowEvent",
    "adaptive_policy",
    "boost_multiplier",
    "global_norm",
    "legacy_policy",
    "plateau_escape",
]
