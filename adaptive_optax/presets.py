"""Named option sets for :func:`~adaptive_optax.plateau_escape`.

* :func:`recommended_options`: what README tells users to start with. These
  are ``plateau_escape``'s own defaults, spelled out: each boost ramps in over
  one window, and the default guard reverts a boost whose monitored value
  turns worse within steps. Chosen so that a run that has already converged at a
  good rate is not wrecked (docs/design.md, "First, do no harm";
  ``benchmarks/lr_grid.py``). With ``lookahead=True`` each intervention is
  first tried (``Lookahead(early_trial_window=2)``: also a slow start, before
  any plateau), for updates that can pass ``value_fn``, and each boost is
  limited by the size of the step it scales (``max_update_ratio=0.005``).
* :func:`unguarded_options`: the seed trainer's interventions as written,
  an immediate boost and no guard. Kept to compare with, and for the tests of
  the seed's rules.

Example:
    >>> import optax
    >>> from adaptive_optax import plateau_escape
    >>> tx = plateau_escape(optax.adam, 1e-3, **unguarded_options())
"""

from __future__ import annotations

from typing import Any

from adaptive_optax._validation import check_int
from adaptive_optax.lookahead import Lookahead
from adaptive_optax.rollback import RollbackGuard

__all__ = ["EARLY_TRIAL_WINDOW", "MAX_UPDATE_RATIO", "recommended_options", "unguarded_options"]

# The preset's lookahead also tries a slow start at the close of window 2, the
# first window with a best to compare with (docs/benchmarks.md, "early trial").
EARLY_TRIAL_WINDOW = 2
# ... and limits each boost so that the inner step stays within 0.5% of the
# weights' norm (adaptive_optax.boost_limit; docs/benchmarks.md, "the
# update-ratio limit"): it removes the boosts that blew up runs near their
# stability limit, and leaves those of runs at rates that are too low.
MAX_UPDATE_RATIO = 0.005


def recommended_options(accumulation_steps: int, *, lookahead: bool = False) -> dict[str, Any]:
    """``plateau_escape`` keyword options of the recommended configuration.

    Args:
        accumulation_steps: Steps per plateau window (one epoch, say).
        lookahead: Also try each intervention before committing it
            (``lookahead=Lookahead(early_trial_window=2)``: the default
            candidates, 4-step trials, and a trial at the close of window 2
            when the run starts slowly, a rate too low to ever plateau). The
            update then needs ``value_fn(params, loss_weights) -> (loss,
            monitored)``; ``make_train_step`` passes it. On the
            learning-rate grid the trials keep post-intervention jumps below
            1.5x on the tuning sets where the plain preset's reach 1.9x, and
            the early trial rescues stalling SGD rates (docs/benchmarks.md).
            It also sets ``max_update_ratio=MAX_UPDATE_RATIO``: no boost
            takes the inner step past 0.5% of the weights' norm (a step
            that large is near the rate's stability limit).

    Returns:
        A dict of keyword arguments for :func:`adaptive_optax.plateau_escape`
        (``accumulation_steps`` included); callers may override any of them.

    Raises:
        ValueError: If ``accumulation_steps`` is not an integer >= 1.
        TypeError: If ``lookahead`` is not a bool.

    Example:
        >>> options = recommended_options(10)
        >>> options["boost_warmup_steps"], options["rollback"].restore_params
        (10, False)
        >>> la = recommended_options(10, lookahead=True)["lookahead"]
        >>> la.steps, la.early_trial_window
        (4, 2)
        >>> recommended_options(10, lookahead=True)["max_update_ratio"]
        0.005
    """
    accumulation_steps = check_int("accumulation_steps", accumulation_steps, 1)
    if not isinstance(lookahead, bool):
        raise TypeError(f"lookahead must be True or False, got lookahead = {lookahead!r}.")
    options = dict(accumulation_steps=accumulation_steps, boost_warmup_steps=accumulation_steps,
                   rollback=RollbackGuard(restore_params=False))
    if lookahead:
        options["lookahead"] = Lookahead(early_trial_window=EARLY_TRIAL_WINDOW)
        options["max_update_ratio"] = MAX_UPDATE_RATIO
    return options


def unguarded_options() -> dict[str, Any]:
    """The seed's interventions as written: the boost at once, no guard.

    Returns:
        ``dict(boost_warmup_steps=0, rollback=None)``, to pass to
        :func:`adaptive_optax.plateau_escape` with any policy.

    Example:
        >>> unguarded_options()
        {'boost_warmup_steps': 0, 'rollback': None}
    """
    return dict(boost_warmup_steps=0, rollback=None)
