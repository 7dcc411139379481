"""The training loop's history and intervention log."""

import numpy as np
import pytest
from helpers import tiny_data, tiny_run

from adaptive_optax.segmentation import loop


@pytest.fixture(scope="module")
def fitted():
    tr, va = tiny_data()
    run = tiny_run(patience=0, accumulation_steps=2)
    state, history = loop.fit(run["train_step"], run["eval_step"], run["state"], tr, va,
                              epochs=3, batch_size=8, mix_label=run["policy"].mix_label)
    return run, history


def test_history_has_one_row_per_step_and_one_eval_per_epoch(fitted):
    _, history = fitted
    assert len(history.steps["loss"]) == 3 * 4
    assert history.evals["epoch"] == [0, 1, 2]
    assert history.evals["step"] == [4, 8, 12]
    assert {"learning_rate", "grad_norm_ema", "weight/dice", "mix_index"} <= set(history.steps)


def test_intervention_log_matches_the_per_step_series(fitted):
    run, history = fitted
    counts = history.array("intervention_count")
    steps = [e["step"] for e in history.interventions]
    assert steps == [int(i) for i in np.flatnonzero(np.diff(counts)) + 1]
    for event in history.interventions:
        i = event["step"]
        assert event["lr_after"] == history.steps["learning_rate"][i]
        assert event["lr_before"] == history.steps["learning_rate"][i - 1]
        assert event["mix_after"] == run["policy"].mix_label(history.steps["mix_index"][i])
    assert len(history.interventions) >= 1
    if counts[-1] == 3:
        assert history.interventions[-1]["mix_after"] == "final"


def test_history_json_round_trip(fitted):
    _, history = fitted
    again = loop.History.from_json(history.to_json())
    assert again.to_json() == history.to_json()  # NaN != NaN, so compare the text
    assert again.steps["loss"] == history.steps["loss"]


def test_steps_per_epoch_caps_an_epoch():
    tr, va = tiny_data()
    run = tiny_run()
    _, history = loop.fit(run["train_step"], run["eval_step"], run["state"], tr, va,
                          epochs=1, batch_size=8, steps_per_epoch=2)
    assert len(history.steps["loss"]) == 2


@pytest.mark.parametrize("kwargs, match", [
    (dict(epochs=-1), r"epochs must be an integer in \[0,"),
    (dict(epochs=2, start_epoch=3), r"start_epoch must be an integer in \[0, 2\]"),
    (dict(epochs=2, steps_per_epoch=0), r"steps_per_epoch must be an integer in \[1,"),
    (dict(epochs=2, steps_per_epoch=-1), r"steps_per_epoch must be an integer in \[1,"),
])
def test_bad_arguments_fail_before_the_first_step(kwargs, match):
    tr, va = tiny_data()
    run = tiny_run()
    calls = []

    def step(state, batch):
        calls.append(1)
        return run["train_step"](state, batch)

    with pytest.raises(ValueError, match=match):
        loop.fit(step, run["eval_step"], run["state"], tr, va, batch_size=8, **kwargs)
    assert calls == []


def test_an_empty_validation_set_fails_before_the_first_step():
    tr, va = tiny_data()
    run = tiny_run()
    empty = type(va)(*(a[:0] for a in va))
    with pytest.raises(ValueError, match="val_data must hold at least one example"):
        loop.fit(run["train_step"], run["eval_step"], run["state"], tr, empty, epochs=1,
                 batch_size=8)


def test_the_logged_boost_is_the_target_of_a_warm_up_ramp():
    # On the intervention step a ramp has only begun (lr_multiplier is its
    # first value); the log reports the boost the intervention set.
    tr, va = tiny_data()
    run = tiny_run(patience=0, accumulation_steps=2, boost_warmup_steps=8)
    _, history = loop.fit(run["train_step"], run["eval_step"], run["state"], tr, va,
                          epochs=3, batch_size=8)
    event = history.interventions[0]
    multiplier = history.array("lr_multiplier")
    assert event["boost"] == history.steps["boost_to"][event["step"]]
    assert multiplier[event["step"]] < event["boost"] * 0.9  # still ramping
    assert event["boost"] in (15.0, 10.0, 5.0, 3.0)  # an undamped first boost of the table


def test_a_rollback_logs_the_multiplier_it_restored():
    # After a rollback boost_to is the restored trajectory's target, which a
    # decay may have left far behind: the log reports what was set.
    row = dict(intervention_count=1, rollback_count=0, windows_completed=3, grad_norm_ema=0.1,
               learning_rate=2e-3, lr_multiplier=2.1, boost_to=2.1, mix_index=0)
    rolled = dict(row, rollback_count=1, learning_rate=1e-3, lr_multiplier=1.0, boost_to=3.0,
                  mix_index=4)
    history = loop.History()
    loop._log_interventions(history, [row, rolled], None, 10, 2, str)
    (event,) = history.interventions
    assert event["kind"] == "rollback" and event["step"] == 11
    assert event["boost"] == 1.0 and event["lr_after"] == 1e-3
