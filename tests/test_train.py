"""The jitted train step: mix from the state, reference monitor, one compile, learning."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from helpers import tiny_data, tiny_run

from adaptive_optax import data, train
from adaptive_optax.losses import loss_components, mixed_loss
from adaptive_optax.metrics import dice_iou


def batch_of(d, n=8):
    return data.SegmentationData(*(jnp.asarray(a[:n]) for a in d))


def test_loss_uses_the_mix_in_the_state_and_monitor_the_reference():
    tr, _ = tiny_data()
    # rtol=0.5: no step improves enough, so every step after the first is a plateau.
    run = tiny_run(patience=0, accumulation_steps=1, rtol=0.5)
    step, state, graphdef = run["train_step"], run["state"], run["graphdef"]
    batch = batch_of(tr)
    for _ in range(3):  # step 1 intervenes, so later steps use a new mix
        # Copied to the host: the step donates (deletes) the state's buffers.
        weights = jax.device_get(optax.tree.get(train.opt_state_of(graphdef, state), "loss_weights"))
        model, _ = nnx.merge(graphdef, state)
        comps = loss_components(model(batch.images), batch.masks, batch.instances)
        state, metrics = step(state, batch)
        np.testing.assert_allclose(metrics.loss, mixed_loss(comps, weights), rtol=1e-5)
        np.testing.assert_allclose(metrics.monitor, mixed_loss(comps, run["policy"].initial_mix),
                                   rtol=1e-5)
    assert int(metrics.readings["intervention_count"]) == 2
    assert metrics.readings["weight/dice"].shape == ()


def test_monitor_loss_option_monitors_the_optimised_loss():
    run = tiny_run()
    step = train.make_train_step(run["graphdef"], monitor="loss")
    _, metrics = step(run["state"], batch_of(tiny_data()[0]))
    assert float(metrics.monitor) == float(metrics.loss)


def test_bad_monitor_arguments():
    run = tiny_run()
    with pytest.raises(ValueError, match="monitor"):
        train.make_train_step(run["graphdef"], monitor="val")
    with pytest.raises(ValueError, match="reference_weights"):
        train.make_train_step(run["graphdef"])


def test_a_run_with_interventions_compiles_the_step_once():
    tr, _ = tiny_data()
    run = tiny_run(patience=0, accumulation_steps=1, rtol=0.5)
    step, state = run["train_step"], run["state"]
    counts = []
    for epoch in range(3):
        for batch in data.batches(tr, 8, seed=0, epoch=epoch):
            state, metrics = step(state, data.SegmentationData(*map(jnp.asarray, batch)))
            counts.append(int(metrics.readings["intervention_count"]))
    assert counts[-1] == 3  # all interventions happened ...
    assert step._cache_size() == 1  # ... in one compiled program


def test_training_improves_dice_well_above_its_start():
    tr, va = tiny_data(n_train=64, n_val=16, difficulty=0.2)
    run = tiny_run(lr=1e-2, patience=2, accumulation_steps=8, width=8)
    step, evaluate_step, state = run["train_step"], run["eval_step"], run["state"]
    start, _ = dice_iou(train.evaluate(evaluate_step, state, va, 8))
    for epoch in range(10):
        for batch in data.batches(tr, 8, seed=0, epoch=epoch):
            state, _ = step(state, data.SegmentationData(*map(jnp.asarray, batch)))
    end, _ = dice_iou(train.evaluate(evaluate_step, state, va, 8))
    assert end[0] > 0.8
    assert end[0] > start[0] + 0.3


def test_evaluate_rejects_a_batch_larger_than_the_data():
    run = tiny_run()
    _, va = tiny_data(n_val=4)
    with pytest.raises(ValueError, match="batch_size"):
        train.evaluate(run["eval_step"], run["state"], va, 8)
