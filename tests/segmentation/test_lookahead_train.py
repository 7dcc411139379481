"""The train step with a lookahead: value_fn from the loss components, probe batch, records."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from helpers import tiny_data

import adaptive_optax as ao
from adaptive_optax.lookahead import POLICY_CHOICE, Candidate, Lookahead
from adaptive_optax.segmentation import data, loop, train
from adaptive_optax.segmentation.policies import adaptive_mix_policy
from adaptive_optax.segmentation.unet import UNet


def batch_of(d, start=0, n=8):
    return data.SegmentationData(*(jnp.asarray(a[start:start + n]) for a in d))


TWO = (POLICY_CHOICE, Candidate(0.0, "current"))


def tiny():
    return tiny_data(n_train=8, n_val=8, size=16)


def setup(trial, *, rtol=0.5, **kwargs):
    """A tiny U-Net whose every step after the first is a plateau (rtol=0.5)."""
    policy = adaptive_mix_policy()
    model = UNet(1, 1, depth=0, base_width=4, rngs=nnx.Rngs(jax.random.key(0, impl="rbg")))
    tx = ao.plateau_escape(optax.adam, 3e-3, patience=0, rtol=rtol, policy=policy,
                           lookahead=trial)
    graphdef, state = train.init_train_state(model, tx)
    step = train.make_train_step(graphdef, reference_weights=policy.initial_mix, **kwargs)
    return graphdef, state, step, policy


@pytest.fixture(scope="module")
def two():
    """One compiled step with two candidates (policy, no boost), shared by the tests:
    ``fresh()`` is a new initial state for it."""
    graphdef, _, step, policy = setup(Lookahead(steps=1, candidates=TWO))
    return graphdef, lambda: setup(Lookahead(steps=1, candidates=TWO))[1], step, policy


def test_the_trials_are_scored_by_the_steps_monitor_on_the_batch(two):
    graphdef, fresh, step, _ = two
    state = fresh()
    batch = batch_of(tiny()[0])
    state, metrics = step(state, batch)
    assert np.isnan(np.asarray(metrics.readings["trial_values"])).all()
    assert int(metrics.readings["trial_choice"]) == -1
    state, metrics = step(state, batch)
    values = np.asarray(metrics.readings["trial_values"])
    assert values.shape == (2,) and np.isfinite(values).all()
    assert int(metrics.readings["intervention_count"]) == 1
    assert int(metrics.readings["trial_choice"]) == int(np.argmin(values))
    # Each trial starts where this step's monitor was taken: same params, batch, reference mix.
    curves = np.asarray(ao.state_field(train.opt_state_of(graphdef, state), "trial_curves"))
    np.testing.assert_allclose(curves[:, 0], float(metrics.monitor), rtol=1e-5)


def test_one_candidate_is_the_plain_step_bit_for_bit():
    batch = batch_of(tiny()[0])
    runs = []
    for lookahead in (None, Lookahead(steps=1, candidates=(POLICY_CHOICE,))):
        _, state, step, _ = setup(lookahead)
        for _ in range(4):
            state, metrics = step(state, batch)
        runs.append((state, metrics))
    (plain, plain_metrics), (tried, tried_metrics) = runs
    assert int(tried_metrics.readings["intervention_count"]) == 3  # trials at steps 2-4
    assert int(tried_metrics.readings["trial_choice"]) == 0
    model_plain, _ = nnx.merge(setup(None)[0], plain)
    graphdef_tried = setup(Lookahead(steps=1, candidates=(POLICY_CHOICE,)))[0]
    model_tried, _ = nnx.merge(graphdef_tried, tried)
    chex.assert_trees_all_equal(nnx.state(model_tried), nnx.state(model_plain))
    assert float(tried_metrics.loss) == float(plain_metrics.loss)


def test_a_probe_batch_scores_the_trials_without_a_recompile(two):
    _, fresh, step, _ = two
    state = fresh()
    tr, va = tiny()
    batch, probe = batch_of(tr), batch_of(va)
    state, on_batch = step(state, batch, probe)
    compiled = step._cache_size()
    state, on_batch = step(state, batch, probe)  # the first trial: the same program
    assert step._cache_size() == compiled
    values_probe = np.asarray(on_batch.readings["trial_values"])
    assert np.isfinite(values_probe).all()
    # The same state and batch, scored on the batch itself: other values.
    state2, _ = step(fresh(), batch)
    state2, on_itself = step(state2, batch)
    assert not np.allclose(values_probe, np.asarray(on_itself.readings["trial_values"]))


def test_lookahead_true_needs_a_lookahead_and_false_passes_no_value_fn():
    _, state, step, _ = setup(None, lookahead=True)
    with pytest.raises(ValueError, match="lookahead=True"):
        step(state, batch_of(tiny()[0]))
    _, state, step, _ = setup(Lookahead(steps=1, candidates=TWO), lookahead=False)
    with pytest.raises(ValueError, match="value_fn"):
        step(state, batch_of(tiny()[0]))
    with pytest.raises(TypeError, match="lookahead must be"):
        train.make_train_step(setup(None)[0], reference_weights=adaptive_mix_policy().initial_mix,
                              lookahead="yes")


def test_the_history_and_intervention_log_record_every_candidates_trial(two):
    graphdef, fresh, step, policy = two
    state = fresh()
    tr, va = tiny()
    _, history = loop.fit(step, train.make_eval_step(graphdef), state, tr, va, epochs=2,
                          batch_size=4, mix_label=policy.mix_label)
    trial_values = history.array("trial_values")
    assert trial_values.shape == (4, 2)
    logged = [r for r in history.interventions if r["kind"] == "intervention"]
    assert len(logged) == 3
    for record in logged:
        values = trial_values[record["step"]]
        assert record["trial_values"] == pytest.approx(values.tolist())
        assert record["trial_choice"] == int(np.argmin(values))
        curves = np.asarray(record["trial_curves"])  # [K, steps + 1]: the last value is the score
        assert curves.shape == (2, 2) and curves[:, -1] == pytest.approx(values.tolist())
    assert "trial_curves" not in history.steps  # the log holds them, not every step
    restored = loop.History.from_json(history.to_json()).interventions[0]
    assert "trial_values" in restored and "trial_curves" in restored
