"""The seed trainer's two intervention policies, with its loss mixes.

The core :class:`~adaptive_optax.InterventionPolicy` knows no loss names; the
segmentation trainer's mixes of dice, focal, variance and BCE live here:

* :func:`adaptive_mix_policy`: the seed's adaptive strategy, gradient-norm
  boosts damped x1, x0.7, x0.5, a mix picked at random from
  :data:`MIX_TABLE` at each intervention and the balanced mix at the last.
* :func:`scripted_policy`: the seed's older deterministic strategy, a fixed
  sequence of boosts and mixes (10x, 5x, 3x), kept to compare with.

Example:
    >>> adaptive_mix_policy().loss_names
    ('bce', 'dice', 'focal', 'variance')
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

from adaptive_optax.policy import InterventionPolicy

__all__ = ["BALANCED_MIX", "INITIAL_MIX", "MIX_TABLE", "adaptive_mix_policy", "scripted_policy"]

# Read-only views: a user's edit of a module constant must not change the
# defaults of every policy built after it.
MIX_TABLE: tuple[Mapping[str, float], ...] = tuple(MappingProxyType(m) for m in (
    {"dice": 0.6, "focal": 0.4, "variance": 0.0, "bce": 0.0},  # balanced
    {"dice": 0.5, "focal": 0.5, "variance": 0.0, "bce": 0.0},  # focal-heavy
    {"dice": 0.4, "focal": 0.6, "variance": 0.0, "bce": 0.0},  # very focal-heavy
    {"dice": 0.7, "focal": 0.3, "variance": 0.0, "bce": 0.0},  # dice-heavy
    {"dice": 0.5, "focal": 0.3, "variance": 0.2, "bce": 0.0},  # with variance
))
# The seed's "conservative balanced" mix of the last intervention.
BALANCED_MIX: Mapping[str, float] = MappingProxyType(
    {"dice": 0.6, "focal": 0.4, "variance": 0.0, "bce": 0.0})
# The seed never states the mix used before the first plateau; this one
# switches every component on so that each later mix is a real change.
INITIAL_MIX: Mapping[str, float] = MappingProxyType(
    {"dice": 0.4, "focal": 0.3, "variance": 0.1, "bce": 0.2})


def adaptive_mix_policy(**overrides) -> InterventionPolicy:
    """The seed's adaptive strategy: grad-norm boosts and random mixes from :data:`MIX_TABLE`.

    Args:
        **overrides: Any :class:`~adaptive_optax.InterventionPolicy` argument.

    Returns:
        The policy, with ``mixes=MIX_TABLE``, ``initial_mix=INITIAL_MIX`` and
        ``final_mix=BALANCED_MIX`` unless overridden.

    Example:
        >>> adaptive_mix_policy(damping=(1.0, 0.5)).damping
        (1.0, 0.5)
    """
    config = dict(mixes=MIX_TABLE, initial_mix=INITIAL_MIX, final_mix=BALANCED_MIX)
    config.update(overrides)
    return InterventionPolicy(**config)


def scripted_policy(**overrides) -> InterventionPolicy:
    """The seed's older deterministic strategy, for comparison.

    Intervention 1: 10x and "disable complex losses" (variance and BCE off:
    dice 0.5 / focal 0.5); 2: 5x and focal only; 3: 3x, optimizer reset and
    dice only. No gradient tracking, no damping, no randomness.

    Args:
        **overrides: Any :class:`~adaptive_optax.InterventionPolicy` argument.

    Returns:
        The policy.

    Example:
        >>> scripted_policy().fixed_boosts
        (10.0, 5.0, 3.0)
    """
    names = INITIAL_MIX.keys()
    only = lambda *on: {k: (1.0 / len(on) if k in on else 0.0) for k in names}  # noqa: E731
    config = dict(
        use_grad_norm=False,
        fixed_boosts=(10.0, 5.0, 3.0),
        damping=(1.0,),
        mixes=(only("dice", "focal"), only("focal"), only("dice")),
        initial_mix=INITIAL_MIX,
        final_mix=only("dice"),
        mix_plan=(0, 1, 2),
        avoid_repeat=False,
        reset_optimizer=(False, False, True),
    )
    config.update(overrides)
    return InterventionPolicy(**config)
