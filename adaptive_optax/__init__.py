"""adaptive_optax: optax transformations that get stuck training runs unstuck.

The main export is :func:`plateau_escape`, an ``optax.GradientTransformation``
that detects loss plateaus and intervenes in-graph: it boosts the learning rate
by a factor chosen from the gradient-norm EMA, damps later boosts, switches the
loss mix, and can roll back an intervention that made things worse.

This package is the optimizer core and imports jax, optax and numpy only:
the detector (:mod:`~adaptive_optax.plateau`), the policy
(:mod:`~adaptive_optax.policy`), the boost (:mod:`~adaptive_optax.boost`) and
its limit from the size of the step it scales (:mod:`~adaptive_optax.boost_limit`), the
gradient-norm EMA (:mod:`~adaptive_optax.grad_norm`), the rollback guard
(:mod:`~adaptive_optax.rollback`), the lookahead that tries candidate
interventions before committing one (:mod:`~adaptive_optax.lookahead`), the
state (:mod:`~adaptive_optax.state`), the update
(:mod:`~adaptive_optax.transform`), the presets (:mod:`~adaptive_optax.presets`),
a schedule-free inner optimizer whose average ignores the boosts
(:mod:`~adaptive_optax.schedule_free`) and the multi-device helpers
(:mod:`adaptive_optax.parallel`, imported on its own). The segmentation
application built on it (losses, U-Net, train step, data, training loop,
strategies, demo; it needs flax) is :mod:`adaptive_optax.segmentation`; its
names are no longer exported here, and asking for one says where it went.
"""

from adaptive_optax import presets
from adaptive_optax.boost import boost_multiplier
from adaptive_optax.grad_norm import GradNormState, global_norm
from adaptive_optax.lookahead import NO_LOOKAHEAD, Candidate, Lookahead, LookaheadState
from adaptive_optax.plateau import PlateauDetector, PlateauState, WindowEvent
from adaptive_optax.policy import InterventionPolicy, InterventionState
from adaptive_optax.rollback import NO_GUARD, NoGuard, RollbackGuard, RollbackState
from adaptive_optax.schedule_free import boost_neutral_schedule_free
from adaptive_optax.state import PlateauEscapeState, find_state, state_field
from adaptive_optax.transform import plateau_escape

__version__ = "0.1.0"

__all__ = [
    "Candidate",
    "GradNormState",
    "InterventionPolicy",
    "InterventionState",
    "Lookahead",
    "LookaheadState",
    "NO_GUARD",
    "NO_LOOKAHEAD",
    "NoGuard",
    "PlateauDetector",
    "PlateauEscapeState",
    "PlateauState",
    "RollbackGuard",
    "RollbackState",
    "WindowEvent",
    "boost_multiplier",
    "boost_neutral_schedule_free",
    "find_state",
    "global_norm",
    "plateau_escape",
    "presets",
    "state_field",
]

# What moved to adaptive_optax.segmentation: the names this package exported,
# and its modules (``adaptive_optax.losses`` etc.), so an old spelling fails
# with a pointer instead of a bare AttributeError. The seed's policies and
# mixes were renamed on the way: "seed" read as the PRNG seed, "legacy" as old code.
_MOVED = {name: name for name in (
    "History", "STRATEGIES", "SegmentationData", "UNet", "fit", "init_train_state",
    "load_dataset", "loss_components", "make_eval_step", "make_optimizer", "make_train_step",
    "mixed_loss",
    "checkpoint", "data", "loop", "losses", "metrics", "plotting", "strategies", "train", "unet",
)} | {
    "adaptive_policy": "policies.adaptive_mix_policy",
    "legacy_policy": "policies.scripted_policy",
    "SEED_MIXES": "policies.MIX_TABLE",
    "BALANCED_MIX": "policies.BALANCED_MIX",
    "DEFAULT_INITIAL_MIX": "policies.INITIAL_MIX",
}


def __getattr__(name: str):
    if name in _MOVED:
        raise AttributeError(f"adaptive_optax.{name} moved to adaptive_optax.segmentation."
                             f"{_MOVED[name]} (the segmentation application is its own package; "
                             f"the top level is the optimizer core)")
    raise AttributeError(f"module 'adaptive_optax' has no attribute {name!r}")
