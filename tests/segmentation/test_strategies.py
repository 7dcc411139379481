"""Named strategies build the transformations they say."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import adaptive_optax as ao
from adaptive_optax import presets
from adaptive_optax.segmentation import strategies
from adaptive_optax.state import find_state


def value_fn(params, loss_weights):
    """The lookahead strategy's trial objective (ignored by the others' optimizers)."""
    del loss_weights
    loss = jnp.sum(params["w"] ** 2)
    return loss, loss


@pytest.mark.parametrize("name", strategies.STRATEGIES)
def test_every_strategy_builds_and_exposes_the_state_fields(name):
    tx = strategies.make_optimizer(name, 1e-3, total_steps=20, patience=0, cooldown=0)
    params = {"w": jnp.ones(3)}
    state = tx.init(params)
    for _ in range(3):
        _, state = tx.update({"w": jnp.full(3, 0.01)}, state, params, value=jnp.float32(1.0),
                             value_fn=value_fn)
    assert optax.tree.get(state, "loss_weights") is not None
    count = int(optax.tree.get(state, "intervention_count"))
    if name in (*strategies.RECOMMENDED, "lookahead"):  # the preset may warm up or guard: >= 1
        assert count >= 1
    else:
        assert count == (2 if name in strategies.INTERVENING else 0)


def test_schedules_change_the_base_rate():
    tx = strategies.make_optimizer("cosine", 1e-2, total_steps=10)
    params = {"w": jnp.ones(3)}
    state = tx.init(params)
    for _ in range(9):
        _, state = tx.update({"w": jnp.ones(3)}, state, params, value=1.0)
    assert float(optax.tree.get(state, "learning_rate")) < 2e-3


def test_reduce_on_plateau_is_optax_contrib():
    tx = strategies.make_optimizer("reduce-on-plateau", 1e-3, total_steps=10, patience=0)
    state = tx.init({"w": jnp.ones(3)})
    assert optax.tree.get(state, "ReduceLROnPlateauState") is not None


def test_unknown_strategy():
    with pytest.raises(ValueError, match="strategy"):
        strategies.make_optimizer("magic", 1e-3, total_steps=10)


def test_reduce_on_plateau_train_step_reads_our_fields_and_its_scale():
    from helpers import tiny_data, tiny_run

    from adaptive_optax.segmentation import data

    run = tiny_run("reduce-on-plateau", patience=0, accumulation_steps=1, rtol=0.5)
    tr, _ = tiny_data()
    batch = data.SegmentationData(*(jnp.asarray(a[:8]) for a in tr))
    state = run["state"]
    lrs = []
    for _ in range(3):
        state, metrics = run["train_step"](state, batch)
        lrs.append(float(metrics.readings["learning_rate"]))
    # patience=0: optax's plateau_count reaches 1 on the first bad window -> scale 0.1.
    assert lrs[0] == pytest.approx(3e-3)
    assert lrs[1] == pytest.approx(3e-4)
    assert int(metrics.readings["intervention_count"]) == 0


def _rates_at_interventions(tx, steps=3):
    params = {"w": jnp.ones(4)}
    state, rates = tx.init(params), []
    for _ in range(steps):  # a flat loss at gradient norm 0.04: boost 10 from the table
        _, state = tx.update({"w": jnp.full(4, 0.02)}, state, params, value=jnp.float32(1.0))
        rates.append(float(optax.tree.get(state, "learning_rate")))
    return rates


def test_custom_policy_is_used():
    from adaptive_optax.segmentation.policies import adaptive_mix_policy

    kwargs = dict(total_steps=10, patience=0, cooldown=0)
    custom = strategies.make_optimizer("adaptive", 1e-3, policy=adaptive_mix_policy(damping=(1.0, 0.5)),
                                       **kwargs)
    default = strategies.make_optimizer("adaptive", 1e-3, **kwargs)
    # Interventions at steps 1 and 2: boosts 10 x 1, then 10 x 0.5 (the default damps by 0.7).
    assert _rates_at_interventions(custom)[1:] == pytest.approx([1e-2, 5e-3])
    assert _rates_at_interventions(default)[1:] == pytest.approx([1e-2, 7e-3])


def test_sgdr_restarts_the_rate_every_quarter_of_the_run():
    tx = strategies.make_optimizer("sgdr", 1e-2, total_steps=8)
    params = {"w": jnp.ones(3)}
    state, rates = tx.init(params), []
    for _ in range(8):
        _, state = tx.update({"w": jnp.ones(3)}, state, params, value=jnp.float32(1.0))
        rates.append(float(ao.state_field(state, "base_learning_rate")))
    expected = optax.sgdr_schedule([dict(init_value=1e-2, peak_value=1e-2, decay_steps=2,
                                         warmup_steps=0, end_value=1e-4)] * 4)
    np.testing.assert_allclose(rates, [float(expected(t)) for t in range(8)], rtol=1e-6)
    assert rates[2] == pytest.approx(1e-2) and rates[1] < 1e-2  # decays, then restarts


def test_reduce_on_plateau_refuses_a_maximised_score():
    # optax's reduce_on_plateau would cut the rate while a Dice score improves.
    with pytest.raises(ValueError, match="mode = 'max', allowed: 'min'"):
        strategies.make_optimizer("reduce-on-plateau", 1e-3, total_steps=10, mode="max")


def test_reduce_on_plateau_gets_atol():
    tx = strategies.make_optimizer("reduce-on-plateau", 1e-2, total_steps=10, patience=0,
                                   cooldown=0, rtol=0.0, atol=0.5)
    params = {"w": jnp.ones(3)}
    state = tx.init(params)
    # Each value improves by 0.1 < atol: optax counts it as a plateau and cuts.
    for value in (1.0, 0.9, 0.8):
        _, state = tx.update({"w": jnp.ones(3)}, state, params, value=jnp.float32(value))
    assert float(optax.tree.get(state, "ReduceLROnPlateauState").scale) < 1.0


def test_adaptive_guard_keeps_a_given_rollback_guard(monkeypatch):
    from adaptive_optax.rollback import RollbackGuard

    seen = {}
    real = strategies.plateau_escape

    def spy(*args, **kwargs):
        seen["rollback"] = kwargs.get("rollback")
        return real(*args, **kwargs)

    monkeypatch.setattr(strategies, "plateau_escape", spy)
    guard = RollbackGuard(guard_windows=5)
    strategies.make_optimizer("adaptive-guard", 1e-3, total_steps=10, rollback=guard)
    assert seen["rollback"] is guard
    strategies.make_optimizer("adaptive-guard", 1e-3, total_steps=10)
    assert seen["rollback"] == RollbackGuard()


# -- the strategies of the learning-rate grid ------------------------------------------------

def _base_rates(tx, steps):
    """The base rate each of ``steps`` updates used (update ``t`` uses the schedule at ``t``)."""
    params = {"w": jnp.ones(3)}
    state, rates = tx.init(params), []
    # eager updates take ~0.1 s each; value_fn is closed over (jit takes arrays only)
    update = jax.jit(lambda g, s, p, v: tx.update(g, s, p, value=v, value_fn=value_fn))
    for _ in range(steps):
        _, state = update({"w": jnp.full(3, 0.01)}, state, params, jnp.float32(1.0))
        rates.append(ao.state_field(state, "base_learning_rate"))
    return [float(r) for r in rates]


def test_warmup_cosine_warms_up_over_5_percent_then_decays_to_1_percent():
    tx = strategies.make_optimizer("warmup-cosine", 1e-2, total_steps=100)
    rates = _base_rates(tx, 101)
    expected = optax.warmup_cosine_decay_schedule(0.0, 1e-2, 5, 100, end_value=1e-4)
    for t in (0, 2, 5, 50, 100):
        assert rates[t] == pytest.approx(float(expected(t)), rel=1e-5, abs=1e-12), t
    assert rates[0] == 0.0 and rates[5] == pytest.approx(1e-2) and rates[100] == pytest.approx(1e-4)


def test_escape_cosine_is_adaptive_over_the_cosine_schedule():
    kwargs = dict(total_steps=20, patience=100)  # no plateau: the base schedule alone
    assert _base_rates(strategies.make_optimizer("escape-cosine", 1e-2, **kwargs), 20) == \
        pytest.approx(_base_rates(strategies.make_optimizer("cosine", 1e-2, **kwargs), 20))
    tx = strategies.make_optimizer("escape-cosine", 1e-2, total_steps=20, patience=0, cooldown=0,
                                   boost_warmup_steps=0)
    rates = _rates_at_interventions(tx, 3)
    cosine = optax.cosine_decay_schedule(1e-2, 20, alpha=0.01)
    assert rates[1] == pytest.approx(10 * float(cosine(1)), rel=1e-5)  # boosted (grad norm 0.04)
    # By default (plateau_escape's defaults) the boost ramps in over one window (1 step here).
    ramped = _rates_at_interventions(strategies.make_optimizer(
        "escape-cosine", 1e-2, total_steps=20, patience=0, cooldown=0), 3)
    assert ramped[1] == pytest.approx(5.5 * float(cosine(1)), rel=1e-5)


@pytest.mark.parametrize("name", ["constant", "prodigy", "recommended"])
def test_unscheduled_strategies_keep_the_base_rate(name):
    rates = _base_rates(strategies.make_optimizer(name, 0.5, total_steps=10, patience=100), 10)
    assert rates == pytest.approx([0.5] * 10)


def test_recommended_takes_the_preset_and_lets_options_override_it(monkeypatch):
    from adaptive_optax import presets

    seen, calls = {}, []
    real = strategies.plateau_escape

    def spy(*args, **kwargs):
        seen.update(kwargs)
        return real(*args, **kwargs)

    def preset(accumulation_steps, lookahead=False):
        assert lookahead is False  # only the lookahead strategy asks for the trials
        calls.append(accumulation_steps)
        return dict(accumulation_steps=accumulation_steps, boost_warmup_steps=7, cooldown=3,
                    rtol=0.25)

    monkeypatch.setattr(strategies, "plateau_escape", spy)
    monkeypatch.setattr(presets, "recommended_options", preset)
    strategies.make_optimizer("recommended", 1e-3, total_steps=10, accumulation_steps=4, rtol=0.1)
    assert calls == [4]
    assert seen["boost_warmup_steps"] == 7 and seen["cooldown"] == 3  # the preset's
    assert seen["rtol"] == 0.1 and seen["accumulation_steps"] == 4  # the caller's
    assert seen["max_interventions"] == 3 and seen["patience"] == 2  # the defaults
    seen.clear()
    strategies.make_optimizer("constant", 1e-3, total_steps=10)
    assert calls == [4]  # only "recommended" reads the preset
    assert seen["cooldown"] == 1 and "boost_warmup_steps" not in seen


def test_recommended_uses_the_real_preset():
    from adaptive_optax import presets

    tx = strategies.make_optimizer("recommended", 1e-3, total_steps=10, accumulation_steps=2)
    state = tx.init({"w": jnp.ones(3)})
    has_guard = presets.recommended_options(2).get("rollback") is not None
    assert ("rollback_count" in ao.find_state(state).fields()) == has_guard


@pytest.mark.parametrize("name", ["prodigy", "escape-prodigy"])
def test_prodigy_is_optax_contrib_prodigy_with_the_rate_as_its_multiplier(name):
    tx = strategies.make_optimizer(name, 0.5, total_steps=10)
    params = {"w": jnp.ones(3)}
    state = tx.init(params)
    _, state = tx.update({"w": jnp.full(3, 0.1)}, state, params, value=jnp.float32(1.0))
    assert optax.tree.get(state, "ProdigyState") is not None
    assert float(optax.tree.get(state, "learning_rate")) == pytest.approx(0.5)
    with pytest.raises(ValueError, match=f"strategy '{name}'.*optimizer = "):
        strategies.make_optimizer(name, 1.0, total_steps=10, optimizer=optax.sgd)


@pytest.mark.parametrize("traced", [False, True])
def test_prodigy_coef_is_prodigy_with_the_rate_as_its_estim_lr_coef(traced):
    params = {"w": jnp.ones(3)}
    grads = {"w": jnp.array([0.1, -0.2, 0.3])}

    def run(tx):
        state, p = tx.init(params), params
        for _ in range(5):
            updates, state = tx.update(grads, state, p, value=jnp.float32(1.0))
            p = optax.apply_updates(p, updates)
        return p["w"]

    for coef in (0.5, 4.0):
        def ours(c):
            return run(strategies.make_optimizer("prodigy-coef", c, total_steps=10))

        got = jax.jit(ours)(jnp.float32(coef)) if traced else ours(coef)
        want = run(optax.contrib.prodigy(1.0, estim_lr_coef=coef))
        np.testing.assert_allclose(got, want, rtol=1e-6)
    assert not np.allclose(run(strategies.make_optimizer("prodigy-coef", 0.5, total_steps=10)),
                           run(strategies.make_optimizer("prodigy-coef", 4.0, total_steps=10)))
    with pytest.raises(TypeError, match="takes its estim_lr_coef as learning_rate"):
        strategies.make_optimizer("prodigy-coef", 1.0, total_steps=10, estim_lr_coef=2.0)


@pytest.mark.parametrize("name, inner", [("escape-prodigy", "ProdigyState"),
                                         ("escape-schedule-free", "ScheduleFreeState")])
def test_the_escape_wrappers_are_recommended_around_the_rate_free_optimizers(name, inner):
    """The preset's options (ramp, guard) around prodigy / schedule-free, intervening;
    the plain strategies around the same optimizers never intervene."""
    options = strategies._options(name, {})
    for key, value in presets.recommended_options(1).items():
        assert options[key] == value, key
    counts = {}
    for strategy in (name, name.removeprefix("escape-")):
        tx = strategies.make_optimizer(strategy, 1e-2, total_steps=20, patience=0, cooldown=0)
        params = {"w": jnp.ones(3)}
        state = tx.init(params)
        assert optax.tree.get(state, inner) is not None, strategy
        for _ in range(6):  # a constant value: every window after the first is a plateau
            updates, state = tx.update({"w": jnp.full(3, 0.1)}, state, params,
                                       value=jnp.float32(1.0))
            params = optax.apply_updates(params, updates)
        counts[strategy] = int(optax.tree.get(state, "intervention_count"))
    assert counts[name] >= 1 and counts[name.removeprefix("escape-")] == 0, counts


# What recommended_options(w, lookahead=True) adds to the plain preset.
LOOKAHEAD_PRESET = ("lookahead", "max_update_ratio")


def _options_by_lookahead(monkeypatch, names):
    """``{has a lookahead: plateau_escape's keywords}`` of make_optimizer for ``names``."""
    seen = {}
    real = strategies.plateau_escape

    def spy(*args, **kwargs):
        seen[kwargs.get("lookahead") is not None] = kwargs
        return real(*args, **kwargs)

    monkeypatch.setattr(strategies, "plateau_escape", spy)
    for name in names:
        strategies.make_optimizer(name, 1e-3, total_steps=20, accumulation_steps=4)
    monkeypatch.undo()
    return seen


def test_the_schedule_free_wrappers_weigh_the_average_by_the_base_rate(monkeypatch):
    """escape-schedule-free's boosts leave schedule-free's averaging weights at the base
    rate; lookahead-schedule-free is the same with the preset's lookahead."""
    seen = _options_by_lookahead(monkeypatch, ("escape-schedule-free", "lookahead-schedule-free"))
    assert seen[True]["lookahead"] == strategies.DEFAULT_LOOKAHEAD
    assert seen[True]["max_update_ratio"] == presets.MAX_UPDATE_RATIO
    assert ({k: v for k, v in seen[True].items() if k not in LOOKAHEAD_PRESET}
            == {k: v for k, v in seen[False].items() if k not in LOOKAHEAD_PRESET})
    tx = strategies.make_optimizer("escape-schedule-free", 1e-2, total_steps=20, patience=0,
                                   cooldown=0, boost_warmup_steps=0)
    params = {"w": jnp.ones(3)}
    state = tx.init(params)
    lrs = []
    for _ in range(8):  # a constant value: every window after the first is a plateau
        updates, state = tx.update({"w": jnp.full(3, 0.1)}, state, params, value=jnp.float32(1.0))
        params = optax.apply_updates(params, updates)
        lrs.append(float(optax.tree.get(state, "learning_rate")))
    assert int(optax.tree.get(state, "intervention_count")) >= 1 and max(lrs) > 2e-2
    # The rate after the 1-step warm-up (5 % of 20) is the base 1e-2 at most.
    np.testing.assert_allclose(optax.tree.get(state, "ScheduleFreeState").max_lr, 1e-2,
                               rtol=1e-6)


def test_lookahead_prodigy_is_escape_prodigy_with_the_default_lookahead(monkeypatch):
    seen = _options_by_lookahead(monkeypatch, ("escape-prodigy", "lookahead-prodigy"))
    assert seen[True]["lookahead"] == strategies.DEFAULT_LOOKAHEAD
    assert seen[True]["max_update_ratio"] == presets.MAX_UPDATE_RATIO
    assert ({k: v for k, v in seen[True].items() if k not in LOOKAHEAD_PRESET}
            == {k: v for k, v in seen[False].items() if k not in LOOKAHEAD_PRESET})
    assert strategies.learning_rate_for("lookahead-prodigy", 3e-4) == 1.0
    with pytest.raises(ValueError, match="strategy 'lookahead-prodigy'.*optimizer = "):
        strategies.make_optimizer("lookahead-prodigy", 1.0, total_steps=10, optimizer=optax.sgd)
    tx = strategies.make_optimizer("lookahead-prodigy", 0.5, total_steps=20, patience=0,
                                   cooldown=0)
    params = {"w": jnp.ones(3)}
    state = tx.init(params)

    def value_fn(p, loss_weights):
        loss = jnp.sum(p["w"] ** 2)
        return loss, loss

    for _ in range(6):  # a constant value: every window after the first is a plateau
        updates, state = tx.update({"w": 2 * params["w"]}, state, params,
                                   value=jnp.float32(1.0), value_fn=value_fn)
        params = optax.apply_updates(params, updates)
    assert optax.tree.get(state, "ProdigyState") is not None
    assert int(optax.tree.get(state, "intervention_count")) >= 1


def _schedule_free_run(optimizer=optax.adam, steps=5, name="schedule-free"):
    tx = strategies.make_optimizer(name, 1e-1, total_steps=20, optimizer=optimizer)
    params = {"w": jnp.ones(3)}
    state = tx.init(params)
    for i in range(steps):
        updates, state = tx.update({"w": jnp.array([0.1, -0.2, 0.3]) * (i + 1)}, state, params,
                                   value=jnp.float32(1.0), value_fn=value_fn)
        params = optax.apply_updates(params, updates)
    return params, state


@pytest.mark.parametrize("name", strategies.SCHEDULE_FREE)
@pytest.mark.parametrize("optimizer", [optax.adam, optax.sgd])
def test_schedule_free_eval_params_are_its_average(optimizer, name):
    params, state = _schedule_free_run(optimizer, name=name)
    inner = optax.tree.get(state, "ScheduleFreeState")
    assert inner is not None
    assert strategies.eval_params_for(name) is not None
    evaluated = strategies.eval_params(name, state, params)
    np.testing.assert_array_equal(evaluated["w"],
                                  optax.contrib.schedule_free_eval_params(inner, params)["w"])
    assert not np.allclose(evaluated["w"], params["w"])


@pytest.mark.parametrize("name", strategies.SCHEDULE_FREE)
def test_schedule_free_warms_up_its_rate(name):
    rates = _base_rates(strategies.make_optimizer(name, 1e-2, total_steps=100), 10)
    assert rates[0] == 0.0 and rates[5:] == pytest.approx([1e-2] * 5)


@pytest.mark.parametrize("name", strategies.SCHEDULE_FREE)
def test_schedule_free_refuses_other_optimizers(name):
    with pytest.raises(ValueError, match=f"strategy '{name}'.*optimizer = "):
        strategies.make_optimizer(name, 1e-3, total_steps=10, optimizer=optax.lion)


@pytest.mark.parametrize("name", [s for s in strategies.STRATEGIES
                                  if s not in strategies.SCHEDULE_FREE])
def test_eval_params_are_the_params_for_the_other_strategies(name):
    params = {"w": jnp.ones(3)}
    state = strategies.make_optimizer(name, 1e-3, total_steps=10).init(params)
    assert strategies.eval_params(name, state, params) is params


def test_eval_params_checks_its_arguments():
    with pytest.raises(ValueError, match="strategy"):
        strategies.eval_params("magic", None, {})
    state = strategies.make_optimizer("constant", 1e-3, total_steps=10).init({"w": jnp.ones(3)})
    with pytest.raises(ValueError, match="ScheduleFreeState"):
        strategies.eval_params("schedule-free", state, {"w": jnp.ones(3)})


def _two_updates(name, learning_rate, optimizer=optax.adam, **kwargs):
    """Updates and learning rates of two steps (patience 0: the second intervenes)."""
    tx = strategies.make_optimizer(name, learning_rate, total_steps=6, patience=0, cooldown=0,
                                   optimizer=optimizer, **kwargs)
    params = {"w": jnp.ones(3)}
    state = tx.init(params)
    out = []
    for i in range(2):
        updates, state = tx.update({"w": jnp.array([0.01, -0.02, 0.03]) * (i + 1)}, state,
                                   params, value=jnp.float32(1.0), value_fn=value_fn)
        params = optax.apply_updates(params, updates)
        out.append((updates["w"], optax.tree.get(state, "learning_rate")))
    return out


@pytest.mark.parametrize("name", strategies.STRATEGIES)
def test_a_traced_rate_under_jit_and_vmap_gives_the_float_rates_updates(name):
    rates = (1e-3, 3e-2)
    expected = [_two_updates(name, lr) for lr in rates]
    vmapped = jax.jit(jax.vmap(lambda lr: _two_updates(name, lr)))(jnp.asarray(rates))
    for i in range(len(rates)):
        for step, (updates, lr) in enumerate(expected[i]):
            np.testing.assert_allclose(vmapped[step][0][i], updates, rtol=1e-5, atol=1e-9)
            np.testing.assert_allclose(vmapped[step][1][i], lr, rtol=1e-6)


def test_a_traced_rate_with_sgd_momentum():
    expected = _two_updates("cosine", 0.1, optimizer=optax.sgd, momentum=0.9)
    traced = jax.jit(lambda lr: _two_updates("cosine", lr, optimizer=optax.sgd,
                                               momentum=0.9))(jnp.float32(0.1))
    for (u, lr), (tu, tlr) in zip(expected, traced):
        np.testing.assert_allclose(tu, u, rtol=1e-6)
        np.testing.assert_allclose(tlr, lr, rtol=1e-6)


def test_learning_rate_is_checked_when_concrete_and_shaped_when_traced():
    tx = strategies.make_optimizer("constant", jnp.float32(1e-3), total_steps=10)
    assert float(optax.tree.get(tx.init({"w": jnp.ones(2)}), "learning_rate")) == \
        pytest.approx(1e-3)
    for bad in (0.0, -1e-3, float("nan"), jnp.float32(0.0)):
        with pytest.raises(ValueError, match="learning_rate"):
            strategies.make_optimizer("cosine", bad, total_steps=10)
    with pytest.raises(TypeError, match="learning_rate"):
        strategies.make_optimizer("cosine", "fast", total_steps=10)
    with pytest.raises(ValueError, match="learning_rate"):
        jax.jit(lambda lr: strategies.make_optimizer("cosine", lr, total_steps=10).init(
            {"w": jnp.ones(2)}))(jnp.ones(2))


def test_recommended_restore_is_recommended_with_a_guard_that_restores_the_params(monkeypatch):
    from adaptive_optax.rollback import NoSnapshot, RollbackGuard

    params = {"w": jnp.ones(3), "b": jnp.zeros(2)}
    snapshots = {}
    for name in ("recommended", "recommended-restore"):
        state = strategies.make_optimizer(name, 1e-3, total_steps=10,
                                          accumulation_steps=2).init(params)
        snapshots[name] = find_state(state).rollback_snapshot
    # recommended-restore keeps a copy of the parameters; recommended keeps none.
    snapshot = snapshots["recommended-restore"]
    assert jax.tree.structure(snapshot) == jax.tree.structure(params)
    assert [a.shape for a in jax.tree.leaves(snapshot)] == [(2,), (3,)]
    assert isinstance(snapshots["recommended"], NoSnapshot)
    assert not jax.tree.leaves(snapshots["recommended"])

    # Otherwise the same options: the preset's, with the default guard in place of its own.
    seen = {}
    real = strategies.plateau_escape

    def spy(*args, **kwargs):
        seen[kwargs["rollback"].restore_params] = kwargs
        return real(*args, **kwargs)

    monkeypatch.setattr(strategies, "plateau_escape", spy)
    for name in ("recommended", "recommended-restore"):
        strategies.make_optimizer(name, 1e-3, total_steps=10, accumulation_steps=4)
    assert seen[True]["rollback"] == RollbackGuard()
    assert seen[False]["rollback"] == RollbackGuard(restore_params=False)
    assert {k: v for k, v in seen[True].items() if k != "rollback"} == {
        k: v for k, v in seen[False].items() if k != "rollback"}


def test_recommended_unguarded_is_recommended_without_its_guard(monkeypatch):
    params = {"w": jnp.ones(3)}
    fields = {name: find_state(strategies.make_optimizer(
        name, 1e-3, total_steps=10, accumulation_steps=2).init(params)).fields()
        for name in ("recommended", "recommended-unguarded")}
    assert "rollback_count" in fields["recommended"]
    assert "rollback_count" not in fields["recommended-unguarded"]
    seen = {}
    real = strategies.plateau_escape

    def spy(*args, **kwargs):
        seen[kwargs["rollback"] is None] = kwargs
        return real(*args, **kwargs)

    monkeypatch.setattr(strategies, "plateau_escape", spy)
    for name in ("recommended", "recommended-unguarded"):
        strategies.make_optimizer(name, 1e-3, total_steps=10, accumulation_steps=4)
    assert seen[False]["rollback"] == presets.recommended_options(4)["rollback"]
    assert {k: v for k, v in seen[True].items() if k != "rollback"} == {
        k: v for k, v in seen[False].items() if k != "rollback"}


def test_max_interventions_is_checked_for_every_strategy():
    with pytest.raises(ValueError, match="max_interventions"):
        strategies.make_optimizer("constant", 1e-3, total_steps=10, max_interventions=-1)


def test_recommended_windows_are_the_callers_accumulation_steps():
    # Built with accumulation_steps=5, the preset's ramp and windows are 5 steps long.
    tx = strategies.make_optimizer("recommended", 1e-2, total_steps=20, accumulation_steps=5)
    params = {"w": jnp.ones(4)}
    state = tx.init(params)
    for _ in range(5):
        _, state = tx.update({"w": jnp.full(4, 0.02)}, state, params, value=jnp.float32(1.0))
    assert int(find_state(state).plateau.windows_completed) == 1


def test_options_split_between_plateau_escape_and_the_inner_optimizer(monkeypatch):
    seen = {}
    real = strategies.plateau_escape

    def spy(*args, **kwargs):
        seen.clear()
        seen.update(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(strategies, "plateau_escape", spy)
    strategies.make_optimizer("constant", 0.1, total_steps=10, optimizer=optax.sgd,
                              momentum=0.9, patience=3)
    assert seen["optimizer_kwargs"] == {"momentum": 0.9} and seen["patience"] == 3
    assert "momentum" not in seen
    strategies.make_optimizer("constant", 0.1, total_steps=10)
    assert seen["optimizer_kwargs"] is None
    # A name both take goes to plateau_escape; optimizer_kwargs reach the optimizer.
    strategies.make_optimizer("adaptive", 0.1, total_steps=10, optimizer=optax.noisy_sgd,
                              seed=7, optimizer_kwargs={"seed": 1})
    assert seen["seed"] == 7 and seen["optimizer_kwargs"] == {"seed": 1}
    strategies.make_optimizer("constant", 0.1, total_steps=10, optimizer=optax.sgd,
                              momentum=0.9, optimizer_kwargs={"nesterov": True})
    assert seen["optimizer_kwargs"] == {"momentum": 0.9, "nesterov": True}


def test_the_inner_optimizers_keywords_act():
    second = {m: _two_updates("constant", 0.1, optimizer=optax.sgd, momentum=m)[1][0]
              for m in (0.0, 0.9)}
    # Step 2 of SGD with momentum 0.9 adds 0.9 of step 1's update.
    first = _two_updates("constant", 0.1, optimizer=optax.sgd, momentum=0.0)[0][0]
    np.testing.assert_allclose(second[0.9], second[0.0] + 0.9 * first, rtol=1e-6)


def test_inner_keywords_given_twice_or_unknown_are_refused():
    with pytest.raises(TypeError, match=r"\['momentum'\] both as options and in optimizer_kwargs"):
        strategies.make_optimizer("constant", 0.1, total_steps=10, optimizer=optax.sgd,
                                  momentum=0.9, optimizer_kwargs={"momentum": 0.5})
    with pytest.raises(TypeError, match=r"optimizer_kwargs\['bogus'\]: not an argument of 'sgd'"):
        strategies.make_optimizer("constant", 0.1, total_steps=10, optimizer=optax.sgd, bogus=1)


def test_lookahead_is_recommended_with_the_default_lookahead(monkeypatch):
    seen = _options_by_lookahead(monkeypatch, ("recommended", "lookahead"))
    assert seen[True]["lookahead"] == strategies.DEFAULT_LOOKAHEAD
    assert seen[True]["max_update_ratio"] == presets.MAX_UPDATE_RATIO
    assert {k: v for k, v in seen[True].items() if k not in LOOKAHEAD_PRESET} == seen[False]
    tx = strategies.make_optimizer("lookahead", 1e-3, total_steps=10)
    params = {"w": jnp.ones(3)}
    with pytest.raises(ValueError, match="value_fn"):
        tx.update(params, tx.init(params), params, value=1.0)


@pytest.mark.parametrize("name", strategies.STRATEGIES)
def test_a_run_wide_rate_goes_to_rate_strategies_and_prodigy_keeps_its_own_estimate(name):
    expected = 1.0 if name in ("prodigy", "prodigy-coef", "escape-prodigy",
                               "lookahead-prodigy") else 3e-4
    assert strategies.learning_rate_for(name, 3e-4) == expected
