"""How :func:`~adaptive_optax.plateau_escape` stores its state: a few named leaves
and two packed vectors.

Why packed: every leaf of an optimizer state is a buffer that a jitted step
takes in, donates and hands back, a host cost per leaf and step, and on a GPU
a scalar updated on its own is a kernel launch of its own. So the scalars live
in one float32 and one int32 vector: the leaves the state adds to the inner
optimizer's do not grow with the number of scalars. The update
unpacks them into the readable records (:class:`PlateauState`,
:class:`GradNormState`, :class:`InterventionState`, :class:`RollbackState`),
works on those, and packs the result: the unpacking becomes slices that XLA
fuses into their consumers, the packing one fused loop per vector, so the
compiled update stays a few dozen ops (``tests/test_state.py`` bounds the
count; the figures are in ``docs/design.md``, item 19).

Written here rather than with ``jax.flatten_util.ravel_pytree``, which promotes
all leaves to one dtype: int32 step counters stored as float32 would stop
counting exactly at 2**24.

The fields users read with ``optax.tree.get`` stay leaves of their own:
``intervention_count``, ``grad_norm_ema``, ``best_value``, ``plateau_count``,
the ``loss_weights`` dict, ``learning_rate`` in the inner optimizer's
``hyperparams``, and with a lookahead its record (``trial_values``,
``trial_curves``, ``trial_choice``; :mod:`adaptive_optax.lookahead`). Every
field, packed or not, is readable with :func:`state_field` or
:meth:`PlateauEscapeState.fields`, and the records with the properties
``plateau``, ``grad_norm``, ``intervention`` and ``rollback``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from adaptive_optax.grad_norm import GradNormState
from adaptive_optax.plateau import PlateauState
from adaptive_optax.policy import InterventionState
from adaptive_optax.rollback import RollbackState

# Leaves of their own, so that optax.tree.get finds each exactly once.
PUBLIC_FIELDS = ("intervention_count", "grad_norm_ema", "best_value", "plateau_count")
# The float32 vector, in storage order.
FLOAT_FIELDS = ("base_learning_rate", "window_sum", "window_m2", "window_value", "window_sd",
                "grad_norm_acc", "last_grad_norm", "lr_multiplier", "boost_from", "boost_to",
                "conservatism", "snapshot_boost_from", "snapshot_boost_to", "snapshot_value",
                "snapshot_sd", "probe_sum")
# The int32 vector: these scalars (bools as 0/1), then the 2 words of the raw
# PRNG key, then the planned mix of every intervention (its length is the cap).
INT_FIELDS = ("step", "window_finite", "window_step", "windows_completed", "cooldown_count",
              "nonfinite_count", "grad_norm_steps", "nonfinite_grad_count", "boost_step",
              "mix_index", "force_final_mix", "snapshot_boost_step", "snapshot_mix_index",
              "guard_windows_left", "rollback_count", "probe_count")
_BOOL_FIELDS = frozenset({"force_final_mix"})
_KEY_WORDS = 2
_ROLLBACK_SCALARS = tuple(f for f in RollbackState._fields if f != "snapshot_params")
# The rollback slots of a state without a guard: finite constants, never read.
_NO_GUARD = {"snapshot_boost_from": 1.0, "snapshot_boost_to": 1.0, "snapshot_boost_step": -1,
             "snapshot_value": 0.0, "snapshot_mix_index": 0, "snapshot_sd": 0.0,
             "probe_sum": 0.0, "probe_count": 0, "guard_windows_left": 0, "rollback_count": 0}


class PlateauEscapeState(NamedTuple):
    """State of :func:`~adaptive_optax.plateau_escape`.

    ``optax.tree.get(opt_state, NAME)`` finds ``learning_rate`` (the effective
    rate, in ``optimizer_state.hyperparams``), ``intervention_count``,
    ``grad_norm_ema``, ``best_value``, ``plateau_count`` and ``loss_weights``
    from any enclosing state. The other fields are packed (see the module
    docstring); read them with :func:`state_field` or the properties.

    Example:
        >>> import optax, jax.numpy as jnp
        >>> from adaptive_optax import plateau_escape
        >>> state = plateau_escape(optax.sgd, 0.1).init({"w": jnp.zeros(2)})
        >>> int(state.plateau.windows_completed), int(state.step)
        (0, 0)
    """

    intervention_count: jax.Array  # int32 [], interventions applied
    grad_norm_ema: jax.Array  # float32 [], bias-corrected EMA of the global gradient norm
    best_value: jax.Array  # float32 [], best valid window mean (+inf/-inf before)
    plateau_count: jax.Array  # int32 [], consecutive non-improving valid windows
    loss_weights: dict[str, jax.Array]  # float32 [] each, the mix for the next loss
    packed_floats: jax.Array  # float32 [len(FLOAT_FIELDS)]
    packed_ints: jax.Array  # int32 [len(INT_FIELDS) + 2 + max(max_interventions, 1)]
    rollback_snapshot: Any  # the rollback guard's snapshot_params, or optax.EmptyState()
    optimizer_state: Any  # inject_hyperparams state of the inner optimizer
    lookahead: Any = optax.EmptyState()  # the lookahead's LookaheadState, or optax.EmptyState()

    @classmethod
    def from_records(
        cls,
        *,
        step: jax.Array,
        base_learning_rate: jax.Array,
        plateau: PlateauState,
        grad_norm: GradNormState,
        intervention: InterventionState,
        rollback: RollbackState | optax.EmptyState,
        loss_weights: dict[str, jax.Array],
        optimizer_state: Any,
        lookahead: Any = optax.EmptyState(),
    ) -> PlateauEscapeState:
        """Packs the records into a state (the inverse of the properties)."""
        values = {"step": step, "base_learning_rate": base_learning_rate,
                  **plateau._asdict(), **grad_norm._asdict(), **intervention._asdict()}
        guarded = isinstance(rollback, RollbackState)
        values.update({f: getattr(rollback, f) for f in _ROLLBACK_SCALARS} if guarded
                      else _NO_GUARD)
        floats = _pack([values[f] for f in FLOAT_FIELDS], jnp.float32)
        key = jax.lax.bitcast_convert_type(jnp.asarray(values["rng_key"], jnp.uint32), jnp.int32)
        ints = _pack([*(jnp.asarray(values[f]).astype(jnp.int32) for f in INT_FIELDS), key,
                      values["planned_mix_index"]], jnp.int32)
        return cls(
            **{f: values[f] for f in PUBLIC_FIELDS},
            loss_weights=loss_weights,
            packed_floats=floats,
            packed_ints=ints,
            rollback_snapshot=rollback.snapshot_params if guarded else optax.EmptyState(),
            optimizer_state=optimizer_state,
            lookahead=lookahead,
        )

    def _unpacked(self) -> dict[str, jax.Array]:
        values = {f: self.packed_floats[..., i] for i, f in enumerate(FLOAT_FIELDS)}
        for i, f in enumerate(INT_FIELDS):
            value = self.packed_ints[..., i]
            values[f] = value != 0 if f in _BOOL_FIELDS else value
        start = len(INT_FIELDS)
        values["rng_key"] = jax.lax.bitcast_convert_type(
            self.packed_ints[..., start:start + _KEY_WORDS], jnp.uint32)
        values["planned_mix_index"] = self.packed_ints[..., start + _KEY_WORDS:]
        values.update({f: getattr(self, f) for f in PUBLIC_FIELDS})
        return values

    @property
    def guarded(self) -> bool:
        """Whether the state carries a rollback guard (a static property)."""
        return not isinstance(self.rollback_snapshot, optax.EmptyState)

    @property
    def step(self) -> jax.Array:
        """int32 []: updates made so far (drives the base schedule)."""
        return self.packed_ints[..., INT_FIELDS.index("step")]

    @property
    def base_learning_rate(self) -> jax.Array:
        """float32 []: the base schedule at the latest step."""
        return self.packed_floats[..., FLOAT_FIELDS.index("base_learning_rate")]

    @property
    def learning_rate(self) -> jax.Array:
        """[]: the effective learning rate given to the inner optimizer.

        In the parameters' dtype, as ``optax.inject_hyperparams`` keeps it
        (bfloat16 parameters: a bfloat16 rate, so updates stay bfloat16).
        """
        return self.optimizer_state.hyperparams["learning_rate"]

    @property
    def plateau(self) -> PlateauState:
        """The plateau detector's record."""
        return _record(PlateauState, self._unpacked())

    @property
    def grad_norm(self) -> GradNormState:
        """The gradient-norm statistics."""
        return _record(GradNormState, self._unpacked())

    @property
    def intervention(self) -> InterventionState:
        """What the interventions so far have set, and the plan of the next ones."""
        return _record(InterventionState, self._unpacked())

    @property
    def rollback(self) -> RollbackState | optax.EmptyState:
        """The rollback guard's record, or ``optax.EmptyState()`` without a guard."""
        if not self.guarded:
            return optax.EmptyState()
        values = {**self._unpacked(), "snapshot_params": self.rollback_snapshot}
        return _record(RollbackState, values)

    def fields(self) -> dict[str, Any]:
        """Every named field, packed or not, in one flat dict.

        Holds ``learning_rate``, ``loss_weights``, ``step``,
        ``base_learning_rate``, every field of the four records except
        ``snapshot_params``; the rollback fields only with a guard, the
        lookahead's (``trial_values``, ``trial_curves``, ``trial_choice``)
        only with a lookahead.
        """
        values = self._unpacked()
        if not self.guarded:
            for f in _ROLLBACK_SCALARS:
                del values[f]
        if not isinstance(self.lookahead, optax.EmptyState):
            values.update(self.lookahead._asdict())
        values["learning_rate"] = self.learning_rate
        values["loss_weights"] = self.loss_weights
        return values


