"""Named training strategies, built the same way for the demo, benchmarks and notebooks.

Every strategy is a :func:`adaptive_optax.plateau_escape` around an inner
optimizer, so every run has the same state fields (learning rate, loss
weights, plateau state) and the same train step works for all of them; the
non-intervening ones use ``max_interventions=0`` and only monitor:

=====================  ========================================================
``adaptive``           the seed's adaptive policy (``adaptive_mix_policy()``:
                       grad-norm boosts, random mixes) as the seed wrote it:
                       boosts at once, no guard
                       (:func:`adaptive_optax.presets.unguarded_options`)
``adaptive-guard``     ``adaptive`` plus ``RollbackGuard()`` (restores the
                       parameters)
``legacy``             the seed's old deterministic 10x / 5x / 3x interventions
                       (``scripted_policy()``; boosts at once, no guard)
``reduce-on-plateau``  ``optax.contrib.reduce_on_plateau`` chained after a
                       never-intervening ``plateau_escape`` (factor 0.1;
                       minimises, so ``mode="min"`` only)
``constant``           no interventions, constant learning rate
``cosine``             no interventions, cosine decay over the run to 1 %
``sgdr``               no interventions, SGDR warm restarts (4 cycles)
``warmup-cosine``      no interventions, ``optax.warmup_cosine_decay_schedule``:
                       linear warm-up over 5 % of the run, cosine decay to 1 %
``escape-cosine``      ``plateau_escape`` (its defaults: ramped, guarded boosts
                       of the adaptive policy) over the ``cosine`` schedule
``recommended``        ``plateau_escape`` with the options of
                       :func:`adaptive_optax.presets.recommended_options`
``recommended-``       ``recommended`` with ``rollback=RollbackGuard()``: the
``restore``            guard also restores the parameters (one parameter
                       copy in the state), not only the rate and mix; the
                       candidate fix of issue 15, not a default
``recommended-``       ``recommended`` with ``rollback=None``: the preset
``unguarded``          without its guard (what the guard buys)
``lookahead``          ``recommended`` with the preset's lookahead
                       (``recommended_options(w, lookahead=True)``:
                       ``Lookahead(early_trial_window=2)`` and
                       ``max_update_ratio=0.005``): at each
                       intervention the candidates (the policy's boost and
                       mix, no boost, x0.5, x2, the next planned mix) are
                       tried for a few steps in-graph and the best committed
                       (:mod:`adaptive_optax.lookahead`), and a slow start is
                       tried at the close of window 2; its ``update``
                       needs ``value_fn`` (``make_train_step`` passes it)
``prodigy``            no interventions, ``optax.contrib.prodigy`` (learning-
                       rate free; ``learning_rate`` is its multiplier)
``prodigy-coef``       ``prodigy`` at its default multiplier (1), with
                       ``learning_rate`` as its ``estim_lr_coef`` (the factor
                       on its step-size estimate's growth)
``schedule-free``      no interventions, ``optax.contrib.schedule_free_adamw``
                       (``schedule_free_sgd`` for ``optimizer=optax.sgd``)
                       with a constant rate after a 5 % linear warm-up;
                       evaluate :func:`eval_params`, not the raw parameters
``escape-prodigy``     ``recommended`` around ``prodigy`` (a boost multiplies
                       prodigy's estimated step size)
``escape-``            ``recommended`` around ``schedule-free`` (same warm-up;
``schedule-free``      a boost raises the rate of its ``z`` steps but not the
                       weights of its average:
                       :func:`adaptive_optax.schedule_free.boost_neutral_schedule_free`);
                       evaluate :func:`eval_params`
``lookahead-``         ``escape-schedule-free`` with the preset's lookahead
``schedule-free``      (the README's recommendation around schedule-free)
``lookahead-prodigy``  ``escape-prodigy`` with the preset's lookahead
=====================  ========================================================

Every schedule is ``learning_rate * shape(step)`` with a peak-1 shape
(:func:`schedule_shape`), so ``learning_rate`` may be a traced JAX scalar:
``jax.vmap`` over learning rates compiles one train step for a whole grid.
"""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from adaptive_optax import presets
from adaptive_optax._validation import check_float, check_int
from adaptive_optax.policy import InterventionPolicy
from adaptive_optax.rollback import RollbackGuard
from adaptive_optax.schedule_free import boost_neutral_schedule_free
from adaptive_optax.segmentation.policies import adaptive_mix_policy, scripted_policy
from adaptive_optax.state import find_state
from adaptive_optax.transform import MAX_INTERVENTIONS_BOUND, plateau_escape

