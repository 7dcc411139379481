"""A fuzz pass over the public constructors (used by tests/test_reliability.py).

Every constructor gets a valid baseline call. The pass then tries

* every argument with every value of its pool (valid values, wrong types,
  out-of-range numbers, NaN/inf, huge integers, numpy and jax scalars),
  one argument at a time, and
* seeded random combinations that change two or three arguments at once.

A call that returns is also *used* once (an optimizer is initialised and
updated twice, a detector updated, a U-Net applied to a tiny image, a
lookahead or candidate tried at an intervention), because
an argument that is accepted but fails later inside a JAX trace is exactly
what the constructors' checks are there to prevent.

Each case is classified:

``ok``            accepted and used, as expected for a valid value;
``rejected``      ``ValueError``/``TypeError`` whose message names a changed
                  argument, as expected for an invalid value;
``wrong_type``    another exception type (``AttributeError``,
                  ``OverflowError``, ``MemoryError``, a JAX error, ...);
``unnamed``       ``ValueError``/``TypeError`` that does not name the argument;
``accepted_invalid``  an invalid value went through construction and use;
``rejected_valid``    a valid value was rejected;
``late``          construction accepted the value, first use failed.

Run ``python tests/_fuzz.py`` for the report that docs/reliability.md quotes.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import warnings
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import adaptive_optax as ao
from adaptive_optax.lookahead import (
    MAX_CANDIDATES,
    MAX_TRIAL_STEPS,
    NO_BOOST,
    NO_TRIAL,
    POLICY_CHOICE,
)
from adaptive_optax.segmentation.policies import INITIAL_MIX, MIX_TABLE, scripted_policy
from adaptive_optax.segmentation import strategies
from adaptive_optax.segmentation.data import load_dataset, synthetic_shapes
from adaptive_optax.segmentation.unet import UNet

OK, BAD, ANY = "ok", "bad", "any"
# Overflows every int32 counter in the state; a list or array of 2**62 entries
# fails to allocate at once instead of slowly eating memory.
HUGE = 2**62


class _Opaque:
    def __repr__(self) -> str:
        return "<object>"


@dataclasses.dataclass(frozen=True)
class Case:
    """One call: the arguments that differ from the baseline and what is expected."""

    constructor: str
    changed: dict[str, Any]
    expect: str  # OK, BAD or ANY


@dataclasses.dataclass
class Outcome:
    case: Case
    verdict: str
    detail: str = ""


# Values that are invalid for every argument (labelled per argument below where not).
COMMON_BAD: list[Any] = [None, "x", b"x", [], {}, (1,), _Opaque(), complex(1, 1),
                         float("nan"), float("inf"), -float("inf")]


def int_pool(minimum: int, valid: tuple[int, ...], *, huge: str | None = BAD,
             numpy_ok: bool = True, none_ok: bool = False) -> list[tuple[Any, str]]:
    """Pool for an integer argument with the given minimum (``huge=None``: no HUGE value)."""
    pool = [(v, OK) for v in valid] + ([(None, OK)] if none_ok else [])
    pool += [(minimum - 1, BAD), (-5, BAD), (1.5, BAD), (2.0, BAD), (True, BAD), (False, BAD),
             (np.int64(max(minimum, 1)), OK if numpy_ok else ANY),
             (jnp.int32(max(minimum, 1)), ANY)]
    if huge is not None:
        pool.append((HUGE, huge))
    return pool + [(v, BAD) for v in COMMON_BAD if not (none_ok and v is None)]


def float_pool(valid: tuple[float, ...], invalid: tuple[float, ...], *, huge: str = BAD,
               none_ok: bool = False) -> list[tuple[Any, str]]:
    """Pool for a real-number argument; ``huge`` labels 1e300 (inf once cast to float32)."""
    pool = [(v, OK) for v in valid] + [(v, BAD) for v in invalid]
    pool += [(np.float32(valid[0]), OK), (jnp.float32(valid[0]), ANY), (True, BAD),
             (1e300, huge)] + ([(None, OK)] if none_ok else [])
    return pool + [(v, BAD) for v in COMMON_BAD
                   if not isinstance(v, float) and not (none_ok and v is None)]


def bool_pool() -> list[tuple[Any, str]]:
    """Pool for a boolean flag: a truthy string must not silently mean True."""
    return [(True, OK), (False, OK), (np.bool_(True), OK), (1, ANY), (0, ANY), ("no", BAD),
            ("yes", BAD), (None, BAD), ([], BAD), (1.5, BAD)]


def seq_pool(valid: list, extra_bad: list, *, none_ok: bool = False) -> list[tuple[Any, str]]:
    """Pool for a sequence argument."""
    pool = [(v, OK) for v in valid] + [(v, BAD) for v in extra_bad]
    pool += [(None, OK if none_ok else BAD)]
    return pool + [(v, BAD) for v in ("x", 3, 1.5, {}, _Opaque(), ())]


_PARAMS = {"w": jnp.ones(2)}
_GRADS = {"w": jnp.full(2, 0.05)}


def _value_fn(params, loss_weights):
    """A trial objective for a lookahead (the ``lookahead`` strategy); others ignore it."""
    del loss_weights
    loss = sum(jnp.sum(p ** 2) for p in jax.tree.leaves(params))
    return loss, loss


def _two_updates(tx, params, grads):
    state = tx.init(params)
    for _ in range(2):
        updates, state = tx.update(grads, state, params, value=1.0, value_fn=_value_fn)
    return updates, state


def _check_finite(updates) -> None:
    jax.block_until_ready(updates)
    if not all(bool(jnp.all(jnp.isfinite(u))) for u in jax.tree.leaves(updates)):
        raise FloatingPointError("non-finite updates from a finite gradient")


def use_tx(tx) -> None:
    """Initialises ``tx`` and makes two updates (the second can intervene)."""
    updates, _ = _two_updates(tx, _PARAMS, _GRADS)
    _check_finite(updates)


def use_lookahead(lookahead) -> None:
    """Two updates of a plateau escape with ``lookahead``; the second intervenes and must try it.

    A constant ``value`` with ``patience=0`` makes the second update a plateau,
    so the candidates' trials run (in the ``lax.cond`` branch) and one is
    committed. With a ``batch_axis_name`` the updates run under ``jax.vmap`` over
    that axis (two replicas), which the trials' ``pmean`` needs. No rollback
    guard (the RollbackGuard target uses one): it doubles the compile time
    under ``vmap``, and the lookahead does not depend on it.
    """
    tx = ao.plateau_escape(optax.sgd, 0.1, patience=0, policy=scripted_policy(), rollback=None,
                           lookahead=lookahead)
    fn = functools.partial(_two_updates, tx)
    if lookahead.batch_axis_name is not None:  # jitted: eager vmap compiles more
        fn = jax.jit(jax.vmap(fn, in_axes=None, axis_size=2,
                              axis_name=lookahead.batch_axis_name))
    updates, state = fn(_PARAMS, _GRADS)
    _check_finite(updates)
    if bool(jnp.any(optax.tree.get(state, "trial_choice") == NO_TRIAL)):
        raise RuntimeError("the intervention did not run the lookahead's trial")


def use_detector(det) -> None:
    state = det.init()
    for _ in range(2):
        state, _ = det.update(state, jnp.float32(1.0))
    jax.block_until_ready(state)


def use_unet(model) -> None:
    x = jnp.zeros((1, 8, 8, model.in_channels), jnp.float32)
    jax.block_until_ready(model(x))


def _rbg_rngs(seed: int) -> nnx.Rngs:
    return nnx.Rngs(jax.random.key(seed, impl="rbg"))


MIX = dict(INITIAL_MIX)


@dataclasses.dataclass(frozen=True)
class Target:
    """A constructor, its valid baseline, its argument pools and how to use a result."""

    name: str
    call: Callable[..., Any]
    baseline: dict[str, Any]
    pools: dict[str, list[tuple[Any, str]]]
    use: Callable[[Any], None] | None = None
    combos: int | None = None  # random combinations; None: run()'s ``combos``


# A candidate's mix: a word or a row of scripted_policy()'s table (5 rows, the one
# use_lookahead binds). A row past the table (5, 2**62) is refused when
# plateau_escape binds the lookahead ("candidates[0].mix = 5 is not a row",
# tests/test_lookahead.py), the first place that knows the table: here it
# would read as a late failure of a valid Candidate.
MIX_SPECS = [("current", OK), ("next", OK), (4, OK), (np.int64(2), OK), (jnp.int32(1), ANY),
             ("Policy", BAD), ("", BAD), (-1, BAD), (1.0, BAD), (1.5, BAD), (True, BAD),
             (np.bool_(False), BAD), (("policy",), BAD)] + [
    (v, BAD) for v in COMMON_BAD if not isinstance(v, tuple)]


def targets() -> list[Target]:
    """The constructors under test."""
    built = optax.adam(1e-3)
    return [
        Target("plateau_escape", ao.plateau_escape,
               dict(optimizer=optax.adam, learning_rate=1e-3, patience=0),
               dict(
                   optimizer=[(optax.sgd, OK), (optax.adam, OK), (built, BAD),
                              (optax.scale_by_adam, BAD), ("adam", BAD), (None, BAD),
                              (lambda: None, BAD)],
                   learning_rate=float_pool((1e-3, 0.5), (0.0, -1e-3)) + [
                       (optax.constant_schedule(1e-2), OK), (3, OK)],
                   patience=int_pool(0, (0, 3)),
                   accumulation_steps=int_pool(1, (1, 4)),
                   cooldown=int_pool(0, (0, 2)),
                   mode=[("min", OK), ("max", OK), ("MIN", BAD), (1, BAD), (None, BAD),
                         (["min"], BAD)],
                   rtol=float_pool((0.0, 0.5), (-0.1, 1.0, 2.0)),
                   atol=float_pool((0.0, 0.5), (-0.1,), huge=ANY),
                   max_interventions=int_pool(0, (0, 1, 5)),
                   seed=int_pool(0, (0, 7, 2**31), huge=ANY),
                   grad_norm_decay=float_pool((0.0, 0.9), (1.0, -0.1)),
                   boost_warmup_steps=int_pool(0, (0, 3), huge=ANY, none_ok=True),
                   boost_decay_steps=int_pool(1, (1, 5), huge=ANY, none_ok=True),
                   max_learning_rate=float_pool((1e-2, 1.0), (0.0, -1.0), huge=ANY,
                                                none_ok=True),
                   max_update_ratio=float_pool((1e-3, 0.5), (0.0, -1.0), huge=ANY,
                                               none_ok=True),
                   skip_nonfinite_updates=bool_pool(),
                   policy=[(scripted_policy(), OK), ("adaptive", BAD), ({}, BAD)],
                   rollback=[(ao.RollbackGuard(), OK), (None, OK),
                             (ao.RollbackGuard(restore_params=False), OK), (True, BAD),
                             ("guard", BAD)],
                   # nesterov: an argument of both optimizers of the pool (sgd and adam).
                   optimizer_kwargs=[({"nesterov": True}, OK), ({}, OK), (None, OK),
                                     ({"b1": "x"}, BAD), ({"learning_rate": 0.1}, BAD),
                                     ({"bogus": 1}, BAD), ("x", BAD), ([("b1", 0.9)], BAD),
                                     ({1: 0.9}, BAD)],
                   b1=[(0.9, BAD)],  # the old spelling: optimizer_kwargs={"b1": 0.9}
                   bogus_option=[(1, BAD)],
               ),
               use=use_tx),
        # With a table of the seed's size (mix_plan's index 4) and its keys: the mix checks.
        Target("InterventionPolicy", ao.InterventionPolicy,
               dict(mixes=tuple(MIX_TABLE), initial_mix=MIX, final_mix=MIX),
               dict(
                   grad_norm_thresholds=seq_pool(
                       [(0.01, 0.1, 0.5), [0.2, 0.3, 0.4]],
                       [(0.1,), (0.5, 0.1, 0.2), (0.0, 1.0, 2.0), (float("nan"), 1.0, 2.0),
                        ("a", "b", "c"), np.array([0.1, 0.5, 1.0])]),
                   grad_norm_boosts=seq_pool([(3.0, 2.0, 2.0, 1.5)],
                                             [(1.0,), (0.0, 1.0, 1.0, 1.0), (1e40, 1, 1, 1)]),
                   damping=seq_pool([(1.0,), (0.5, 2.0)], [(0.0,), (-1.0,), (float("inf"),)]),
                   use_grad_norm=bool_pool(),
                   fixed_boosts=seq_pool([(2.0,), (10.0, 5.0)], [(0.0,), (-2.0,)]),
                   # () is valid: a constant mix, no table (mix_plan's picks then fail).
                   mixes=[(v, OK if v == () else ok) for v, ok in seq_pool(
                       [[MIX], (MIX, dict(MIX, dice=1.0))],
                       [[None], [{"dice": 1.0}], [dict(MIX, dice=-1.0)],
                        [dict(MIX, dice="a")], [{1: 1.0, "a": 1.0}], MIX])],
                   initial_mix=[(MIX, OK), ({}, BAD), (None, BAD), ({"dice": 1.0}, BAD),
                                (dict(MIX, bce=float("nan")), BAD), ([1.0], BAD)],
                   final_mix=[(MIX, OK), (dict.fromkeys(MIX, 0.0), BAD), ("x", BAD)],
                   mix_plan=seq_pool([("random",), (0, "final"), ("keep", 4)],
                                     [("later",), (99,), (-1,), (True,)], none_ok=True)
                   + [((np.int64(1),), ANY)],
                   avoid_repeat=bool_pool(),
                   reset_optimizer=seq_pool([(False,), (True, False)],
                                            [("yes",), (1,), (None,)]),
               ),
               use=lambda p: use_tx(ao.plateau_escape(optax.sgd, 1e-2, patience=0, policy=p,
                                                      max_interventions=2))),
        Target("RollbackGuard", ao.RollbackGuard, {},
               dict(
                   guard_windows=int_pool(1, (1, 3)),
                   rtol=float_pool((0.0, 0.5, 2.0), (-0.1,), huge=ANY),
                   atol=float_pool((0.0, 1.0), (-1.0,), huge=ANY),
                   shrink=float_pool((0.0, 0.5, 1.0), (-0.1, 1.5)),
                   stop_after_rollback=bool_pool(),
                   reset_optimizer=bool_pool(),
                   rollback_on_nonfinite=bool_pool(),
                   abort_z=float_pool((0.0, 3.0), (-1.0,), huge=ANY, none_ok=True),
                   restore_params=bool_pool(),
               ),
               use=lambda g: use_tx(ao.plateau_escape(optax.sgd, 1e-2, patience=0,
                                                      rollback=g))),
        Target("PlateauDetector", ao.PlateauDetector, {},
               dict(
                   patience=int_pool(0, (0, 3)),
                   accumulation_steps=int_pool(1, (1, 3)),
                   cooldown=int_pool(0, (0, 2)),
                   mode=[("min", OK), ("max", OK), ("Max", BAD), (0, BAD), (None, BAD)],
                   rtol=float_pool((0.0, 0.3), (1.0, -1.0)),
                   atol=float_pool((0.0, 2.0), (-1.0,), huge=ANY),
               ),
               use=use_detector),
        # "rbg" keys: threefry initialisation compiles many small eager kernels.
        Target("UNet", UNet, dict(depth=0, base_width=1, rngs=_rbg_rngs(0)),
               dict(
                   # No huge sizes here: they abort or hang the process (see
                   # docs/reliability.md), which no in-process check can catch.
                   in_channels=int_pool(1, (1, 2), huge=None),
                   num_classes=int_pool(1, (1, 2), huge=None),
                   depth=int_pool(0, (0, 1), huge=None),
                   base_width=int_pool(1, (1, 2), huge=None),
                   norm=[("group", OK), ("batch", OK), (None, OK), ("layer", BAD), (1, BAD),
                         ([], BAD)],
                   dtype=[(jnp.float32, OK), (jnp.bfloat16, OK), ("float32", OK), ("foo", BAD),
                          (None, ANY), (3, BAD)],
                   param_dtype=[(jnp.float32, OK), ("foo", BAD), (3, BAD)],
                   rngs=[(_rbg_rngs(1), OK), (None, BAD), (0, BAD), ("x", BAD)],
               ),
               use=use_unet),
        Target("synthetic_shapes", synthetic_shapes, dict(num_images=1, size=8),
               dict(
                   num_images=int_pool(1, (1, 2)),
                   size=int_pool(8, (8, 16)),
                   seed=int_pool(0, (0, 5, 2**40), huge=OK),
                   difficulty=float_pool((0.0, 1.0), (-0.1, 1.1)),
                   max_instances=int_pool(1, (1, 4), huge=OK),
               )),
        Target("load_dataset", load_dataset, dict(name="shapes", num_train=2, size=8),
               dict(
                   name=[("shapes", OK), ("nuclei", ANY), ("SHAPES", BAD), (None, BAD),
                         (1, BAD)],
                   seed=int_pool(0, (0, 3), huge=OK),
                   size=int_pool(8, (8, 16)),
                   num_train=int_pool(1, (1, 3), none_ok=True),
                   num_val=int_pool(1, (1, 2), none_ok=True),
                   difficulty=float_pool((0.0, 0.7), (-1.0, 2.0)),
                   max_instances=int_pool(1, (1, 5), huge=OK),
               )),
        Target("make_optimizer", strategies.make_optimizer,
               dict(strategy="adaptive", learning_rate=1e-3, total_steps=10),
               dict(
                   strategy=[(s, OK) for s in strategies.STRATEGIES]
                   + [("Adaptive", BAD), (None, BAD), (1, BAD), (["adaptive"], BAD)],
                   learning_rate=float_pool((1e-3,), (0.0, -1.0)),
                   total_steps=int_pool(1, (1, 100)),
                   patience=int_pool(0, (0, 2)),
                   accumulation_steps=int_pool(1, (1, 2)),
                   cooldown=int_pool(0, (0, 1)),
                   max_interventions=int_pool(0, (0, 2)),
                   seed=int_pool(0, (0, 1), huge=ANY),
                   optimizer=[(optax.sgd, OK), (None, BAD), ("adam", BAD)],
               ),
               use=use_tx),
        # The scheduled strategies build an optax schedule from these two arguments.
        Target("make_optimizer[cosine]", strategies.make_optimizer,
               dict(strategy="cosine", learning_rate=1e-3, total_steps=10),
               dict(learning_rate=float_pool((1e-3,), (0.0, -1.0)),
                    total_steps=int_pool(1, (1, 100))),
               use=use_tx),
        # Each use compiles an intervention with its trials (~0.7 s on CPU): the
        # valid values are few and the combinations fewer than elsewhere.
        Target("Lookahead", ao.Lookahead, dict(steps=1),
               dict(
                   steps=int_pool(1, (2,)) + [(MAX_TRIAL_STEPS + 1, BAD)],
                   candidates=seq_pool(
                       [(POLICY_CHOICE, NO_BOOST, ao.Candidate(cut=0.5)),
                        [(0.5, "next"), (2.0, 4)]],
                       [POLICY_CHOICE, (POLICY_CHOICE,) * (MAX_CANDIDATES + 1), (None,),
                        ("policy",), ((1.0,),), ((1.0, "policy", None),), ([0.5, "policy"],),
                        ((-1.0, "policy"),), ((float("nan"), "policy"),), ((True, "policy"),),
                        ((1.0, "bogus"),), ((1.0, -1),), ((1.0, True),),
                        np.array([POLICY_CHOICE])]),
                   # "map" is what "auto" (the baseline) picks on CPU.
                   memory=[("vmap", OK), (np.str_("map"), OK), ("VMAP", BAD), ("", BAD),
                           (None, BAD), (1, BAD), (["map"], BAD), (np.array("map"), BAD),
                           (np.array(["map", "vmap"]), BAD)],
                   batch_axis_name=[("batch", OK), (["batch"], BAD), ({}, BAD), ({"batch"}, BAD),
                                    ((["batch"],), BAD), (np.array(["batch"]), BAD)],
                   rtol=float_pool((0.5,), (-0.1,), huge=ANY),
                   atol=float_pool((0.5,), (-1.0,), huge=ANY),
                   ramp=[(v, e) for v, e in bool_pool() if v is not True],  # True: the baseline
                   bogus_option=[(1, BAD)],
               ),
               use=use_lookahead, combos=8),
        # Its own target: early_trial_window needs NO_BOOST among the candidates, so a
        # valid window and a valid candidate list without it would be an invalid pair.
        Target("Lookahead[early trial]", ao.Lookahead, dict(steps=1, early_trial_window=2),
               dict(
                   early_trial_window=int_pool(2, (3,), none_ok=True),
                   early_trial_progress=float_pool((0.5, 1.0), (0.0, -0.1, 1.5)),
               ),
               use=use_lookahead, combos=4),
        # A candidate boosts or cuts, never both: one target each, so that no random
        # combination of two valid values is an invalid pair.
        Target("Candidate", ao.Candidate, {},
               dict(
                   # 0.5 and 2 are in the Lookahead target's candidates pool.
                   boost_scale=float_pool((1000.0,), (-0.1, 1000.5)),
                   mix=MIX_SPECS,
                   bogus_option=[(1, BAD)],
               ),
               use=lambda c: use_lookahead(ao.Lookahead(steps=1, candidates=(c,))), combos=5),
        # cut=None is the other target's baseline (valid here too): not in this pool.
        Target("Candidate[cut]", ao.Candidate, dict(cut=0.5),
               dict(
                   cut=[(v, e) for v, e in float_pool((1.0,), (0.0, -0.5, 1.5, 1e-50))
                        if v is not None],
                   boost_scale=[(np.float32(1.0), OK), (0.5, BAD), (0.0, BAD),
                                (2.0, BAD), (float("nan"), BAD), (None, BAD), ("1", BAD)],
               ),
               use=lambda c: use_lookahead(ao.Lookahead(steps=1, candidates=(c,))), combos=5),
    ]


def cases(target: Target, *, combos: int, seed: int) -> list[Case]:
    """Every pool value alone, then ``combos`` random 2-3-argument changes."""
    out = [Case(target.name, {arg: value}, expect)
           for arg, pool in target.pools.items() for value, expect in pool]
    rng = np.random.default_rng(seed)
    names = sorted(target.pools)
    for _ in range(combos):
        chosen = rng.choice(len(names), size=min(len(names), int(rng.integers(2, 4))),
                            replace=False)
        changed, expects = {}, []
        for i in chosen:
            value, expect = target.pools[names[i]][rng.integers(len(target.pools[names[i]]))]
            changed[names[i]] = value
            expects.append(expect)
        overall = BAD if BAD in expects else (ANY if ANY in expects else OK)
        out.append(Case(target.name, changed, overall))
    return out


def _names_an_argument(message: str, changed: dict[str, Any]) -> bool:
    return any(arg in message for arg in changed)


def classify(target: Target, case: Case) -> Outcome:
    """Calls the constructor (and uses the result); returns the verdict."""
    kwargs = {**target.baseline, **case.changed}
    with warnings.catch_warnings():
        # An overflow warning (e.g. 1e300 cast to float32) is recorded as a failure.
        warnings.simplefilter("error")
        # Not a finding: another test process was writing that cache entry (tests/conftest.py).
        warnings.filterwarnings("ignore", "Error reading persistent compilation cache entry")
        try:
            obj = target.call(**kwargs)
        except (ValueError, TypeError) as err:
            if not _names_an_argument(str(err), case.changed):
                return Outcome(case, "unnamed", f"{type(err).__name__}: {err}")
            if case.expect == OK:
                return Outcome(case, "rejected_valid", f"{type(err).__name__}: {err}")
            return Outcome(case, "rejected")
        except Exception as err:  # noqa: BLE001 - the point is to catch every other kind
            return Outcome(case, "wrong_type", f"{type(err).__name__}: {err}")
        try:
            if target.use is not None:
                target.use(obj)
        except Exception as err:  # noqa: BLE001
            return Outcome(case, "late", f"{type(err).__name__}: {str(err)[:300]}")
    if case.expect == BAD:
        return Outcome(case, "accepted_invalid")
    return Outcome(case, "ok")


PASSING = ("ok", "rejected")


def run(*, combos: int = 25, seed: int = 0) -> list[Outcome]:
    """Runs the whole pass; returns one outcome per case."""
    outcomes = []
    for i, target in enumerate(targets()):
        n = combos if target.combos is None else target.combos
        for case in cases(target, combos=n, seed=seed + i):
            outcomes.append(classify(target, case))
    return outcomes


def finding_key(outcome: Outcome) -> tuple[str, str, str]:
    """``(constructor, argument(s), verdict)``: stable across value reprs."""
    return (outcome.case.constructor, "+".join(sorted(outcome.case.changed)), outcome.verdict)


def summarise(outcomes: list[Outcome]) -> dict[str, Any]:
    """Counts per constructor and verdict, the distinct findings, unexplained combinations.

    A failing combination is *explained* when one of its changed arguments,
    with the same value, also fails on its own.
    """
    per = collections.defaultdict(collections.Counter)
    for o in outcomes:
        per[o.case.constructor][o.verdict] += 1
    findings: dict[tuple[str, str, str], list[tuple[str, str]]] = {}
    failing_alone = set()
    for o in outcomes:
        if o.verdict not in PASSING and len(o.case.changed) == 1:
            findings.setdefault(finding_key(o), []).append(
                (_short(next(iter(o.case.changed.values()))), o.detail))
            (arg, value), = o.case.changed.items()
            failing_alone.add((o.case.constructor, arg, id(value)))
    unexplained = [
        o for o in outcomes
        if o.verdict not in PASSING and len(o.case.changed) > 1
        and not any((o.case.constructor, arg, id(v)) in failing_alone
                    for arg, v in o.case.changed.items())]
    return dict(
        cases=len(outcomes),
        passed=sum(o.verdict in PASSING for o in outcomes),
        single=sum(len(o.case.changed) == 1 for o in outcomes),
        per_constructor={k: dict(v) for k, v in per.items()},
        findings=findings,
        unexplained=unexplained,
    )


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def report(summary: dict[str, Any]) -> str:
    """The human-readable report (quoted in docs/reliability.md)."""
    lines = [f"cases {summary['cases']} ({summary['single']} single-argument), "
             f"passed {summary['passed']}"]
    for name, counts in summary["per_constructor"].items():
        lines.append(f"  {name}: {sum(counts.values())} cases, {dict(sorted(counts.items()))}")
    lines.append(f"findings ({len(summary['findings'])} distinct, single-argument cases):")
    for (ctor, arg, verdict), hits in summary["findings"].items():
        values = ", ".join(v for v, _ in hits)
        lines.append(f"  {ctor}({arg}=...) {verdict} for [{values}]: {hits[0][1][:140]}")
    lines.append(f"unexplained combinations: {len(summary['unexplained'])}")
    for o in summary["unexplained"]:
        lines.append(f"  {o.case.constructor}({o.case.changed}) {o.verdict}: {o.detail[:140]}")
    return "\n".join(lines)


if __name__ == "__main__":
    print(report(summarise(run())))
