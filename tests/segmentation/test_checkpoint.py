"""Orbax checkpoints: bit-identical resume, clear errors on a config mismatch."""

import json

import jax
import numpy as np
import pytest
from helpers import tiny_data, tiny_run

import adaptive_optax as ao
from adaptive_optax import state as ao_state
from adaptive_optax.segmentation import checkpoint, data, loop, train

CONFIG = {"strategy": "adaptive", "width": 4}


def fit(run, tr, va, **kwargs):
    return loop.fit(run["train_step"], run["eval_step"], run["state"], tr, va, batch_size=8,
                    mix_label=run["policy"].mix_label, **kwargs)


def test_resume_continues_bit_identically(tmp_path):
    tr, va = tiny_data()
    saved = {}

    def save_after_epoch_1(epoch, state, history):
        if epoch == 1:
            checkpoint.save(str(tmp_path), epoch, state, history, CONFIG)
            saved["plateau_count"] = history.steps["plateau_count"][-1]

    full_state, full = fit(tiny_run(), tr, va, epochs=4, on_epoch_end=save_after_epoch_1)
    assert checkpoint.latest_epoch(str(tmp_path)) == 1

    fresh = tiny_run()
    state, history, epoch = checkpoint.restore(str(tmp_path), fresh["state"], CONFIG)
    assert epoch == 1
    assert history.steps["plateau_count"][-1] == saved["plateau_count"]
    assert int(ao.state_field(train.opt_state_of(fresh["graphdef"], state), "plateau_count")) \
        == saved["plateau_count"]
    fresh["state"] = state
    resumed_state, resumed = fit(fresh, tr, va, epochs=4, start_epoch=2, history=history)
    assert resumed.steps["loss"] == full.steps["loss"]
    assert resumed.steps["learning_rate"] == full.steps["learning_rate"]
    assert resumed.interventions == full.interventions
    for a, b in zip(jax.tree.leaves(full_state), jax.tree.leaves(resumed_state)):
        np.testing.assert_array_equal(a, b)


def test_config_mismatch_is_a_clear_error(tmp_path):
    run = tiny_run()
    checkpoint.save(str(tmp_path), 0, run["state"], loop.History(), CONFIG)
    with pytest.raises(checkpoint.CheckpointMismatchError, match="width"):
        checkpoint.restore(str(tmp_path), run["state"], {**CONFIG, "width": 8})


def test_state_structure_mismatch_is_a_clear_error(tmp_path):
    checkpoint.save(str(tmp_path), 0, tiny_run(width=4)["state"], loop.History(), CONFIG)
    with pytest.raises(checkpoint.CheckpointMismatchError, match="does not match"):
        checkpoint.restore(str(tmp_path), tiny_run(width=8)["state"], CONFIG)


def test_missing_checkpoint(tmp_path):
    assert checkpoint.latest_epoch(str(tmp_path / "none")) is None
    with pytest.raises(FileNotFoundError):
        checkpoint.restore(str(tmp_path), tiny_run()["state"], CONFIG)
    with pytest.raises(FileNotFoundError, match="no such directory"):
        checkpoint.restore(str(tmp_path / "typo"), tiny_run()["state"], CONFIG)
    assert not (tmp_path / "typo").exists()  # a mistyped path is not created


def test_a_new_save_replaces_later_epochs_of_an_older_run(tmp_path):
    # A fresh run into the same directory: its epoch 0 must not be dropped
    # because the old run's epoch 3 is newer.
    old, new = tiny_run(seed=0), tiny_run(seed=1)
    for epoch in (2, 3):
        checkpoint.save(str(tmp_path), epoch, old["state"], loop.History(), CONFIG)
    checkpoint.save(str(tmp_path), 0, new["state"], loop.History(), {**CONFIG, "run": "new"})
    assert checkpoint.latest_epoch(str(tmp_path)) == 0
    state, _, epoch = checkpoint.restore(str(tmp_path), old["state"], {**CONFIG, "run": "new"})
    assert epoch == 0
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(new["state"])):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match=r"epoch must be an integer in \[0,"):
        checkpoint.save(str(tmp_path), -1, new["state"], loop.History(), CONFIG)


