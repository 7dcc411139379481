"""The jitted train step: mix from the state, reference monitor, one compile, learning."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from helpers import tiny_data, tiny_run

from adaptive_optax.segmentation import data, strategies, train
from adaptive_optax.segmentation.losses import loss_components, mixed_loss
from adaptive_optax.segmentation.metrics import confusion_counts, dice_iou
from adaptive_optax.segmentation.unet import UNet


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


REFERENCE = {"dice": 0.4, "focal": 0.3, "variance": 0.1, "bce": 0.2}


@pytest.mark.parametrize("kwargs, match", [
    (dict(loss_names="dice"), r"loss_names must be a sequence .* got the string 'dice'"),
    (dict(loss_names=("dice", "hinge")),
     r"Unknown loss component name\(s\) \['hinge'\] in loss_names"),
    (dict(loss_names=()), r"loss_names must be a non-empty sequence"),
    (dict(reference_weights={"dice": 1.0}),
     r"reference_weights must have exactly the keys of loss_names"),
    (dict(reference_weights={**REFERENCE, "dice": float("nan")}),
     r"reference_weights\['dice'\] must be a finite number in \[0,"),
    (dict(reference_weights={**REFERENCE, "bce": -1.0}),
     r"reference_weights\['bce'\] must be a finite number in \[0,"),
])
def test_bad_loss_arguments_fail_at_construction(kwargs, match):
    run = tiny_run()
    with pytest.raises(ValueError, match=match):
        train.make_train_step(run["graphdef"], **{"reference_weights": REFERENCE, **kwargs})


def test_an_optimizer_without_plateau_escape_is_named_in_the_error():
    model = UNet(1, 1, depth=1, base_width=4, rngs=nnx.Rngs(0))
    graphdef, state = train.init_train_state(model, optax.adam(1e-3))
    step = train.make_train_step(graphdef, reference_weights=REFERENCE)
    with pytest.raises(ValueError, match="build the optimizer with adaptive_optax.plateau_escape"):
        step(state, batch_of(tiny_data()[0]))


def test_a_nonfinite_batch_leaves_batchnorm_statistics_as_they_were():
    model = UNet(1, 1, depth=1, base_width=4, norm="batch", rngs=nnx.Rngs(0))
    tx = strategies.make_optimizer("adaptive", 1e-3, total_steps=10)
    graphdef, state = train.init_train_state(model, tx)
    step = train.make_train_step(graphdef, reference_weights=REFERENCE)
    batch = batch_of(tiny_data()[0])
    state, _ = step(state, batch)
    stats = lambda s: jax.device_get(nnx.pure(nnx.state(nnx.merge(graphdef, s)[0], nnx.BatchStat)))
    before = stats(state)
    bad = batch._replace(images=batch.images.at[0, 0, 0, 0].set(jnp.nan))
    state, metrics = step(state, bad)
    assert int(metrics.readings["nonfinite_grad_count"]) == 1  # the update was skipped ...
    chex.assert_trees_all_equal(stats(state), before)  # ... and so was the statistics' update
    state, _ = step(state, batch)  # a clean step updates them again
    assert not np.allclose(jax.tree.leaves(stats(state))[0], jax.tree.leaves(before)[0])
    model, _ = nnx.merge(graphdef, state)
    model.eval()
    assert bool(jnp.all(jnp.isfinite(model(batch.images))))
    assert step._cache_size() == 1


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


@pytest.mark.parametrize("n_val", [4, 12, 16])
def test_evaluate_counts_every_example_once_with_one_compile(n_val):
    # 4 < batch and 12 = 8 + 4: the last batch is padded, and its padding counts 0.
    run = tiny_run()
    _, va = tiny_data(n_val=n_val)
    eval_step = train.make_eval_step(run["graphdef"])
    counts = train.evaluate(eval_step, run["state"], va, 8)
    model, _ = nnx.merge(run["graphdef"], run["state"])
    model.eval()
    whole = confusion_counts(model(jnp.asarray(va.images)), jnp.asarray(va.masks))
    np.testing.assert_allclose(counts, whole, rtol=1e-6)
    assert float(counts[0, 2]) == float(np.sum(np.asarray(va.masks) > 0.5))
    assert eval_step._cache_size() == 1


def test_evaluate_rejects_bad_arguments():
    run = tiny_run()
    _, va = tiny_data(n_val=4)
    with pytest.raises(ValueError, match=r"batch_size must be an integer in \[1,"):
        train.evaluate(run["eval_step"], run["state"], va, 0)
    empty = data.SegmentationData(*(a[:0] for a in va))
    with pytest.raises(ValueError, match="at least one example"):
        train.evaluate(run["eval_step"], run["state"], empty, 8)


def test_the_eval_step_evaluates_schedule_free_at_its_average():
    tx = strategies.make_optimizer("schedule-free", 3e-2, total_steps=12, accumulation_steps=4)
    graphdef, state = train.init_train_state(nnx.Conv(1, 1, (3, 3), rngs=nnx.Rngs(0)), tx)
    step = train.make_train_step(graphdef, reference_weights={
        "dice": 0.4, "focal": 0.3, "variance": 0.1, "bce": 0.2})
    batch = data.synthetic_shapes(4, size=16, seed=0)
    for _ in range(6):
        state, _ = step(state, batch)
    raw = train.make_eval_step(graphdef)(state, batch)
    averaged = train.make_eval_step(graphdef, strategies.eval_params_for("schedule-free"))(
        state, batch)
    # The same counts as a model holding schedule-free's evaluation parameters.
    model, optimizer = nnx.merge(graphdef, state)
    params = nnx.pure(nnx.state(model, nnx.Param))
    nnx.update(model, strategies.eval_params("schedule-free", nnx.pure(optimizer.opt_state),
                                             params))
    model.eval()
    expected = confusion_counts(model(batch.images), batch.masks)
    chex.assert_trees_all_close(averaged, expected, rtol=1e-6)
    assert not np.allclose(np.asarray(raw), np.asarray(averaged))  # y is not the average


def test_eval_params_for_names_only_the_schedule_free_strategies():
    assert all(strategies.eval_params_for(s) is None
               for s in strategies.STRATEGIES if s not in strategies.SCHEDULE_FREE)
    assert all(strategies.eval_params_for(s) is not None for s in strategies.SCHEDULE_FREE)
    with pytest.raises(ValueError, match="strategy must be one of"):
        strategies.eval_params_for("sgd")