def find_state(opt_state: optax.OptState) -> PlateauEscapeState:
    """The :class:`PlateauEscapeState` inside any optimizer state.

    Args:
        opt_state: A ``plateau_escape`` state, or one that holds one (an
            ``optax.chain`` state, ``nnx.pure(optimizer.opt_state)``, ...).

    Returns:
        The plateau-escape state.

    Raises:
        ValueError: If ``opt_state`` holds no plateau-escape state, or several.
    """
    if isinstance(opt_state, PlateauEscapeState):
        return opt_state
    found = optax.tree.get(opt_state, "PlateauEscapeState")  # raises if several
    if found is None:
        raise ValueError("opt_state holds no PlateauEscapeState: it was not made by "
                         f"plateau_escape (got {type(opt_state).__name__}).")
    return found


def state_field(opt_state: optax.OptState, name: str) -> Any:
    """Reads one field of the plateau-escape state, packed fields included.

    Like ``optax.tree.get(opt_state, name)``, and also for the packed fields
    (``windows_completed``, ``lr_multiplier``, ``mix_index``, ...).

    Args:
        opt_state: Any optimizer state that holds a plateau-escape state.
        name: A key of :meth:`PlateauEscapeState.fields`.

    Returns:
        The field's value (a scalar array; ``loss_weights`` is a dict).

    Raises:
        KeyError: If ``name`` is not a field; the message lists the fields.

    Example:
        >>> import optax, jax.numpy as jnp
        >>> from adaptive_optax import plateau_escape
        >>> state = plateau_escape(optax.adam, 1e-3).init({"w": jnp.zeros(2)})
        >>> float(state_field(state, "lr_multiplier"))
        1.0
    """
    fields = find_state(opt_state).fields()
    if name not in fields:
        raise KeyError(f"{name!r} is not a field of the plateau-escape state; the fields are "
                       f"{sorted(fields)}.")
    return fields[name]


def _record(cls, values: Mapping[str, Any]):
    return cls(**{f: values[f] for f in cls._fields})


def _pack(pieces, dtype) -> jax.Array:
    """Concatenates scalars and vectors into one vector, as one fused loop.

    Written as selects over an index rather than ``jnp.concatenate``: XLA:CPU
    computes each operand of a concatenation in a fusion of its own (one
    thunk per packed scalar), while the selects fuse into a single loop.
    """
    pieces = [jnp.ravel(jnp.asarray(p, dtype)) for p in pieces]
    size = sum(p.shape[0] for p in pieces)
    index = jnp.arange(size)
    out = jnp.zeros([size], dtype)
    offset = 0
    for p in pieces:
        n = p.shape[0]
        placed = jnp.pad(p, (offset, size - offset - n))
        out = jnp.where((index >= offset) & (index < offset + n), placed, out)
        offset += n
    return out