def test_restoring_mid_process_compiles_nothing_new_and_warns_nothing(tmp_path, caplog):
    tr, _ = tiny_data()
    run = tiny_run()
    batch = next(iter(data.batches(tr, 8, seed=0, epoch=0)))
    batch = data.SegmentationData(*map(jax.numpy.asarray, batch))
    state, _ = run["train_step"](run["state"], batch)
    checkpoint.save(str(tmp_path), 0, state, loop.History(), CONFIG)
    with caplog.at_level("WARNING"):
        restored, _, _ = checkpoint.restore(str(tmp_path), state, CONFIG)
    assert [r.getMessage() for r in caplog.records if r.levelname == "WARNING"] == []
    run["train_step"](restored, batch)
    assert run["train_step"]._cache_size() == 1


def test_a_checkpoint_records_the_packed_layout_and_round_trips(tmp_path):
    run = tiny_run()
    checkpoint.save(str(tmp_path), 0, run["state"], loop.History(), CONFIG)
    layout = json.loads((tmp_path / "0" / "meta" / "metadata").read_text())["layout"]
    assert layout["packed_floats"] == list(ao_state.FLOAT_FIELDS)
    assert layout["packed_ints"] == [*ao_state.INT_FIELDS, "rng_key[0]", "rng_key[1]"]
    assert layout["plan_lengths"] == {"1/opt_state": 3}  # one opt state, max_interventions 3
    state, _, _ = checkpoint.restore(str(tmp_path), tiny_run(seed=1)["state"], CONFIG)
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(run["state"])):
        np.testing.assert_array_equal(a, b)


def test_a_reordered_packed_layout_of_the_same_length_is_refused(tmp_path, monkeypatch):
    # Another version with two fields swapped: the shapes all match, so only
    # the recorded layout tells that window_sum would be restored as window_m2.
    run = tiny_run()
    checkpoint.save(str(tmp_path), 0, run["state"], loop.History(), CONFIG)
    original, fields = list(ao_state.FLOAT_FIELDS), list(ao_state.FLOAT_FIELDS)
    i, j = fields.index("window_sum"), fields.index("window_m2")
    fields[i], fields[j] = fields[j], fields[i]
    monkeypatch.setattr(ao_state, "FLOAT_FIELDS", tuple(fields))
    with pytest.raises(checkpoint.CheckpointMismatchError) as info:
        checkpoint.restore(str(tmp_path), run["state"], CONFIG)
    message = str(info.value)
    assert f"packed_floats layout differs: checkpoint has {original}" in message
    assert f"this version has {fields}" in message
    assert f"first difference at index {i}: 'window_sum' vs 'window_m2'" in message
    assert "['window_m2', 'window_sum']" in message  # the fields that moved
    assert "packed_ints" not in message.split("restored into other fields:")[1]


def test_an_inserted_int_field_that_keeps_the_length_is_refused(tmp_path, monkeypatch):
    # A field inserted while the plan got one entry shorter: packed_ints has
    # the same length, every value after the insertion would shift by one.
    run = tiny_run()
    checkpoint.save(str(tmp_path), 0, run["state"], loop.History(), CONFIG)
    fields = list(ao_state.INT_FIELDS)
    fields.insert(1, "new_counter")
    monkeypatch.setattr(ao_state, "INT_FIELDS", tuple(fields))
    with pytest.raises(checkpoint.CheckpointMismatchError) as info:
        checkpoint.restore(str(tmp_path), run["state"], CONFIG)
    message = str(info.value)
    assert "packed_ints layout differs" in message
    assert "first difference at index 1: 'window_finite' vs 'new_counter'" in message
    assert "planned_mix_index length differs at 1/opt_state: checkpoint has 3, this state has 2" \
        in message


def test_a_checkpoint_without_a_recorded_layout_is_refused(tmp_path):
    # As written before the layout was recorded.
    run = tiny_run()
    checkpoint.save(str(tmp_path), 0, run["state"], loop.History(), CONFIG)
    path = tmp_path / "0" / "meta" / "metadata"
    meta = json.loads(path.read_text())
    del meta["layout"]
    path.write_text(json.dumps(meta))
    with pytest.raises(checkpoint.CheckpointMismatchError,
                       match="records no layout of the packed plateau-escape state"):
        checkpoint.restore(str(tmp_path), run["state"], CONFIG)
