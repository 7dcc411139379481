"""The intervention policy: the table of boosts (and optional loss mixes), decided in-graph.

The seed trainer's ``_handle_plateau`` as a validated, frozen config object,
with ``init``/``decide``/``apply`` owning the record of what the
interventions set (:class:`InterventionState`). Its boost rules are the seed's:

* **Boost from the gradient-norm EMA.** ``grad_norm_thresholds=(0.01, 0.1,
  0.5)`` split the norm into half-open bins ``[0, 0.01)``, ``[0.01, 0.1)``,
  ``[0.1, 0.5)``, ``[0.5, inf)`` with ``grad_norm_boosts=(15, 10, 5, 3)``:
  tiny gradients get the biggest boost. (The seed's ``> 0.5`` gives 5x at
  exactly 0.5; consistent half-open bins give 3x there. No other norm differs.)
* **Progressive damping.** Intervention ``k`` multiplies its boost by
  ``damping[k-1]`` = 1.0, 0.7, 0.5. Boosts are relative to the base schedule,
  never compounded: norm 0.04 gives base x10, x7, x5 at interventions 1-3
  (the seed's own worked example prints 2x for the third; 10 x 0.5 is 5).
* **Fallback.** With gradient tracking off (``use_grad_norm=False``), the boost
  is ``fixed_boosts[k-1]`` (default 5x, the seed's "standard" bin, which is
  also what its default ``avg_gradient_norm=0.1`` yields), still damped.
* **Optimizer reset** per intervention with ``reset_optimizer``.

**Loss mixes are optional.** The core knows no loss names: the default policy
has no mixes, and its state's ``loss_weights`` is an empty dict (no leaves:
the state's type and fields do not depend on the policy, and nothing is
stored). A policy with ``mixes`` (the segmentation application's
:func:`adaptive_optax.segmentation.policies.adaptive_mix_policy` is the
seed's) switches the loss mix at interventions: a mix is picked uniformly at
random from ``mixes``, never re-picking the current one when
``avoid_repeat``. The picks of all interventions are drawn at ``init`` from
the state's PRNG key (``planned_mix_index``), so a run's plan is
reproducible from its seed and visible in advance; the last allowed
intervention uses ``final_mix``. ``mix_plan`` overrides this per
intervention with ``"random"``, ``"final"``, ``"keep"`` or a table index.

Per-intervention sequences (``damping``, ``fixed_boosts``, ``mix_plan``,
``reset_optimizer``) repeat their last entry for later interventions.
Mix weights are used as given, not renormalised: a mix that sums to 2 doubles
the gradient scale, which is the user's call.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Mapping, Sequence
from types import MappingProxyType
from typing import NamedTuple, Union

import jax
import jax.numpy as jnp
import numpy as np

from adaptive_optax._validation import FLOAT32_MAX, check_bool, check_floats

FLOAT32_TINY = float(np.finfo(np.float32).tiny)

LossMix = Mapping[str, float]
MixStep = Union[str, int]

_PLAN_WORDS = ("random", "final", "keep")
_RANDOM, _FINAL, _KEEP = -1, -2, -3


class InterventionState(NamedTuple):
    """What the interventions so far have set (scalars and a PRNG key)."""

    intervention_count: jax.Array  # int32 [], interventions applied
    lr_multiplier: jax.Array  # float32 [], current multiplier on the base schedule
    boost_from: jax.Array  # float32 [], multiplier just before the latest intervention
    boost_to: jax.Array  # float32 [], target multiplier of the latest intervention
    boost_step: jax.Array  # int32 [], step of the latest intervention (-1: none)
    mix_index: jax.Array  # int32 [], row of InterventionPolicy.all_mixes in use
    planned_mix_index: jax.Array  # int32 [max(cap, 1)], mix of each intervention, drawn at init
    rng_key: jax.Array  # uint32 [2], raw PRNG key the plan was drawn from (seed)
    conservatism: jax.Array  # float32 [], boost scale in [0, 1], shrunk by rollbacks
    force_final_mix: jax.Array  # bool [], next intervention uses final_mix (after a rollback)


class Decision(NamedTuple):
    """One intervention as decided in-graph."""

    boost: jax.Array  # float32 [], multiplier on the base learning rate
    mix_index: jax.Array  # int32 [], row of all_mixes
    reset: jax.Array  # bool [], re-initialise the inner optimizer


@dataclasses.dataclass(frozen=True)
class InterventionPolicy:
    """What an intervention does: boost, loss mix and optimizer reset.

    Args:
        grad_norm_thresholds: Strictly increasing positive bin edges.
        grad_norm_boosts: One boost per bin, ``len(thresholds) + 1`` values > 0.
        damping: Per-intervention factor on the boost, values > 0.
        use_grad_norm: Choose the boost from the gradient-norm EMA; if False,
            use ``fixed_boosts`` (the seed's fallback).
        fixed_boosts: Per-intervention boosts used when ``use_grad_norm=False``.
        mixes: Candidate loss mixes, dicts of non-negative weights with the
            keys of ``initial_mix``, not all zero; ``()`` (default): none.
        initial_mix: The mix before any intervention; ``{}`` (default)
            without mixes.
        final_mix: The conservative mix of the last intervention (and of the
            one after a rollback); same keys.
        mix_plan: Per intervention ``"random"`` (needs ``mixes``),
            ``"final"``, ``"keep"`` (the mix in use, also after a rollback
            changed it) or an index into ``mixes``. ``None``: random (keep
            without ``mixes``), then final for the last.
        avoid_repeat: A random pick never repeats the current table mix.
        reset_optimizer: Per-intervention flags to re-initialise the inner
            optimizer state.

    Raises:
        ValueError: On any invalid argument; the message names it.

    Example:
        >>> InterventionPolicy(damping=(1.0, 0.8)).loss_names
        ()
        >>> mix = {"a": 0.5, "b": 0.5}
        >>> InterventionPolicy(mixes=(mix,), initial_mix=mix, final_mix=mix).loss_names
        ('a', 'b')
    """

    grad_norm_thresholds: Sequence[float] = (0.01, 0.1, 0.5)
    grad_norm_boosts: Sequence[float] = (15.0, 10.0, 5.0, 3.0)
    damping: Sequence[float] = (1.0, 0.7, 0.5)
    use_grad_norm: bool = True
    fixed_boosts: Sequence[float] = (5.0,)
    mixes: Sequence[LossMix] = ()
    initial_mix: LossMix = dataclasses.field(default_factory=dict)
    final_mix: LossMix = dataclasses.field(default_factory=dict)
    mix_plan: Sequence[MixStep] | None = None
    avoid_repeat: bool = True
    reset_optimizer: Sequence[bool] = (False,)

    def __post_init__(self):
        check_bool("use_grad_norm", self.use_grad_norm)
        check_bool("avoid_repeat", self.avoid_repeat)
        thresholds = check_floats("grad_norm_thresholds", self.grad_norm_thresholds,
                                  low=0.0, low_open=True)
        # Compared in float32, where the norm is binned: edges equal there leave a bin empty.
        edges = np.asarray(thresholds, np.float32)
        if np.any(edges[1:] <= edges[:-1]):
            raise ValueError("grad_norm_thresholds must be strictly increasing (also after "
                             "rounding to float32), got grad_norm_thresholds = "
                             f"{tuple(self.grad_norm_thresholds)}.")
        boosts = check_floats("grad_norm_boosts", self.grad_norm_boosts, low=0.0, low_open=True)
        if len(boosts) != len(thresholds) + 1:
            raise ValueError(
                "grad_norm_boosts must have len(grad_norm_thresholds) + 1 = "
                f"{len(thresholds) + 1} entries (one per bin), got {len(boosts)}.")
        damping = check_floats("damping", self.damping, low=0.0, low_open=True)
        fixed = check_floats("fixed_boosts", self.fixed_boosts, low=0.0, low_open=True)
        # Boosts are applied in float32: check_floats refuses values that round
        # to 0 there; a damped boost past the float32 range would become inf.
        if max(boosts + fixed) * max(damping) > FLOAT32_MAX:
            raise ValueError("a damped boost (max of grad_norm_boosts and fixed_boosts times "
                             f"max(damping)) must stay below {FLOAT32_MAX:g} (float32), got "
                             f"{max(boosts + fixed)} * {max(damping)}.")
        # and one below the smallest float32 normal would be 0: XLA flushes subnormals.
        if float(np.float32(min(boosts + fixed)) * np.float32(min(damping))) < FLOAT32_TINY:
            raise ValueError("a damped boost (min of grad_norm_boosts and fixed_boosts times "
                             f"min(damping)) must be at least {FLOAT32_TINY:g} (the smallest "
                             "float32 normal; XLA flushes smaller values to 0), got "
                             f"{min(boosts + fixed)} * {min(damping)}.")
        if isinstance(self.mixes, (str, bytes, Mapping)) or not isinstance(self.mixes, Sequence):
            raise ValueError(f"mixes must be a sequence of dicts, got mixes = {self.mixes!r}.")
        names = _mix_names("initial_mix", self.initial_mix)
        if self.mixes and not names:
            raise ValueError("initial_mix must be given with mixes (the mix before the first "
                             "intervention, with the same loss names), got initial_mix = {}.")
        for i, mix in enumerate(self.mixes):
            _check_mix(f"mixes[{i}]", mix, names)
        _check_mix("initial_mix", self.initial_mix, names)
        _check_mix("final_mix", self.final_mix, names)
        if self.mix_plan is not None:
            if isinstance(self.mix_plan, (str, bytes)) or not isinstance(self.mix_plan, Sequence) \
                    or len(self.mix_plan) == 0:
                raise ValueError(f"mix_plan must be None or a non-empty sequence, got {self.mix_plan!r}.")
            for i, step in enumerate(self.mix_plan):
                if step == "random" and not self.mixes:
                    raise ValueError(f"mix_plan[{i}] = 'random' needs a table to pick from: "
                                     "mixes is empty.")
                ok = step in _PLAN_WORDS if isinstance(step, str) else (
                    isinstance(step, numbers.Integral) and not isinstance(step, (bool, np.bool_))
                    and 0 <= step < len(self.mixes))
                if not ok:
                    raise ValueError(
                        f"mix_plan[{i}] must be one of {_PLAN_WORDS} or an index in "
                        f"[0, {len(self.mixes)}), got {step!r}.")
        if not isinstance(self.reset_optimizer, Sequence) or len(self.reset_optimizer) == 0 or not all(
                isinstance(r, (bool, np.bool_)) for r in self.reset_optimizer):
            raise ValueError("reset_optimizer must be a non-empty sequence of bools, got "
                             f"reset_optimizer = {self.reset_optimizer!r}.")
        # Read-only copies: a caller's later edit of a dict passed in must not
        # change (or invalidate, unchecked) a policy that was already validated.
        object.__setattr__(self, "mixes", tuple(MappingProxyType(dict(m)) for m in self.mixes))
        object.__setattr__(self, "initial_mix", MappingProxyType(dict(self.initial_mix)))
        object.__setattr__(self, "final_mix", MappingProxyType(dict(self.final_mix)))
        for name in ("grad_norm_thresholds", "grad_norm_boosts", "damping", "fixed_boosts",
                     "mix_plan", "reset_optimizer"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, tuple(value))

    @property
    def loss_names(self) -> tuple[str, ...]:
        """The loss-component names, sorted (the order of every mix vector)."""
        return tuple(sorted(self.initial_mix))

    @property
    def all_mixes(self) -> np.ndarray:
        """float32 ``[len(mixes) + 2, n_losses]``: the table, then initial, then final."""
        rows = [*self.mixes, self.initial_mix, self.final_mix]
        return np.array([[float(m[k]) for k in self.loss_names] for m in rows], np.float32)

    @property
    def initial_index(self) -> int:
        """Row of ``all_mixes`` holding ``initial_mix``."""
        return len(self.mixes)

    @property
    def final_index(self) -> int:
        """Row of ``all_mixes`` holding ``final_mix``."""
        return len(self.mixes) + 1

    def mix_label(self, index: int) -> str:
        """A readable name for a row of ``all_mixes`` (for logs)."""
        index = int(index)
        if index == self.initial_index:
            return "initial"
        if index == self.final_index:
            return "final"
        return f"mixes[{index}]"

    def weights(self, mix_index: jax.Array) -> dict[str, jax.Array]:
        """The loss-weights dict of a row of ``all_mixes`` (in-graph gather)."""
        row = jnp.asarray(self.all_mixes)[mix_index]
        return {name: row[i] for i, name in enumerate(self.loss_names)}

    def plan(self, max_interventions: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Per-intervention boosts-without-norm, damping, mix codes and resets.

        Each array has ``max(max_interventions, 1)`` entries; sequences shorter
        than that repeat their last entry.
        """
        n = max(max_interventions, 1)
        if self.mix_plan is None:
            words: Sequence[MixStep] = ["random" if self.mixes else "keep"] * (n - 1) + ["final"]
        else:
            words = self.mix_plan
        codes = [{"random": _RANDOM, "final": _FINAL, "keep": _KEEP}.get(w, w) if isinstance(w, str)
                 else w for w in words]
        return (_stretch(self.fixed_boosts, n, np.float32), _stretch(self.damping, n, np.float32),
                _stretch(codes, n, np.int32), _stretch(self.reset_optimizer, n, np.bool_))

    def plan_mixes(self, key: jax.Array, max_interventions: int) -> jax.Array:
        """Draws the mix index of every intervention in advance, from ``key``.

        Drawing the whole plan once (at ``init``) keeps random-number
        generation out of the per-step update, where it would cost several
        kernels every step for a pick that happens at most a few times.

        Args:
            key: Raw ``uint32[2]`` PRNG key.
            max_interventions: The cap; the plan has ``max(cap, 1)`` entries.

        Returns:
            int32 ``[max(max_interventions, 1)]`` rows of :attr:`all_mixes`.
        """
        codes = self.plan(max_interventions)[2]
        n = len(self.mixes)
        current = jnp.asarray(self.initial_index, jnp.int32)
        picks = []
        for code in codes.tolist():
            key, pick_key = jax.random.split(key)
            if code == _RANDOM:
                in_table = (current < n) & self.avoid_repeat & (n > 1)
                # dtype fixed: under JAX_ENABLE_X64 the default int64 draws other numbers.
                r = jax.random.randint(pick_key, [], 0, n - in_table.astype(jnp.int32),
                                       dtype=jnp.int32)
                current = r + (in_table & (r >= current)).astype(jnp.int32)
            elif code == _FINAL:
                current = jnp.asarray(self.final_index, jnp.int32)
            elif code != _KEEP:
                current = jnp.asarray(code, jnp.int32)
            picks.append(current)
        return jnp.stack(picks).astype(jnp.int32)

    def init(self, seed: int, max_interventions: int) -> InterventionState:
        """The record before any intervention, with the plan drawn from ``seed``.

        The key and the plan depend on the seed and the policy only: computed
        op by op even inside ``jax.jit(init)``, they enter its program as
        constants, so its compile time does not grow with ``max_interventions``
        (staged, the draws would unroll into the program; docs/design.md, item 17).

        Args:
            seed: Integer in ``[0, 2**63)``; its high word is folded into the key.
            max_interventions: The cap; the plan has ``max(cap, 1)`` entries.

        Returns:
            An :class:`InterventionState` with multiplier 1 and the initial mix.

        Example:
            >>> int(InterventionPolicy().init(0, 3).intervention_count)
            0
        """
        with jax.ensure_compile_time_eval():
            key = jax.random.PRNGKey(seed & 0xFFFFFFFF)
            if seed >> 32:  # without x64, PRNGKey would drop the high word of the seed
                key = jax.random.fold_in(key, seed >> 32)
            if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
                key = jax.random.key_data(key)
            planned_mix_index = self.plan_mixes(key, max_interventions)
        one = jnp.ones([], jnp.float32)
        return InterventionState(
            intervention_count=jnp.zeros([], jnp.int32),
            lr_multiplier=one,
            boost_from=one,
            boost_to=one,
            boost_step=jnp.full([], -1, jnp.int32),
            mix_index=jnp.asarray(self.initial_index, jnp.int32),
            planned_mix_index=planned_mix_index,
            rng_key=key,
            conservatism=one,
            force_final_mix=jnp.zeros([], jnp.bool_),
        )

    def apply(self, state: InterventionState, decision: Decision, intervene: jax.Array,
              step: jax.Array, multiplier_now: jax.Array) -> InterventionState:
        """The record after ``decision``, where ``intervene``; else ``state`` unchanged.

        Args:
            state: The record before this step.
            decision: This step's :meth:`decide`.
            intervene: bool []: the step intervenes.
            step: The step's index (the boost's ramp starts there).
            multiplier_now: The multiplier in force before the intervention
                (the ramp starts from it, so a boost never drops the rate).

        Returns:
            The new record; ``lr_multiplier`` is left for the caller's ramp.
        """
        return state._replace(
            intervention_count=state.intervention_count + intervene.astype(jnp.int32),
            boost_from=jnp.where(intervene, multiplier_now, state.boost_from),
            boost_to=jnp.where(intervene, decision.boost, state.boost_to),
            boost_step=jnp.where(intervene, step, state.boost_step),
            mix_index=jnp.where(intervene, decision.mix_index, state.mix_index),
            force_final_mix=state.force_final_mix & ~intervene,
        )

    def decide(
        self,
        state: InterventionState,
        grad_norm: jax.Array,
        max_interventions: int,
    ) -> Decision:
        """Decides the next intervention (computed every step, applied on a plateau).

        Args:
            state: The current intervention state; ``intervention_count`` is
                the number of interventions already made.
            grad_norm: The bias-corrected gradient-norm EMA.
            max_interventions: The cap, which fixes which intervention is last.

        Returns:
            The :class:`Decision` for intervention ``intervention_count + 1``.
        """
        fixed, damping, codes, resets = (jnp.asarray(a) for a in self.plan(max_interventions))
        k = jnp.minimum(state.intervention_count, fixed.shape[0] - 1)
        if self.use_grad_norm:
            # The bin is the number of edges <= norm; a compare-and-sum fuses into
            # one kernel where jnp.searchsorted would lower to a while loop.
            edges = jnp.asarray(self.grad_norm_thresholds, jnp.float32)
            bin_index = jnp.sum((grad_norm >= edges).astype(jnp.int32))
            base = jnp.asarray(self.grad_norm_boosts, jnp.float32)[bin_index]
        else:
            base = fixed[k]
        boost = _towards_one(base * damping[k], state.conservatism)
        planned = state.planned_mix_index[jnp.minimum(k, state.planned_mix_index.shape[0] - 1)]
        # "keep" keeps the mix in use; the plan assumed no rollback had changed it.
        planned = jnp.where(codes[k] == _KEEP, state.mix_index, planned)
        mix_index = jnp.where(state.force_final_mix, self.final_index, planned).astype(jnp.int32)
        return Decision(boost.astype(jnp.float32), mix_index, resets[k])


def _towards_one(boost: jax.Array, conservatism: jax.Array) -> jax.Array:
    """``boost`` shrunk towards 1 (the bare base rate, not 0) by ``conservatism`` in [0, 1].

    ``1 + (boost - 1) * c`` in float32 loses a boost below ~6e-8: ``boost - 1``
    rounds to -1 and the result is exactly 0 at ``c = 1``. Written as C++'s
    ``std::lerp(1, boost, c)``: exact at both ends (1 at ``c = 0``, ``boost``
    itself at ``c = 1``), monotone in ``c`` and never past ``boost`` between.
    """
    c = jnp.asarray(conservatism, jnp.float32)
    x = 1.0 + c * (boost - 1.0)
    between = jnp.where(boost > 1.0, jnp.minimum(x, boost), jnp.maximum(x, boost))
    return jnp.where(c == 1.0, boost, between)


def _mix_names(name: str, mix) -> tuple[str, ...]:
    if not isinstance(mix, Mapping) or not all(isinstance(k, str) for k in mix):
        raise ValueError(f"{name} must be a dict from loss names (str) to weights, "
                         f"got {name} = {mix!r}.")
    return tuple(sorted(mix))


def _check_mix(name: str, mix, names: tuple[str, ...]) -> None:
    keys = _mix_names(name, mix)
    if keys != names:
        missing, extra = sorted(set(names) - set(keys)), sorted(set(keys) - set(names))
        raise ValueError(f"{name} must have the keys of initial_mix {list(names)}; "
                         f"missing {missing}, extra {extra}.")
    values = [mix[k] for k in names]
    for k, v in zip(names, values):
        if isinstance(v, bool) or not isinstance(v, (int, float, np.floating, np.integer)) \
                or not math.isfinite(v) or not 0 <= v <= FLOAT32_MAX:
            raise ValueError(f"{name}[{k!r}] must be a finite weight in [0, {FLOAT32_MAX:g}] "
                             f"(float32), got {v!r}.")
    if names and sum(values) <= 0:
        raise ValueError(f"{name} must have at least one positive weight, got {dict(mix)}.")


def _stretch(values: Sequence, n: int, dtype) -> np.ndarray:
    values = list(values)[:n]
    return np.array(values + [values[-1]] * (n - len(values)), dtype)
