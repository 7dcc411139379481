"""Orbax checkpoints of a whole training run: arrays, history and run config.

A checkpoint holds the train state (model parameters, batch statistics and the
full optimizer state: plateau counters, gradient-norm EMA, PRNG key, the inner
optimizer's moments), the :class:`~adaptive_optax.segmentation.loop.History` so far and the
run's configuration. Data order is a pure function of ``(seed, epoch)``, so a
run resumed at an epoch boundary repeats the uninterrupted run bit for bit.

Restoring into a state built from a different configuration (another model
size, another optimizer, a rollback guard on or off) raises a
:class:`CheckpointMismatchError` that says what differs, never silently
restores the wrong arrays.

The plateau-escape state packs its scalars into two vectors by position
(:mod:`adaptive_optax.state`). A checkpoint records that layout (the field
names of ``packed_floats`` and ``packed_ints`` in order, and the length of
the planned-mix plan), and a restore compares it with this version's before
reading any array: a version that reordered or inserted fields would
otherwise restore values into the wrong fields, silently whenever the total
length is unchanged. A checkpoint that records no layout (written before it
was recorded) is refused for the same reason.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from adaptive_optax import state as packed_state
from adaptive_optax._validation import check_int
from adaptive_optax.segmentation.loop import History


class CheckpointMismatchError(ValueError):
    """The checkpoint was written by a run with another configuration."""


def _manager(directory: str, *, create: bool = True,
             max_to_keep: int | None = 3) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=create)
    # Handlers named up front, so reading one item's metadata needs no restore first.
    handlers = {"state": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()}
    return ocp.CheckpointManager(os.path.abspath(directory), options=options,
                                 item_handlers=handlers)


def save(directory: str, epoch: int, state, history: History, config: Mapping[str, Any]) -> None:
    """Saves the state after ``epoch`` (0-based) with the history and config.

    Saved epochs ``>= epoch`` are deleted first: they belong to a run that this
    one replaces (a fresh run in the same directory, or one resumed from an
    earlier epoch), and keeping them would let ``restore`` pick the other
    run's state.

    Args:
        directory: Checkpoint directory (one sub-directory per saved epoch).
        epoch: The epoch just completed, ``>= 0``.
        state: The nnx train state.
        history: The run's history so far.
        config: JSON-serialisable run configuration, compared on restore.

    Raises:
        RuntimeError: If Orbax reports that it did not save.
    """
    epoch = check_int("epoch", epoch, 0)
    with _manager(directory) as manager:
        for stale in manager.all_steps():
            if stale >= epoch:
                manager.delete(stale)
        saved = manager.save(epoch, args=ocp.args.Composite(
            state=ocp.args.StandardSave(nnx.to_pure_dict(state)),
            meta=ocp.args.JsonSave({"history": json.loads(history.to_json()),
                                    "config": dict(config), "epoch": epoch,
                                    "layout": _layout(_signature(nnx.to_pure_dict(state)))}),
        ))
        manager.wait_until_finished()
    if not saved:
        raise RuntimeError(f"orbax did not save epoch {epoch} in {directory!r}.")


def latest_epoch(directory: str) -> int | None:
    """The newest saved epoch in ``directory``, or ``None`` if there is none."""
    if not os.path.isdir(directory):
        return None
    with _manager(directory, create=False) as manager:
        return manager.latest_step()


def restore(directory: str, state, config: Mapping[str, Any], epoch: int | None = None):
    """Restores ``(state, history, epoch)`` into the structure of ``state``.

    Args:
        directory: Checkpoint directory.
        state: A freshly built train state of the same configuration; only its
            structure, shapes and dtypes are used.
        config: This run's configuration; it must equal the saved one.
        epoch: Which saved epoch to restore (default: the latest).

    Returns:
        ``(state, history, epoch)`` with ``epoch`` the last completed epoch.

    Raises:
        FileNotFoundError: If ``directory`` holds no checkpoint (it is not
            created).
        CheckpointMismatchError: If the configuration, tree structure, shapes
            or dtypes differ from the saved ones, or if ``state`` holds a
            plateau-escape state and the checkpoint's packed-field layout
            differs from this version's or was not recorded.
    """
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"no checkpoint in {directory!r}: no such directory.")
    with _manager(directory, create=False) as manager:
        epoch = manager.latest_step() if epoch is None else epoch
        if epoch is None:
            raise FileNotFoundError(f"no checkpoint in {directory!r}.")
        meta = manager.restore(epoch, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
        saved_config = meta["config"]
        current = json.loads(json.dumps(dict(config)))
        if saved_config != current:
            diff = sorted(k for k in set(saved_config) | set(current)
                          if saved_config.get(k) != current.get(k))
            raise CheckpointMismatchError(
                f"checkpoint in {directory!r} was written with another configuration; "
                f"differing keys: {', '.join(f'{k} (saved {saved_config.get(k)!r}, now {current.get(k)!r})' for k in diff)}.")
        target = nnx.to_pure_dict(state)
        want = _signature(target)
        _check_layout(meta.get("layout"), _layout(want), directory)
        # Compare shapes and dtypes from the metadata first: a restore that fails
        # half-way leaves Orbax's aborted reads running in the background.
        saved = manager.item_metadata(epoch)["state"].tree
        _check_same(want, _signature(saved), directory)
        # Read to the host, then placed like the fresh state's arrays: arrays
        # committed to a device by Orbax would make jit compile the train
        # step a second time if the fresh state's were not.
        host = jax.tree.map(lambda x: np.zeros(x.shape, x.dtype), target)
        arrays = manager.restore(epoch, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(host)))["state"]
    arrays = jax.tree.map(_place_like, arrays, target)
    restored = jax.tree.map(lambda x: x, state)
    nnx.replace_by_pure_dict(restored, arrays)
    return restored, History(**meta["history"]), int(meta["epoch"])


def _place_like(value: np.ndarray, like) -> jax.Array:
    """``value`` placed like ``like``: on its devices, uncommitted on the default one."""
    sharding = getattr(like, "sharding", None)
    if sharding is None or sharding.device_set == {jax.devices()[0]}:
        return jnp.asarray(value)
    return jax.device_put(value, sharding)


def _signature(tree) -> dict[tuple[str, ...], tuple[tuple[int, ...], str]]:
    """Path (as strings) -> (shape, dtype) of every array leaf."""
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        key = tuple(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path)
        out[key] = (tuple(leaf.shape), np.dtype(leaf.dtype).name)
    return out


def _layout(signature: dict) -> dict[str, Any]:
    """The packed-field layout of this version, and the plan length of each packed state.

    A plateau-escape state is found as sibling ``packed_floats`` and
    ``packed_ints`` arrays; its plan length is what follows the int fields
    and the PRNG key words in ``packed_ints``. The field tuples are read from
    :mod:`adaptive_optax.state` at call time.
    """
    ints = list(packed_state.INT_FIELDS)
    key_words = [f"rng_key[{i}]" for i in range(packed_state._KEY_WORDS)]
    plans = {}
    for path, (shape, _) in signature.items():
        if path and path[-1] == "packed_ints" and path[:-1] + ("packed_floats",) in signature:
            plans["/".join(path[:-1])] = int(shape[-1]) - len(ints) - len(key_words) if shape else 0
    return {"packed_floats": list(packed_state.FLOAT_FIELDS), "packed_ints": ints + key_words,
            "plan_lengths": plans}


def _check_layout(saved: dict | None, current: dict, directory: str) -> None:
    """Raises if the packed fields of ``saved`` would land in other fields now."""
    if not current["plan_lengths"]:
        return  # no packed state to restore into: nothing is read by position
    where = f"checkpoint in {directory!r}"
    if saved is None:
        raise CheckpointMismatchError(
            f"{where} records no layout of the packed plateau-escape state (the field order of "
            "packed_floats and packed_ints): it was written by an older version of "
            "adaptive_optax, and its packed values cannot be matched to this version's fields "
            "by position without guessing. Restore it with the version that wrote it, or start "
            "a fresh run.")
    parts = []
    for name in ("packed_floats", "packed_ints"):
        got, want = list(saved.get(name, [])), current[name]
        if got != want:
            i = next(i for i in range(max(len(got), len(want)))
                     if i >= len(got) or i >= len(want) or got[i] != want[i])
            a = repr(got[i]) if i < len(got) else "(end)"
            b = repr(want[i]) if i < len(want) else "(end)"
            moved = sorted({f for f in set(got) | set(want)
                            if f not in got or f not in want or got.index(f) != want.index(f)})
            parts.append(f"{name} layout differs: checkpoint has {got}, this version has {want}; "
                         f"first difference at index {i}: {a} vs {b}; fields at another "
                         f"position or missing on one side: {moved}")
    saved_plans = saved.get("plan_lengths", {})
    for where_in, n in current["plan_lengths"].items():
        if where_in in saved_plans and saved_plans[where_in] != n:
            parts.append(f"planned_mix_index length differs at {where_in}: checkpoint has "
                         f"{saved_plans[where_in]}, this state has {n} (one entry per allowed intervention)")
    if parts:
        raise CheckpointMismatchError(
            f"{where} does not have this version's layout of the packed plateau-escape state, "
            f"so its values would be restored into other fields: {'; '.join(parts)}.")


def _check_same(want: dict, got: dict, directory: str) -> None:
    if want == got:
        return
    missing, extra = sorted(set(want) - set(got)), sorted(set(got) - set(want))
    changed = sorted(k for k in set(want) & set(got) if want[k] != got[k])
    parts = []
    if missing:
        parts.append(f"{len(missing)} arrays missing from it (e.g. {'/'.join(missing[0])})")
    if extra:
        parts.append(f"{len(extra)} arrays this run does not have (e.g. {'/'.join(extra[0])})")
    if changed:
        k = changed[0]
        parts.append(f"{len(changed)} arrays of another shape or dtype (e.g. {'/'.join(k)}: "
                     f"saved {got[k][0]} {got[k][1]}, expected {want[k][0]} {want[k][1]})")
    raise CheckpointMismatchError(
        f"checkpoint in {directory!r} does not match this run's state: {'; '.join(parts)}.")