STRATEGIES = ("adaptive", "adaptive-guard", "legacy", "reduce-on-plateau", "constant",
              "cosine", "sgdr", "warmup-cosine", "escape-cosine", "recommended",
              "recommended-restore", "recommended-unguarded", "lookahead", "prodigy",
              "prodigy-coef", "schedule-free", "escape-prodigy", "escape-schedule-free",
              "lookahead-schedule-free", "lookahead-prodigy")

# The strategies that reproduce the seed's rules (an immediate boost; see presets.unguarded_options).
_SEED_RULES = ("adaptive", "adaptive-guard", "legacy")
# The strategies whose plateau_escape intervenes; the others get max_interventions=0.
INTERVENING = ("adaptive", "adaptive-guard", "legacy", "escape-cosine", "recommended",
               "recommended-restore", "recommended-unguarded", "lookahead", "escape-prodigy",
               "escape-schedule-free", "lookahead-schedule-free", "lookahead-prodigy")
# The strategies that wrap a learning-rate-free or schedule-free optimizer with the preset.
_ESCAPE_WRAPPED = {"escape-prodigy": "prodigy", "escape-schedule-free": "schedule-free",
                   "lookahead-schedule-free": "schedule-free", "lookahead-prodigy": "prodigy"}
# The strategies that try each intervention first (the preset's lookahead).
LOOKAHEAD = ("lookahead", "lookahead-schedule-free", "lookahead-prodigy")
# The strategies that evaluate schedule-free's averaged parameters (eval_params).
SCHEDULE_FREE = ("schedule-free", "escape-schedule-free", "lookahead-schedule-free")
# The strategies whose learning_rate is one of prodigy's factors on its own estimate (the
# multiplier; for prodigy-coef its estim_lr_coef), not a rate.
RATE_FREE = ("prodigy", "prodigy-coef", "escape-prodigy", "lookahead-prodigy")
PRODIGY_DEFAULT_MULTIPLIER = 1.0  # optax.contrib.prodigy's learning_rate default
# The strategies built on presets.recommended_options (recommended-restore swaps its guard,
# recommended-unguarded drops it).
RECOMMENDED = ("recommended", "recommended-restore", "recommended-unguarded")
# The lookahead strategy's trials: the preset's, the defaults of Lookahead (design.md item 23).
DEFAULT_LOOKAHEAD = presets.recommended_options(1, lookahead=True)["lookahead"]


# plateau_escape options that make_optimizer sets unless the caller (or, for
# "recommended", the preset) does.
DEFAULT_OPTIONS = MappingProxyType(dict(patience=2, accumulation_steps=1, cooldown=1, rtol=1e-4,
                                        max_interventions=3, seed=0))

# make_optimizer's options that are plateau_escape's own; the others are the inner optimizer's.
_ESCAPE_OPTIONS = frozenset(inspect.signature(plateau_escape).parameters) - {
    "optimizer", "learning_rate", "optimizer_kwargs"}

WARMUP_FRACTION = 0.05  # warm-up of warmup-cosine and schedule-free, a fraction of the run
END_FRACTION = 0.01  # the decayed schedules end at this fraction of the peak
SGDR_CYCLES = 4

# schedule-free replaces the inner optimizer's momentum by its own averaging:
# optax ships a schedule-free variant of these two.
_SCHEDULE_FREE = {optax.adam: optax.contrib.schedule_free_adamw,
                  optax.adamw: optax.contrib.schedule_free_adamw,
                  optax.sgd: optax.contrib.schedule_free_sgd}


def learning_rate_for(strategy: str, learning_rate: float) -> float:
    """The ``learning_rate`` to build ``strategy`` with when a run names one base rate.

    A rate-free strategy (:data:`RATE_FREE`) takes prodigy's default
    multiplier instead: a rate such as 1e-3 given to prodigy would scale its
    estimated step size by 1e-3 and stall it.

    Example:
        >>> learning_rate_for("constant", 1e-3), learning_rate_for("prodigy", 1e-3)
        (0.001, 1.0)
    """
    return PRODIGY_DEFAULT_MULTIPLIER if strategy in RATE_FREE else learning_rate


def policy_for(strategy: str) -> InterventionPolicy:
    """The intervention policy a strategy uses (its mixes define the loss weights)."""
    return scripted_policy() if strategy == "legacy" else adaptive_mix_policy()


