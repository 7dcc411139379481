"""Plateau detector: windows, improvement test, patience, cooldown, NaN handling."""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from adaptive_optax.plateau import PlateauDetector


def run(detector, values):
    """Feeds values through a jitted update; returns final state and per-step events."""
    update = jax.jit(detector.update)
    state = detector.init()
    events = []
    for v in values:
        state, event = update(state, jnp.float32(v))
        events.append(jax.tree.map(bool, event))
    return state, events


def plateau_steps(events):
    return [i for i, e in enumerate(events) if e.plateau]


def test_window_mean_and_first_window_improves():
    state, events = run(PlateauDetector(accumulation_steps=3), [3.0, 1.0, 2.0])
    assert [e.closed for e in events] == [False, False, True]
    assert events[-1].improved
    chex.assert_trees_all_close(state.window_value, 2.0)
    chex.assert_trees_all_close(state.best_value, 2.0)
    assert int(state.windows_completed) == 1
    assert int(state.window_step) == 0


@pytest.mark.parametrize("offset", [0.0, 1000.0])
def test_window_sd_is_the_spread_of_the_finite_values(offset):
    # A large offset (a loss far from 0) keeps its small spread in float32.
    first = offset + np.array([0.5, 0.7, 0.6, 0.4])
    second = offset + np.array([0.9, np.nan, 0.1, 0.5])
    state, _ = run(PlateauDetector(accumulation_steps=4), first)
    np.testing.assert_allclose(state.window_sd, np.std(first), rtol=1e-3)
    state, _ = run(PlateauDetector(accumulation_steps=4), np.concatenate([first, second]))
    np.testing.assert_allclose(state.window_sd, np.nanstd(second), rtol=1e-3)
    assert float(state.window_m2) == 0.0  # reset for the next window


def test_window_sd_of_a_one_step_window_is_zero():
    state, _ = run(PlateauDetector(), [1.0, 3.0])
    assert float(state.window_sd) == 0.0


@pytest.mark.parametrize("patience", [0, 1, 2, 4])
def test_patience_counts_non_improving_windows(patience):
    # First window sets the best; every later window is flat.
    _, events = run(PlateauDetector(patience=patience), [1.0] * 12)
    first = plateau_steps(events)[0]
    assert first == patience + 1  # window 0 improves, windows 1..patience+1 do not


def test_patience_zero_fires_on_first_bad_window_and_repeats():
    _, events = run(PlateauDetector(patience=0), [1.0, 1.0, 1.0, 0.5, 0.6])
    assert plateau_steps(events) == [1, 2, 4]


def test_plateau_resets_count_and_starts_cooldown():
    det = PlateauDetector(patience=1, cooldown=2)
    state, events = run(det, [1.0] * 9)
    # windows: 0 best, 1 bad(1), 2 bad(2) -> plateau, 3-4 cooldown, 5 bad(1), 6 plateau, 7-8 cooldown
    assert plateau_steps(events) == [2, 6]
    assert int(state.cooldown_count) == 0
    assert int(state.plateau_count) == 0


def test_improvement_during_cooldown_updates_best():
    det = PlateauDetector(patience=0, cooldown=2)
    state, events = run(det, [1.0, 1.0, 0.5])
    assert plateau_steps(events) == [1]
    chex.assert_trees_all_close(state.best_value, 0.5)


def test_relative_and_absolute_tolerance():
    det = PlateauDetector(patience=10, rtol=0.1, atol=0.0)
    state, events = run(det, [1.0, 0.95, 0.85])
    assert [e.improved for e in events] == [True, False, True]
    det = PlateauDetector(patience=10, rtol=0.0, atol=0.2)
    _, events = run(det, [1.0, 0.85, 0.75])
    assert [e.improved for e in events] == [True, False, True]


