"""Lookahead: choose the intervention by trying it.

At a plateau the policy's decision (its boost from the gradient-norm bins,
its planned mix) is the prior. With ``plateau_escape(..., lookahead=Lookahead())``
the update first tries ``K`` candidate interventions for ``steps`` steps of the
inner optimizer, from the current parameters and optimizer state, inside the
same jitted update, and commits the candidate whose monitored value is best
after its trial. The trials' parameters and optimizer states are discarded:
the real step then proceeds with the chosen boost and mix.

* **Candidates** are :class:`Candidate` specs, relative to the decision: a
  factor on the policy's ``boost - 1``, or a cut of the rate in force
  (``Candidate(cut=0.3)``: 0.3 times the multiplier in force, so cuts
  compound like ``optax.contrib.reduce_on_plateau``'s), and a mix (the
  policy's, the current one, the next planned one, or a row of the mix
  table). The default is the policy's choice, no boost (the base rate and
  the current mix), half and twice the policy's boost, and the policy's
  boost with the next planned mix.
  The first candidate is the incumbent: another one replaces it only when its
  trial value is better by more than ``rtol * |incumbent| + atol``.
* **The trial** follows what committing would do: the rate at trial step ``t``
  is the one the run would take ``t`` steps after the intervention (base
  schedule, the boost's warm-up ramp, ``max_learning_rate``; with
  ``ramp=False`` the full boost from the first step), injected with
  ``with_learning_rate``; gradients come from ``value_fn``. It starts from the
  inner state the committed step uses: the current one, re-initialised when
  the policy resets the optimizer at this intervention. A candidate whose
  value after the trial is NaN/Inf is disqualified; if all are, the step falls
  back to no boost. Trials diverging to NaN never reach the parameters or the
  optimizer state; only the record holds their values.
* **Evaluation** follows optax's line-search convention: the update receives
  ``value_fn(params, loss_weights) -> (loss_to_optimise, monitored_value)``,
  evaluated on whatever batch the caller closes it over (the probe batch; the
  current batch in :func:`~adaptive_optax.segmentation.train.make_train_step`).
  Trials on the batch they are scored on favour the candidate that fits that
  batch best, which on a single batch rewards memorising it; a held-out probe
  batch scores generalisation instead. The monitored value should not depend on the
  loss weights (a fixed-weight reference loss) when candidates differ in mix,
  or a mix with smaller weights wins by its scale.
* **Cost**: the trials run under ``jax.lax.cond(intervene, ...)`` on every
  backend, so a step off a plateau pays one predicate (on GPU/TPU read by the
  host). At a plateau: ``K * steps`` forward and backward passes and ``K``
  forward passes, vectorised with ``jax.vmap`` (``memory="vmap"``: ``K``
  parameter and optimizer-state copies at once) or one candidate at a time
  with ``jax.lax.map`` (``memory="map"``). The default ``"auto"`` maps on CPU,
  where a vmapped convolution with per-candidate kernels becomes a grouped
  convolution (several times slower on XLA:CPU), and vmaps elsewhere. Candidates that are the same for
  the policy (the mix specs of a policy with a single mix) are tried once.
* **Early trial** (``early_trial_window``): a rate that is too low improves
  slowly but steadily, so its run never plateaus and no trial ever runs.
  With ``early_trial_window=w``, the trial also runs at the close of plateau
  window ``w`` when no intervention has happened yet and that window's mean
  beat the best before it, but by less than ``early_trial_progress``
  (relative): a slow start. A window that did not improve is not one: a rate
  that is too high makes the loss rise or stall, and a boost would not help.
  The trial asks whether a boost is faster than the rate as it is: the
  candidates take their full boost from the first trial step (a ramp's first
  few steps barely separate them), and the incumbent is :data:`NO_BOOST`. A
  winning boost is committed as an intervention (counted, and watched by the
  rollback guard); a win of "no boost" changes nothing, and an early trial
  never resets the optimizer. A run that starts fast is left alone: at good
  rates, a boost that a 4-step trial accepts this early can leave the run
  stuck for good (docs/benchmarks.md, "the early trial").
* **Data parallel**: with ``batch_axis_name``, the trial's gradients and values
  are ``jax.lax.pmean``-averaged over that axis (like
  ``optax.contrib.sam``'s), so every device runs the same trials and takes the
  same decision.

Short-horizon bias (Wu et al., "Understanding Short-Horizon Bias in
Stochastic Meta-Optimization", ICLR 2018): a greedy few-step trial favours
small rates, since a bigger boost often raises the loss first and pays off
later. Against it: the incumbent margin (``rtol``), trials that follow the
ramp over several steps, and the rollback guard, which stays the long-horizon
safety net.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Callable, Hashable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from adaptive_optax._validation import check_bool, check_float, check_int
from adaptive_optax.inner_optimizer import reset_where, with_learning_rate
from adaptive_optax.policy import Decision

__all__ = ["DEFAULT_CANDIDATES", "NO_BOOST", "NO_LOOKAHEAD", "POLICY_CHOICE", "Candidate",
           "Lookahead", "LookaheadState", "NoLookahead"]

_MIX_WORDS = ("policy", "current", "next")
_MEMORY = ("auto", "vmap", "map")
MAX_TRIAL_STEPS = 10_000
MAX_CANDIDATES = 64
MAX_BOOST_SCALE = 1e3
MAX_EARLY_TRIAL_WINDOW = 1_000_000
# trial_choice: before any trial, and when every candidate was non-finite.
NO_TRIAL, ALL_NONFINITE = -1, -2


class LookaheadState(NamedTuple):
    """The record of the latest trial (kept until the next one)."""

    trial_values: jax.Array  # float32 [K], monitored value after each candidate's trial (NaN before any)
    trial_curves: jax.Array  # float32 [K, steps + 1], monitored value at trial steps 0..steps
    trial_choice: jax.Array  # int32 [], committed candidate; -1 before any trial, -2 all non-finite


@dataclasses.dataclass(frozen=True)
class Candidate:
    """One candidate intervention, relative to the policy's decision.

    Args:
        boost_scale: Factor on the policy's ``boost - 1``: the candidate's
            boost is ``1 + boost_scale * (boost - 1)``; 0 is no boost (the
            base rate), 1 the policy's boost, 2 twice its excess over the
            base. A factor on ``boost - 1`` rather than on the boost keeps
            every candidate on the line through "no boost" and the policy's
            choice, the same scale the rollback guard's ``shrink`` uses: half
            of a 1.5x boost is 1.25x, not a rate cut to 0.75x. A boost below
            1 scaled past 1 is floored at the smallest float32 normal (never
            a negative rate).
        mix: ``"policy"`` (the decision's mix), ``"current"`` (the mix in
            use), ``"next"`` (the mix the plan holds for the intervention
            after this one) or a row index of the policy's ``all_mixes``.
        cut: ``None`` (default), or a factor in ``(0, 1]`` on the multiplier
            in force: the candidate cuts the rate instead of boosting it
            (``boost_scale`` must then stay 1). It is relative to the rate
            in force, not to the base, so repeated cuts compound (0.3, then
            0.09) as ``optax.contrib.reduce_on_plateau``'s do, while a boost
            is always relative to the base. ``cut=1`` holds the rate in force.
            A boost cannot rescue a rate that is too high; a cut can, and a
            trial tells the two apart: where the rate is stable the trial's
            few steps favour the larger rate, where it is not they favour the cut.

    Raises:
        ValueError: If ``boost_scale`` is outside ``[0, 1000]``, ``cut``
            outside ``(0, 1]``, both are given, or ``mix`` is not one of these.

    Example:
        >>> Candidate(0.5).boost_scale, Candidate(0.5).mix
        (0.5, 'policy')
        >>> Candidate(cut=0.3).label
        'cut x0.3'
    """

    boost_scale: float = 1.0
    mix: str | int = "policy"
    cut: float | None = None

    def __post_init__(self):
        object.__setattr__(self, "boost_scale", check_float(
            "boost_scale", self.boost_scale, low=0.0, high=MAX_BOOST_SCALE))
        if self.cut is not None:
            object.__setattr__(self, "cut", check_float("cut", self.cut, low=0.0, high=1.0,
                                                        low_open=True))
            if self.boost_scale != 1.0:
                raise ValueError("a candidate either boosts (boost_scale) or cuts (cut), got "
                                 f"boost_scale = {self.boost_scale!r} and cut = {self.cut!r}; "
                                 "leave boost_scale at 1 with a cut.")
        if isinstance(self.mix, str):
            if self.mix not in _MIX_WORDS:
                raise ValueError(f"mix must be one of {_MIX_WORDS} or a row index of the "
                                 f"policy's all_mixes, got mix = {self.mix!r}.")
        elif (isinstance(self.mix, (bool, np.bool_)) or not isinstance(self.mix, numbers.Integral)
              or self.mix < 0):
            raise ValueError(f"mix must be one of {_MIX_WORDS} or a row index (an int >= 0) of "
                             f"the policy's all_mixes, got mix = {self.mix!r}.")

    @property
    def label(self) -> str:
        """A short name for logs and tables.

        ``"policy"`` (the policy's choice), ``"no boost"``, ``"x<scale>"`` for
        another boost with the policy's mix, ``"cut x<factor>"`` for a cut
        (``"hold"`` for ``cut=1``), with the mix appended when it is not the
        policy's (``"x1 next"``, ``"x0.5 mix 2"``; ``"no boost"`` already
        means the current mix).

        Example:
            >>> [c.label for c in DEFAULT_CANDIDATES]
            ['policy', 'no boost', 'x0.5', 'x2', 'x1 next']
        """
        if self.cut is not None:
            name = "hold" if self.cut == 1.0 else f"cut x{self.cut:g}"
        elif self.boost_scale == 1.0 and self.mix == "policy":
            return "policy"
        else:
            name = "no boost" if self.boost_scale == 0.0 else f"x{self.boost_scale:g}"
        if self.mix == "policy" or (name == "no boost" and self.mix == "current"):
            return name
        return f"{name} {self.mix}" if isinstance(self.mix, str) else f"{name} mix {self.mix}"

    def boost(self, policy_boost: jax.Array, multiplier: jax.Array | float = 1.0) -> jax.Array:
        """This candidate's boost (exact at scale 0 and 1).

        Args:
            policy_boost: The policy's boost, a multiplier on the base rate.
            multiplier: The multiplier in force before the intervention (what a cut cuts).

        Returns:
            A float32 scalar multiplier on the base rate.
        """
        if self.cut is not None:
            cut = jnp.asarray(multiplier, jnp.float32) * jnp.float32(self.cut)
            return jnp.maximum(cut, np.finfo(np.float32).tiny).astype(jnp.float32)
        if self.boost_scale == 0.0:
            return jnp.ones([], jnp.float32)
        if self.boost_scale == 1.0:
            return policy_boost
        scaled = 1.0 + jnp.float32(self.boost_scale) * (policy_boost - 1.0)
        return jnp.maximum(scaled, np.finfo(np.float32).tiny).astype(jnp.float32)


POLICY_CHOICE = Candidate(1.0, "policy")
NO_BOOST = Candidate(0.0, "current")
DEFAULT_CANDIDATES = (POLICY_CHOICE, NO_BOOST, Candidate(0.5), Candidate(2.0),
                      Candidate(1.0, "next"))


def _hashable(value) -> bool:
    """Whether ``hash(value)`` works: a tuple is ``Hashable`` even when it holds a list."""
    try:
        hash(value)
    except TypeError:
        return False
    return True


@dataclasses.dataclass(frozen=True)
class Lookahead:
    """Try candidate interventions in-graph at a plateau and commit the best.

    Args:
        steps: Trial length in inner-optimizer steps (>= 1). The default 4
            was chosen on the learning-rate grid: 1 step barely separates
            the candidates, and 33 steps trained and scored on the same
            batch favour the largest boost (docs/design.md, item 23).
        candidates: :class:`Candidate` specs (or ``(boost_scale, mix)``
            pairs), at most 64; the first is the incumbent. Default
            :data:`DEFAULT_CANDIDATES`.
        memory: ``"vmap"`` runs the ``K`` trials vectorised (``K`` parameter
            copies at once); ``"map"`` runs them one after another with
            ``jax.lax.map`` (one copy at a time); ``"auto"`` (default):
            ``"map"`` on CPU, ``"vmap"`` elsewhere (the backend the update is
            traced for).
        batch_axis_name: ``None``, or the axis name over which the trials'
            gradients and values are ``jax.lax.pmean``-averaged (data
            parallelism under ``shard_map``/``pmap``): every device takes the
            same decision.
        rtol: Relative margin by which a candidate must beat the incumbent
            (``candidates[0]``) to replace it, ``>= 0``: a counter to the
            trials' short-horizon bias towards small rates.
        atol: Absolute margin, ``>= 0``.
        ramp: ``True`` (default): a trial follows the boost's warm-up ramp,
            the rates the first ``steps`` steps after committing would take.
            ``False``: a trial takes each candidate's boost at once, the rate
            the ramp ends at: with a ramp of one window, a 4-step trial then
            tests the rate the run would hold, not the first few percent of
            the way to it (a sharper test of whether that rate is stable, and
            a stronger short-horizon bias against boosts). Without a ramp
            (``boost_warmup_steps=0``) both are the same.
        early_trial_window: ``None`` (default): trials run at plateaus only.
            An int ``w >= 2``: also at the close of plateau window ``w``
            (window 1 has no best to compare with) when no intervention has
            happened yet and the window improved, by less than
            ``early_trial_progress``: the candidates at their full boost
            against :data:`NO_BOOST`, which must be among ``candidates``
            (see "Early trial" above).
        early_trial_progress: The early trial runs when window
            ``early_trial_window``'s mean beats the best before it by less than
            this fraction of that best, in ``(0, 1]`` (``1``: whenever the
            window improved at all); default 0.1, chosen on the
            learning-rate grid with windows of 1/30 of the run
            (docs/benchmarks.md).

    Raises:
        ValueError: If an argument is out of range; the message names it.
        TypeError: If ``steps`` is not an integer.

    Example:
        >>> la = Lookahead(steps=2, candidates=((1.0, "policy"), (0.0, "current")))
        >>> la.init().trial_values.shape
        (2,)
    """

    steps: int = 4
    candidates: Sequence[Candidate] = DEFAULT_CANDIDATES
    memory: str = "auto"
    batch_axis_name: Hashable | None = None
    rtol: float = 0.0
    atol: float = 0.0
    ramp: bool = True
    early_trial_window: int | None = None
    early_trial_progress: float = 0.1

    def __post_init__(self):
        check_int("steps", self.steps, minimum=1, maximum=MAX_TRIAL_STEPS)
        candidates = self.candidates
        if isinstance(candidates, (str, bytes, Candidate)) or not isinstance(candidates, Sequence) \
                or not 1 <= len(candidates) <= MAX_CANDIDATES:
            raise ValueError(f"candidates must be a sequence of 1 to {MAX_CANDIDATES} Candidate "
                             f"specs or (boost_scale, mix) pairs, got candidates = {candidates!r}.")
        specs = []
        for i, c in enumerate(candidates):
            if isinstance(c, Candidate):
                specs.append(c)
            elif isinstance(c, tuple) and len(c) == 2:
                try:
                    specs.append(Candidate(*c))
                except (TypeError, ValueError) as err:
                    raise ValueError(f"candidates[{i}]: {err}") from None
            else:
                raise ValueError(f"candidates[{i}] must be a Candidate or a (boost_scale, mix) "
                                 f"pair, got {c!r}.")
        object.__setattr__(self, "candidates", tuple(specs))
        # A string, not an array: `np.array("map") in _MEMORY` compares elementwise.
        if not isinstance(self.memory, str) or self.memory not in _MEMORY:
            raise ValueError(f"memory must be one of {_MEMORY}, got memory = {self.memory!r}.")
        if self.batch_axis_name is not None and not _hashable(self.batch_axis_name):
            raise ValueError("batch_axis_name must be None or an axis name (hashable), got "
                             f"batch_axis_name = {self.batch_axis_name!r}.")
        check_float("rtol", self.rtol, low=0.0, high=math.inf, high_open=True)
        check_float("atol", self.atol, low=0.0, high=math.inf, high_open=True)
        check_bool("ramp", self.ramp)
        if self.early_trial_window is not None:
            check_int("early_trial_window", self.early_trial_window, minimum=2,
                      maximum=MAX_EARLY_TRIAL_WINDOW)
            if NO_BOOST not in self.candidates:
                raise ValueError(
                    "early_trial_window needs NO_BOOST, Candidate(0.0, 'current'), among the "
                    "candidates: an early trial keeps the rate as it is unless a boost beats it; "
                    f"got candidates = {self.candidates!r}.")
        check_float("early_trial_progress", self.early_trial_progress, low=0.0, high=1.0,
                    low_open=True)

    @property
    def early_incumbent(self) -> int:
        """The index of :data:`NO_BOOST` among the candidates (an early trial's incumbent).

        Raises:
            ValueError: If there is no early trial (``early_trial_window`` is None).
        """
        if self.early_trial_window is None:
            raise ValueError("early_incumbent is defined only with early_trial_window set.")
        return self.candidates.index(NO_BOOST)

    def init(self) -> LookaheadState:
        """The record before any trial: NaN values and choice -1."""
        k = len(self.candidates)
        return LookaheadState(
            trial_values=jnp.full([k], jnp.nan, jnp.float32),
            trial_curves=jnp.full([k, self.steps + 1], jnp.nan, jnp.float32),
            trial_choice=jnp.full([], NO_TRIAL, jnp.int32))

    def bind(self, *, policy, optimizer: optax.GradientTransformation, sign: float,
             max_interventions: int) -> BoundLookahead:
        """This lookahead for one ``plateau_escape``: its policy, inner optimizer and mode.

        Raises:
            ValueError: If a candidate's mix row is not a row of ``policy.all_mixes``.
        """
        rows = len(policy.all_mixes)
        for i, c in enumerate(self.candidates):
            if not isinstance(c.mix, str) and c.mix >= rows:
                raise ValueError(f"candidates[{i}].mix = {c.mix} is not a row of the policy's "
                                 f"all_mixes, which has {rows} rows.")
        return BoundLookahead(self, policy, optimizer, float(sign), max_interventions)


@dataclasses.dataclass(frozen=True)
class BoundLookahead:
    """A :class:`Lookahead` bound to a ``plateau_escape``'s policy, optimizer and mode."""

    config: Lookahead
    policy: Any
    optimizer: optax.GradientTransformation
    sign: float
    max_interventions: int

    def init(self) -> LookaheadState:
        """The record before any trial."""
        return self.config.init()

    def inner_args(self, params, value_fn, extra_args: dict) -> dict:
        """The extra arguments of the inner optimizer (``value_fn`` is the lookahead's).

        Raises:
            ValueError: If ``params`` or ``value_fn`` is missing.
        """
        if params is None or value_fn is None:
            raise ValueError(
                "plateau_escape with a lookahead needs params and value_fn: call "
                "tx.update(grads, state, params, value=loss, value_fn=value_fn) with "
                "value_fn(params, loss_weights) -> (loss_to_optimise, monitored_value) "
                "evaluated on the probe batch (the trials start from params).")
        return extra_args

    def early_trial(self, event, plateau_before, plateau, before) -> jax.Array:
        """bool []: this step runs the early trial (see :class:`Lookahead`'s ``early_trial_window``).

        Args:
            event: The detector's :class:`~adaptive_optax.plateau.WindowEvent` of this step.
            plateau_before: The detector's state before this step (its best so far).
            plateau: The detector's state after this step (the window just closed).
            before: The :class:`~adaptive_optax.policy.InterventionState` before this step.

        Returns:
            True on the close of window ``early_trial_window`` with a finite
            mean, before any intervention, when that mean beats the best before
            it, but by less than ``early_trial_progress`` of it; always False
            without an early trial.
        """
        window = self.config.early_trial_window
        if window is None:
            return jnp.zeros([], jnp.bool_)
        best = plateau_before.best_value
        # sign * (best - mean) is the improvement in either mode; best is finite from window 1
        # on. A window that did not improve is no slow start: a rate too high rises or stalls.
        gain = self.sign * (best - plateau.window_value)
        slow = (jnp.isfinite(best) & (gain > 0)
                & (gain < self.config.early_trial_progress * jnp.abs(best)))
        return (event.valid & (plateau.windows_completed == window)
                & (before.intervention_count == 0) & slow)

    def choose(self, intervene: jax.Array, decision: Decision, record: LookaheadState, *,
               before, grad_norm: jax.Array, multiplier: jax.Array, params, optimizer_state,
               rate: Callable[[jax.Array, jax.Array, bool], jax.Array], value_fn: Callable,
               extra_args: dict, early: jax.Array) -> tuple[Decision, LookaheadState, jax.Array]:
        """The decision to commit, the new record and whether it is committed.

        Trials run only where ``intervene`` or ``early``.

        Args:
            intervene: bool []: this step intervenes at a plateau.
            decision: The policy's :class:`~adaptive_optax.policy.Decision`.
            record: The record before this step.
            before: The :class:`~adaptive_optax.policy.InterventionState` before this step.
            grad_norm: The gradient-norm EMA (for the next planned mix).
            multiplier: The learning-rate multiplier in force before this step
                (what a :class:`Candidate` ``cut`` cuts).
            params: The parameters the trials start from.
            optimizer_state: The inner optimizer state the trials start from.
            rate: ``rate(boost, t, ramp)``: the learning rate ``t`` steps
                after committing ``boost``, along the warm-up ramp or (``ramp``
                False) at the boost itself.
            value_fn: ``value_fn(params, loss_weights) -> (loss, monitored)``.
            extra_args: The inner optimizer's extra arguments.
            early: bool []: this step runs the early trial (:meth:`early_trial`;
                never together with ``intervene``; always False without one).

        Returns:
            ``(decision, record, commit)``: the decision with the chosen boost
            and mix (its reset dropped at an early trial), the trial's record (``record``
            unchanged without a trial), and bool []: the decision is
            committed (``intervene``, or an early trial that a boost won).
        """
        # An early trial never resets the optimizer: nothing is committed unless a boost wins.
        reset = decision.reset & ~early
        incumbent = (0 if self.config.early_trial_window is None
                     else self.config.early_incumbent)

        def trial():
            boosts, mixes = self._candidates(decision, before, grad_norm, multiplier)
            unique, slot = self._unique()
            # The trials start from the inner state the committed step will use:
            # re-initialised where this intervention resets the optimizer.
            start = reset_where(self.optimizer, optimizer_state, reset, params)
            curves = self._trials(boosts[unique], mixes[unique], params, start, rate,
                                  value_fn, extra_args, early)[slot]
            values = curves[:, -1]
            choice = self._best(values, jnp.where(early, incumbent, 0))
            committed = jnp.clip(choice, 0)
            boost = jnp.where(choice >= 0, boosts[committed], 1.0).astype(jnp.float32)
            mix = jnp.where(choice >= 0, mixes[committed], before.mix_index).astype(jnp.int32)
            won = intervene | ((choice >= 0) & (choice != incumbent))
            return boost, mix, LookaheadState(values, curves, choice), won

        def passthrough():
            return decision.boost, decision.mix_index, record, intervene

        boost, mix, record, commit = jax.lax.cond(intervene | early, trial, passthrough)
        return decision._replace(boost=boost, mix_index=mix, reset=reset), record, commit

    def _candidates(self, decision, before, grad_norm, multiplier) -> tuple[jax.Array, jax.Array]:
        """float32 [K] boosts and int32 [K] mix rows of the candidates."""
        upcoming = before._replace(intervention_count=before.intervention_count + 1,
                                   force_final_mix=jnp.zeros([], jnp.bool_))
        mixes = {"policy": decision.mix_index, "current": before.mix_index,
                 "next": self.policy.decide(upcoming, grad_norm, self.max_interventions).mix_index}
        boosts = [c.boost(decision.boost, multiplier) for c in self.config.candidates]
        rows = [mixes[c.mix] if isinstance(c.mix, str) else c.mix for c in self.config.candidates]
        return (jnp.stack([jnp.asarray(b, jnp.float32) for b in boosts]),
                jnp.stack([jnp.asarray(r, jnp.int32) for r in rows]))

    def _unique(self) -> tuple[np.ndarray, np.ndarray]:
        """Candidates to try, and each candidate's row among them (static).

        With a single distinct mix in the policy's table, every mix spec is the
        same mix: candidates that differ only in it are tried once.
        """
        table = np.asarray(self.policy.all_mixes)
        one_mix = table.shape[1] == 0 or bool((table == table[:1]).all())
        keys = [(c.boost_scale, c.cut, None if one_mix else c.mix) for c in self.config.candidates]
        first = {}
        for i, key in enumerate(keys):
            first.setdefault(key, i)
        unique = sorted(set(first.values()))
        slot = [unique.index(first[key]) for key in keys]
        return np.asarray(unique, np.int32), np.asarray(slot, np.int32)

    def _trials(self, boosts, mixes, params, optimizer_state, rate, value_fn, extra_args,
                early):
        """float32 [K, steps + 1]: each candidate's monitored value over its trial.

        ``early`` (bool []): the trial takes each boost at once (``ramp=False``).
        """
        axis = self.config.batch_axis_name
        mean = (lambda x: x) if axis is None else (lambda x: jax.lax.pmean(x, axis))
        grad_fn = jax.value_and_grad(value_fn, has_aux=True)

        def run(candidate):
            boost, mix = candidate
            weights = self.policy.weights(mix)

            def step(carry, t):
                p, s = carry
                (_, monitored), grads = grad_fn(p, weights)
                grads, monitored = mean(grads), mean(jnp.asarray(monitored, jnp.float32))
                ramped = rate(boost, t, self.config.ramp)
                if self.config.ramp and self.config.early_trial_window is not None:
                    ramped = jnp.where(early, rate(boost, t, False), ramped)
                s = with_learning_rate(s, ramped)
                updates, s = self.optimizer.update(grads, s, p, value=monitored, **extra_args)
                return (optax.apply_updates(p, updates), s), monitored

            (p, _), curve = jax.lax.scan(step, (params, optimizer_state),
                                         jnp.arange(self.config.steps, dtype=jnp.int32))
            final = mean(jnp.asarray(value_fn(p, weights)[1], jnp.float32))
            return jnp.concatenate([curve, final[None]])

        memory = self.config.memory
        if memory == "auto":
            memory = "map" if jax.default_backend() == "cpu" else "vmap"
        if memory == "vmap":
            return jax.vmap(run)((boosts, mixes))
        return jax.lax.map(run, (boosts, mixes))

    def _best(self, values: jax.Array, incumbent: jax.Array | int = 0) -> jax.Array:
        """int32 []: the committed candidate (mode-aware; the incumbent wins near-ties)."""
        score = jnp.where(jnp.isfinite(values), self.sign * values, jnp.inf)
        best = jnp.argmin(score).astype(jnp.int32)
        margin = self.config.rtol * jnp.abs(values[incumbent]) + self.config.atol
        keep = jnp.isfinite(score[incumbent]) & (score[best] >= score[incumbent] - margin)
        choice = jnp.where(keep, incumbent, best)
        return jnp.where(jnp.isfinite(score).any(), choice, ALL_NONFINITE).astype(jnp.int32)


@dataclasses.dataclass(frozen=True)
class NoLookahead:
    """The absent lookahead: the same calls as :class:`BoundLookahead`, the policy's decision.

    ``plateau_escape(..., lookahead=None)`` uses :data:`NO_LOOKAHEAD`: its
    record is ``optax.EmptyState()`` and ``choose`` returns the decision as
    it is, so the update compiles to what it would be without lookahead code.

    Example:
        >>> NO_LOOKAHEAD.init()
        EmptyState()
    """

    def bind(self, **unused) -> NoLookahead:
        """Itself."""
        del unused
        return self

    def init(self) -> optax.EmptyState:
        """No record."""
        return optax.EmptyState()

    def inner_args(self, params, value_fn, extra_args: dict) -> dict:
        """``extra_args``, with ``value_fn`` passed on to the inner optimizer if given."""
        del params
        return extra_args if value_fn is None else {**extra_args, "value_fn": value_fn}

    def early_trial(self, *unused) -> bool:
        """False: no early trial."""
        del unused
        return False

    def choose(self, intervene, decision, record, **unused):
        """``(decision, record, intervene)``: the decision and record unchanged."""
        del unused
        return decision, record, intervene


NO_LOOKAHEAD = NoLookahead()
