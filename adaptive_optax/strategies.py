"""Named training strategies, built the same way for the demo, benchmarks and notebooks.

Every strategy is a :func:`adaptive_optax.plateau_escape` around the same
inner optimizer, so every run has the same state fields (learning rate, loss
weights, plateau state) and differs only in what happens on a plateau:

=====================  ========================================================
``adaptive``           the seed's adaptive policy (grad-norm boosts, random mixes)
``adaptive-guard``     ``adaptive`` plus the rollback guard
``legacy``             the seed's old deterministic 10x / 5x / 3x interventions
``reduce-on-plateau``  ``optax.contrib.reduce_on_plateau`` chained after a
                       never-intervening ``plateau_escape`` (factor 0.1;
                       minimises, so ``mode="min"`` only)
``constant``           no interventions, constant learning rate
``cosine``             no interventions, cosine decay over the run
``sgdr``               no interventions, SGDR warm restarts (4 cycles)
=====================  ========================================================
"""

from __future__ import annotations

import optax

from adaptive_optax._validation import check_float, check_int
from adaptive_optax.policy import InterventionPolicy, adaptive_policy, legacy_policy
from adaptive_optax.rollback import RollbackGuard
from adaptive_optax.transform import MAX_INTERVENTIONS_BOUND, plateau_escape

STRATEGIES = ("adaptive", "adaptive-guard", "legacy", "reduce-on-plateau", "constant",
              "cosine", "sgdr")


def policy_for(strategy: str) -> InterventionPolicy:
    """The intervention policy a strategy uses (its mixes define the loss weights)."""
    return legacy_policy() if strategy == "legacy" else adaptive_policy()


def make_optimizer(
    strategy: str,
    learning_rate: float,
    *,
    total_steps: int,
    patience: int = 2,
    accumulation_steps: int = 1,
    cooldown: int = 1,
    rtol: float = 1e-4,
    max_interventions: int = 3,
    seed: int = 0,
    policy: InterventionPolicy | None = None,
    optimizer=optax.adam,
    **kwargs,
) -> optax.GradientTransformationExtraArgs:
    """Builds the optax transformation of a named strategy.

    Args:
        strategy: One of :data:`STRATEGIES`.
        learning_rate: Base (peak) learning rate.
        total_steps: Run length, for the cosine and SGDR schedules.
        patience: Plateau patience in windows.
        accumulation_steps: Steps per window (one epoch, say).
        cooldown: Windows of cooldown after an intervention.
        rtol: Relative improvement a window needs.
        max_interventions: Cap on interventions.
        seed: Seed of the mix picks.
        policy: Overrides the strategy's intervention policy.
        optimizer: The inner optax optimizer factory.
        **kwargs: More :func:`plateau_escape` options.

    Returns:
        The transformation.

    Raises:
        ValueError: If ``strategy`` is unknown, or ``mode="max"`` is asked of
            ``reduce-on-plateau``.

    Example:
        >>> tx = make_optimizer("legacy", 1e-3, total_steps=100)
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got strategy = {strategy!r}.")
    total_steps = check_int("total_steps", total_steps, 1)
    max_interventions = check_int("max_interventions", max_interventions, 0,
                                  maximum=MAX_INTERVENTIONS_BOUND)
    learning_rate = check_float("learning_rate", learning_rate, low=0.0, low_open=True)
    common = dict(patience=patience, accumulation_steps=accumulation_steps, cooldown=cooldown,
                  rtol=rtol, seed=seed, policy=policy or policy_for(strategy), optimizer=optimizer, **kwargs)
    intervening = strategy in ("adaptive", "adaptive-guard", "legacy")
    if strategy == "adaptive-guard":
        common.setdefault("rollback", RollbackGuard())
    if strategy == "reduce-on-plateau" and kwargs.get("mode", "min") != "min":
        # optax's reduce_on_plateau only minimises, and its rtol test
        # (value < (1 - rtol) * best) is wrong for a negated score.
        raise ValueError("strategy 'reduce-on-plateau' minimises the monitored value "
                         "(optax.contrib.reduce_on_plateau has no mode); got "
                         f"mode = {kwargs['mode']!r}, allowed: 'min'.")
    schedule = learning_rate
    if strategy == "cosine":
        schedule = optax.cosine_decay_schedule(learning_rate, total_steps, alpha=0.01)
    elif strategy == "sgdr":
        cycle = max(total_steps // 4, 1)
        schedule = optax.sgdr_schedule([dict(init_value=learning_rate, peak_value=learning_rate,
                                             decay_steps=cycle, warmup_steps=0, end_value=0.01 * learning_rate)] * 4)
    tx = plateau_escape(learning_rate=schedule,
                        max_interventions=max_interventions if intervening else 0, **common)
    if strategy == "reduce-on-plateau":
        # optax cuts when its count *equals* patience; ours acts on window
        # patience + 1, so the two strategies wait equally long.
        tx = optax.chain(tx, optax.contrib.reduce_on_plateau(
            factor=0.1, patience=patience + 1, cooldown=cooldown, rtol=rtol,
            atol=kwargs.get("atol", 0.0), accumulation_size=accumulation_steps))
    return tx