def test_negative_values_in_min_mode():
    # optax's (1 - rtol) * best - atol would demand -1.1 to beat -1.0 with rtol=0.1,
    # and would call -0.95 an improvement for a positive rtol on negative values.
    det = PlateauDetector(patience=10, rtol=0.1)
    _, events = run(det, [-1.0, -1.05, -1.2, -1.0])
    assert [e.improved for e in events] == [True, False, True, False]


def test_max_mode_for_scores():
    det = PlateauDetector(patience=0, mode="max", rtol=0.01)
    state, events = run(det, [0.5, 0.7, 0.705, 0.9])
    assert [e.improved for e in events] == [True, True, False, True]
    assert plateau_steps(events) == [2]
    chex.assert_trees_all_close(state.best_value, 0.9)


def test_max_mode_initial_best_is_minus_inf():
    state = PlateauDetector(mode="max").init()
    assert float(state.best_value) == -math.inf
    _, events = run(PlateauDetector(mode="max"), [-5.0])
    assert events[0].improved


def test_first_window_with_infinite_best_is_not_nan():
    det = PlateauDetector(rtol=0.5, atol=1.0)
    assert bool(det.is_better(jnp.float32(1e30), jnp.float32(jnp.inf)))
    assert not bool(det.is_better(jnp.float32(jnp.nan), jnp.float32(jnp.inf)))


def test_nonfinite_values_are_skipped_and_counted():
    det = PlateauDetector(accumulation_steps=4, patience=0)
    state, events = run(det, [1.0, np.nan, 3.0, np.inf])
    chex.assert_trees_all_close(state.window_value, 2.0)  # mean of the finite ones
    assert int(state.nonfinite_count) == 2


def test_all_nan_windows_never_declare_a_plateau():
    det = PlateauDetector(patience=0)
    state, events = run(det, [1.0] + [np.nan] * 20 + [-np.inf] * 5)
    assert plateau_steps(events) == []
    assert not any(e.valid for e in events[1:])
    chex.assert_trees_all_close(state.best_value, 1.0)
    assert int(state.plateau_count) == 0
    assert int(state.nonfinite_count) == 25


@pytest.mark.parametrize("values", [[3e38, 3e38], [1.0, 1.0, 3e38, 3e38], [-3e38, -3e38]])
def test_a_window_whose_finite_values_overflow_is_invalid(values):
    # The sum overflows to inf although every value is finite: no plateau, no best.
    det = PlateauDetector(accumulation_steps=2, patience=0)
    state, events = run(det, values)
    assert plateau_steps(events) == []
    assert not events[-1].valid
    assert int(state.nonfinite_count) == 0
    first_best = np.inf if len(values) == 2 else 1.0
    chex.assert_trees_all_close(state.best_value, np.float32(first_best))


def test_invalid_windows_do_not_consume_cooldown():
    det = PlateauDetector(patience=0, cooldown=1)
    state, _ = run(det, [1.0, 1.0, np.nan, np.nan])
    assert int(state.cooldown_count) == 1


def test_state_shape_and_dtype_do_not_drift():
    det = PlateauDetector(accumulation_steps=2)
    state = det.init()
    new_state, _ = jax.jit(det.update)(state, jnp.float32(1.0))
    chex.assert_trees_all_equal_shapes_and_dtypes(state, new_state)


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(patience=-1), "patience"),
        (dict(accumulation_steps=0), "accumulation_steps"),
        (dict(cooldown=-2), "cooldown"),
        (dict(mode="maximum"), "mode"),
        (dict(rtol=1.0), "rtol"),
        (dict(rtol=-0.1), "rtol"),
        (dict(atol=-1.0), "atol"),
        (dict(atol=float("nan")), "atol"),
    ],
)
def test_invalid_arguments_name_themselves(kwargs, name):
    with pytest.raises(ValueError, match=name):
        PlateauDetector(**kwargs)


def test_non_integer_counts_are_type_errors():
    with pytest.raises(TypeError, match="patience"):
        PlateauDetector(patience=1.5)
    with pytest.raises(TypeError, match="accumulation_steps"):
        PlateauDetector(accumulation_steps=True)