def schedule_shape(strategy: str, total_steps: int) -> Callable[[jax.Array], jax.Array]:
    """The strategy's learning-rate schedule for a peak rate of 1.

    The rate at step ``t`` is ``learning_rate * schedule_shape(strategy, T)(t)``;
    strategies without a schedule get the constant 1.

    Args:
        strategy: One of :data:`STRATEGIES`.
        total_steps: Run length ``T >= 1``.

    Returns:
        A schedule ``step -> float32 scalar``.

    Example:
        >>> round(float(schedule_shape("cosine", 100)(100)), 6)
        0.01
    """
    total_steps = check_int("total_steps", total_steps, 1)
    # optax's warm-ups need >= 1 step and leave >= 1 for what follows.
    warmup = min(max(1, round(WARMUP_FRACTION * total_steps)), total_steps - 1)
    if strategy in ("cosine", "escape-cosine"):
        return optax.cosine_decay_schedule(1.0, total_steps, alpha=END_FRACTION)
    if strategy == "warmup-cosine" and warmup > 0:
        return optax.warmup_cosine_decay_schedule(0.0, 1.0, warmup, total_steps,
                                                  end_value=END_FRACTION)
    if strategy == "warmup-cosine":  # a one-step run
        return optax.cosine_decay_schedule(1.0, total_steps, alpha=END_FRACTION)
    if strategy == "sgdr":
        cycle = max(total_steps // SGDR_CYCLES, 1)
        return optax.sgdr_schedule([dict(init_value=1.0, peak_value=1.0, decay_steps=cycle,
                                         warmup_steps=0, end_value=END_FRACTION)] * SGDR_CYCLES)
    if strategy in SCHEDULE_FREE and warmup > 0:
        return optax.warmup_constant_schedule(0.0, 1.0, warmup)
    return optax.constant_schedule(1.0)


def _check_learning_rate(learning_rate) -> float | jax.Array:
    """A concrete rate as a checked float; a traced scalar as is (it has no value yet)."""
    if isinstance(learning_rate, jax.core.Tracer):
        if learning_rate.shape != () or not jnp.issubdtype(learning_rate.dtype, jnp.floating):
            raise ValueError("learning_rate must be a float > 0 or a traced float scalar, got "
                             f"a traced {learning_rate.dtype} array of shape "
                             f"{learning_rate.shape}.")
        return learning_rate
    # A concrete 0-d float array (jnp.float32(1e-3)) counts as a float, as in optax.
    if (isinstance(learning_rate, (jax.Array, np.ndarray)) and learning_rate.shape == ()
            and np.issubdtype(learning_rate.dtype, np.floating)):
        learning_rate = float(learning_rate)
    return check_float("learning_rate", learning_rate, low=0.0, high=math.inf,
                       low_open=True, high_open=True)


def _inner_optimizer(strategy: str, optimizer) -> Callable[..., optax.GradientTransformation]:
    """The factory that plateau_escape wraps: ``optimizer``, or the strategy's own."""
    kind = _ESCAPE_WRAPPED.get(strategy, strategy)
    if kind in ("prodigy", "prodigy-coef"):
        if optimizer is not optax.adam:
            raise ValueError(f"strategy {strategy!r} is optax.contrib.prodigy, an Adam-type "
                             "optimizer of its own; leave optimizer at its default optax.adam, "
                             f"got optimizer = {optimizer!r}.")
        return optax.contrib.prodigy
    if kind == "schedule-free":
        factory = _SCHEDULE_FREE.get(optimizer) if callable(optimizer) else None
        if factory is None:
            raise ValueError(f"strategy {strategy!r} has optax variants of optax.adam, "
                             "optax.adamw and optax.sgd only; got "
                             f"optimizer = {optimizer!r}, allowed: {list(_SCHEDULE_FREE)}.")
        return factory
    return optimizer


def _options(strategy: str, options: dict[str, Any]) -> dict[str, Any]:
    """:data:`DEFAULT_OPTIONS`, then the preset of ``recommended``, then the caller's."""
    merged = dict(DEFAULT_OPTIONS)
    if strategy in RECOMMENDED or strategy in LOOKAHEAD or strategy in _ESCAPE_WRAPPED:
        accumulation = options.get("accumulation_steps", merged["accumulation_steps"])
        merged.update(presets.recommended_options(accumulation,
                                                  lookahead=strategy in LOOKAHEAD))
    if strategy == "recommended-restore":  # the preset's guard, restoring the parameters too
        merged["rollback"] = RollbackGuard()
    if strategy == "recommended-unguarded":
        merged["rollback"] = None
    if strategy in _SEED_RULES:  # the seed's interventions as written: at once, unguarded
        merged.update(presets.unguarded_options())
    if strategy == "adaptive-guard":
        merged["rollback"] = RollbackGuard()
    merged.update({k: v for k, v in options.items() if not (k == "policy" and v is None)})
    if merged.get("policy") is None:
        merged["policy"] = policy_for(strategy)
    return merged


def _split_options(options: dict[str, Any], optimizer_kwargs: Mapping[str, Any] | None,
                   ) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """``(plateau_escape's options, the inner optimizer's keywords)`` of make_optimizer's."""
    escape = {k: v for k, v in options.items() if k in _ESCAPE_OPTIONS}
    loose = {k: v for k, v in options.items() if k not in _ESCAPE_OPTIONS}
    if not loose:
        return escape, optimizer_kwargs  # plateau_escape checks it
    if optimizer_kwargs is None:
        return escape, loose
    if not isinstance(optimizer_kwargs, Mapping):
        raise TypeError("optimizer_kwargs must be a mapping from the optimizer's keyword names "
                        f"to their values or None, got optimizer_kwargs = {optimizer_kwargs!r}.")
    both = sorted(set(loose) & set(optimizer_kwargs))
    if both:
        raise TypeError(f"make_optimizer got {both} both as options and in optimizer_kwargs; "
                        "pass each once.")
    return escape, {**loose, **optimizer_kwargs}


def make_optimizer(
    strategy: str,
    learning_rate: float | jax.Array,
    *,
    total_steps: int,
    optimizer=optax.adam,
    optimizer_kwargs: Mapping[str, Any] | None = None,
    **options,
) -> optax.GradientTransformationExtraArgs:
    """Builds the optax transformation of a named strategy.

    Args:
        strategy: One of :data:`STRATEGIES`.
        learning_rate: Base (peak) learning rate, a float > 0 or a traced JAX
            float scalar (inside ``jax.jit``/``jax.vmap``: only a concrete
            value is checked). For ``prodigy`` it is prodigy's
            ``learning_rate``, the multiplier of its estimated step size
            (1.0 is prodigy's default). For ``prodigy-coef`` it is prodigy's
            ``estim_lr_coef`` (the factor on its estimate's growth; 1.0 is
            the default), at the default multiplier 1.0; it may be traced
            too (prodigy uses it only in arithmetic).
        total_steps: Run length, for the schedules (``>= 1``).
        optimizer: The inner optax optimizer factory. ``prodigy`` takes none
            (leave the default); ``schedule-free`` maps ``optax.adam`` or
            ``optax.adamw`` to ``schedule_free_adamw`` and ``optax.sgd`` to
            ``schedule_free_sgd`` (give it no ``momentum``: ``b1`` averages).
        optimizer_kwargs: The inner optimizer's keywords, as for
            :func:`plateau_escape`; needed only for a name that is also a
            ``plateau_escape`` option (``seed`` of ``optax.noisy_sgd``).
        **options: :func:`plateau_escape` options and the inner optimizer's
            keywords (``momentum=0.9`` for ``optax.sgd``, say): a name that
            is a ``plateau_escape`` parameter goes to it, any other joins
            ``optimizer_kwargs``. Unset options take :data:`DEFAULT_OPTIONS`
            (patience 2, accumulation_steps 1, cooldown 1, rtol 1e-4,
            max_interventions 3, seed 0); for the strategies built on the
            preset (``recommended``, ``recommended-restore``, ``lookahead``,
            ``escape-prodigy``, ``escape-schedule-free``,
            ``lookahead-schedule-free``, ``lookahead-prodigy``) its options come
            between the defaults and yours. ``policy=None`` is the strategy's policy
            (:func:`policy_for`). The non-intervening strategies always get
            ``max_interventions=0``.

    Returns:
        The transformation; its state holds a plateau-escape state.

    Raises:
        ValueError: If ``strategy`` is unknown, an argument is out of range,
            ``mode="max"`` is asked of ``reduce-on-plateau``, or
            ``optimizer`` does not fit ``prodigy``/``schedule-free``; the
            message names the argument.
        TypeError: If a number has the wrong type, or a keyword is given
            both in ``options`` and in ``optimizer_kwargs``.

    Example:
        >>> tx = make_optimizer("legacy", 1e-3, total_steps=100)
        >>> tx = make_optimizer("constant", 0.1, total_steps=100, optimizer=optax.sgd,
        ...                     momentum=0.9)
    """
    if not isinstance(strategy, str) or strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got strategy = {strategy!r}.")
    total_steps = check_int("total_steps", total_steps, 1)
    learning_rate = _check_learning_rate(learning_rate)
    inner = _inner_optimizer(strategy, optimizer)
    options, optimizer_kwargs = _split_options(options, optimizer_kwargs)
    if strategy == "prodigy-coef":
        optimizer_kwargs = dict(optimizer_kwargs or {})
        if "estim_lr_coef" in optimizer_kwargs:
            raise TypeError("strategy 'prodigy-coef' takes its estim_lr_coef as learning_rate; "
                            "do not pass estim_lr_coef too.")
        # prodigy uses estim_lr_coef only in arithmetic, so a traced grid value works as is.
        optimizer_kwargs["estim_lr_coef"] = learning_rate
        learning_rate = PRODIGY_DEFAULT_MULTIPLIER
    options = _options(strategy, options)
    options["max_interventions"] = check_int(
        "max_interventions", options["max_interventions"], 0, maximum=MAX_INTERVENTIONS_BOUND)
    if strategy not in INTERVENING:
        options["max_interventions"] = 0
    if strategy == "reduce-on-plateau" and options.get("mode", "min") != "min":
        # optax's reduce_on_plateau only minimises, and its rtol test
        # (value < (1 - rtol) * best) is wrong for a negated score.
        raise ValueError("strategy 'reduce-on-plateau' minimises the monitored value "
                         "(optax.contrib.reduce_on_plateau has no mode); got "
                         f"mode = {options['mode']!r}, allowed: 'min'.")
    shape = schedule_shape(strategy, total_steps)
    # A closure over the rate, not optax's schedule(peak) builders: those test
    # the peak in Python (warmup_cosine_decay_schedule's `peak_value == 0`),
    # which a traced rate cannot answer.
    def base(step):
        return learning_rate * shape(step)

    if strategy in SCHEDULE_FREE and strategy in INTERVENING:
        # Boosts drive z's steps but not the average's weights (adaptive_optax.schedule_free).
        inner = boost_neutral_schedule_free(
            base, "sgd" if inner is optax.contrib.schedule_free_sgd else "adamw")
    tx = plateau_escape(inner, base, optimizer_kwargs=optimizer_kwargs, **options)
    if strategy == "reduce-on-plateau":
        # optax cuts when its count *equals* patience; ours acts on window
        # patience + 1, so the two strategies wait equally long.
        tx = optax.chain(tx, optax.contrib.reduce_on_plateau(
            factor=0.1, patience=options["patience"] + 1, cooldown=options["cooldown"],
            rtol=options["rtol"], atol=options.get("atol", 0.0),
            accumulation_size=options["accumulation_steps"]))
    return tx


def eval_params_for(strategy: str) -> Callable[[optax.OptState, Any], Any] | None:
    """``make_eval_step``'s ``eval_params`` for ``strategy``: ``None`` unless the
    strategy evaluates other parameters than it trains (``schedule-free``).

    Example:
        >>> eval_params_for("constant") is None, eval_params_for("schedule-free") is None
        (True, False)
    """
    if not isinstance(strategy, str) or strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got strategy = {strategy!r}.")
    if strategy not in SCHEDULE_FREE:
        return None
    return functools.partial(eval_params, strategy)


def eval_params(strategy: str, opt_state: optax.OptState, params):
    """The parameters to evaluate a strategy's model with.

    Schedule-free trains at the interpolated point ``y`` and evaluates at the
    average ``x`` (``optax.contrib.schedule_free_eval_params`` of its inner
    state, found inside the plateau-escape state); every other strategy
    evaluates ``params`` as they are.

    Args:
        strategy: One of :data:`STRATEGIES`.
        opt_state: The optimizer state of :func:`make_optimizer`'s
            transformation (or one holding it, ``nnx.pure(optimizer.opt_state)``).
        params: The parameters that state was updated with.

    Returns:
        A pytree like ``params``.

    Raises:
        ValueError: If ``strategy`` is unknown, or is ``schedule-free`` and
            ``opt_state`` holds no schedule-free state.

    Example:
        >>> tx = make_optimizer("schedule-free", 1e-3, total_steps=10)
        >>> params = {"w": jnp.ones(2)}
        >>> eval_params("schedule-free", tx.init(params), params)["w"].tolist()
        [1.0, 1.0]
    """
    if not isinstance(strategy, str) or strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got strategy = {strategy!r}.")
    if strategy not in SCHEDULE_FREE:
        return params
    inner = optax.tree.get(find_state(opt_state).optimizer_state, "ScheduleFreeState")
    if inner is None:
        raise ValueError(f"eval_params({strategy!r}, ...) needs the state of "
                         f"make_optimizer({strategy!r}, ...): opt_state holds no "
                         "ScheduleFreeState.")
    return optax.contrib.schedule_free_eval_params(inner, params)
