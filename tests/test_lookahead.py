"""The lookahead: candidate interventions tried in-graph at a plateau, the best one committed.

A least-squares problem with SGD, whose stability edge is known: a rate
``eta`` diverges on it once ``eta * h_max > 2`` (``h_max`` the largest
curvature). The monitored ``value=`` passed to the update is a constant, so
every step is a plateau (``patience=0``, no cooldown) until the cap: the
interventions, and with them the trials, happen where the test wants them.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import adaptive_optax as ao
from adaptive_optax.lookahead import (
    DEFAULT_CANDIDATES,
    NO_BOOST,
    POLICY_CHOICE,
    Candidate,
    Lookahead,
    LookaheadState,
)

CURVATURE = jnp.array([2.0, 1.0, 0.5, 0.25], jnp.float32)  # h_max = 2: SGD diverges past rate 1
TARGET = jnp.array([1.0, -2.0, 3.0, 0.5], jnp.float32)
FIRST_TRIAL = 2  # the first window sets the best value, the second is the first plateau
MIXES = ({"a": 1.0, "b": 0.0}, {"a": 0.5, "b": 0.5}, {"a": 0.0, "b": 1.0})


def loss(params):
    return 0.5 * jnp.sum(CURVATURE * (params["w"] - TARGET) ** 2)


def value_fn(params, weights):
    """Loss to optimise (``a`` the quadratic, ``b`` a weaker pull to 0) and the quadratic."""
    main = loss(params)
    pull = 0.5 * jnp.sum(params["w"] ** 2)
    return weights["a"] * main + weights["b"] * pull, main


def fixed_policy(boost=5.0, **kwargs):
    """A boost of 5x at every intervention; the mix kept unless a test plans others."""
    kwargs = {"mix_plan": ("keep",), **kwargs}
    return ao.InterventionPolicy(use_grad_norm=False, fixed_boosts=(boost,), damping=(1.0,),
                                 mixes=MIXES, initial_mix=MIXES[0], final_mix=MIXES[0],
                                 **kwargs)


def make_tx(rate=0.05, lookahead=None, mode="min", max_interventions=3, **kwargs):
    kwargs = {"policy": fixed_policy(), "rollback": None, **kwargs}
    return ao.plateau_escape(optax.sgd, rate, patience=0, mode=mode, boost_warmup_steps=0,
                             max_interventions=max_interventions, lookahead=lookahead, **kwargs)


def run(tx, steps=6, value=1.0, fn=value_fn, params=None, trace_check=False):
    """Real SGD steps on the loss of the state's mix; ``value`` is what the detector sees."""
    params = params if params is not None else {"w": jnp.zeros(4, jnp.float32)}
    state = tx.init(params)

    def step(params, state):
        weights = optax.tree.get(state, "loss_weights")
        grads = jax.grad(lambda p: fn(p, weights)[0])(params)
        updates, state = tx.update(grads, state, params, value=jnp.float32(value), value_fn=fn)
        return optax.apply_updates(params, updates), state

    step = jax.jit(chex.assert_max_traces(step, n=1) if trace_check else step)
    for _ in range(steps):
        params, state = step(params, state)
    return params, state


def trial(state):
    return (np.asarray(optax.tree.get(state, "trial_values")),
            int(optax.tree.get(state, "trial_choice")))


def test_first_trial_commits_the_best_candidate_and_records_every_value():
    params, state = run(make_tx(lookahead=Lookahead(steps=3)), steps=FIRST_TRIAL)
    values, choice = trial(state)
    assert values.shape == (len(DEFAULT_CANDIDATES),) and np.isfinite(values).all()
    # A small rate on a convex problem: the biggest boost (2x the policy's excess) gets furthest.
    assert choice == 3 == int(np.argmin(values))
    assert float(ao.state_field(state, "boost_to")) == pytest.approx(1 + 2 * (5.0 - 1))
    assert float(optax.tree.get(state, "learning_rate")) == pytest.approx(0.05 * 9.0)
    curves = np.asarray(ao.state_field(state, "trial_curves"))
    assert curves.shape == (5, 4)
    np.testing.assert_array_equal(curves[:, -1], values)
    start, _ = run(make_tx(lookahead=Lookahead(steps=3)), steps=FIRST_TRIAL - 1)
    np.testing.assert_allclose(curves[:, 0], float(loss(start)), rtol=1e-6)  # all start there


def test_a_diverging_candidate_is_never_chosen():
    # 1 + 1000 * 4 = 4001x the base rate: the trial's loss explodes (finite or not).
    candidates = (Candidate(1000.0), NO_BOOST, POLICY_CHOICE)
    tx = make_tx(rate=0.1, lookahead=Lookahead(steps=3, candidates=candidates))
    _, state = run(tx, steps=4)
    values, choice = trial(state)
    assert not values[0] < values[1:].min()
    assert choice != 0
    assert int(optax.tree.get(state, "intervention_count")) == 3


def test_no_boost_wins_when_every_boost_makes_things_worse():
    # Base rate 0.75 (0.75 * h_max = 1.5, stable); every default candidate's boost is >= 3x: diverges.
    _, state = run(make_tx(rate=0.75, lookahead=Lookahead(steps=4)), steps=FIRST_TRIAL)
    values, choice = trial(state)
    assert choice == DEFAULT_CANDIDATES.index(NO_BOOST) == int(np.nanargmin(values))
    assert float(ao.state_field(state, "boost_to")) == 1.0
    assert float(optax.tree.get(state, "learning_rate")) == pytest.approx(0.75)
    assert int(ao.state_field(state, "mix_index")) == fixed_policy().initial_index  # current mix


def nan_beyond(limit):
    def fn(params, weights):
        loss_value, monitored = value_fn(params, weights)
        blown = jnp.max(jnp.abs(params["w"])) > limit
        return jnp.where(blown, jnp.nan, loss_value), jnp.where(blown, jnp.nan, monitored)
    return fn


def test_a_nan_in_a_trial_disqualifies_the_candidate_and_never_reaches_the_state():
    fn = nan_beyond(10.0)
    candidates = (Candidate(1000.0), POLICY_CHOICE, NO_BOOST)  # the NaN one is the incumbent
    params, state = run(make_tx(rate=0.05, lookahead=Lookahead(steps=2, candidates=candidates)),
                        steps=4, fn=fn)
    values, choice = trial(state)
    assert np.isnan(values[0]) and np.isfinite(values[1:]).all()
    assert choice == 1
    chex.assert_tree_all_finite((params, state.optimizer_state, state.packed_floats[:1],
                                 optax.tree.get(state, "loss_weights")))
    assert np.isfinite(float(optax.tree.get(state, "learning_rate")))


def test_every_candidate_nonfinite_falls_back_to_no_boost():
    candidates = (Candidate(1000.0), Candidate(500.0))
    tx = make_tx(lookahead=Lookahead(steps=2, candidates=candidates))
    _, state = run(tx, steps=FIRST_TRIAL, fn=nan_beyond(10.0))
    values, choice = trial(state)
    assert np.isnan(values).all() and choice == -2
    assert float(ao.state_field(state, "boost_to")) == 1.0
    assert float(optax.tree.get(state, "learning_rate")) == pytest.approx(0.05)


@pytest.mark.parametrize("candidate", [POLICY_CHOICE, Candidate(cut=0.3)], ids=["boost", "cut"])
@pytest.mark.parametrize("reset", [False, True])
def test_a_single_candidates_trial_is_the_run_it_commits_including_an_optimizer_reset(
        reset, candidate):
    # SGD with momentum: a reset at the intervention zeroes the momentum, which a
    # trial that started from the accumulated momentum would not predict. The
    # ramp (2 steps) makes the trial's rate change from step to step.
    tx = ao.plateau_escape(optax.sgd, 0.05, optimizer_kwargs={"momentum": 0.9}, patience=0,
                           boost_warmup_steps=2, max_interventions=1, rollback=None,
                           policy=fixed_policy(reset_optimizer=(reset,)),
                           lookahead=Lookahead(steps=3, candidates=(candidate,)))
    params, state = run(tx, steps=FIRST_TRIAL)  # the last of these steps intervened
    assert int(optax.tree.get(state, "intervention_count")) == 1
    curve = np.asarray(ao.state_field(state, "trial_curves"))[0]
    real = [float(loss(run(tx, steps=FIRST_TRIAL - 1 + k)[0])) for k in range(4)]
    np.testing.assert_allclose(curve, real, rtol=1e-5)


@pytest.mark.parametrize("guard", [None, ao.RollbackGuard(), ao.RollbackGuard(restore_params=False)])
def test_one_candidate_equal_to_the_policy_is_plain_plateau_escape_bit_for_bit(guard):
    policy = fixed_policy(reset_optimizer=(False, True))
    kwargs = dict(rate=0.05, policy=policy, rollback=guard, max_interventions=4)
    lookahead = Lookahead(steps=3, candidates=(POLICY_CHOICE,))
    # The real loss is monitored: plateaus where it improves by less than rtol.
    plain = make_tx(rtol=0.3, **kwargs)
    tried = make_tx(rtol=0.3, lookahead=lookahead, **kwargs)

    def drive(tx):
        params = {"w": jnp.zeros(4, jnp.float32)}
        state = tx.init(params)

        @jax.jit
        def step(params, state):
            weights = optax.tree.get(state, "loss_weights")
            (total, monitored), grads = jax.value_and_grad(value_fn, has_aux=True)(params, weights)
            updates, state = tx.update(grads, state, params, value=monitored, value_fn=value_fn)
            return optax.apply_updates(params, updates), state

        for _ in range(20):
            params, state = step(params, state)
        return params, state

    params, state = drive(plain)
    params_tried, state_tried = drive(tried)
    assert int(optax.tree.get(state, "intervention_count")) >= 2
    assert int(optax.tree.get(state_tried, "trial_choice")) == 0
    chex.assert_trees_all_equal(params_tried, params)
    chex.assert_trees_all_equal(state_tried._replace(lookahead=optax.EmptyState()), state)


def test_an_unramped_trial_is_the_run_that_takes_the_boost_at_once():
    # The trial of Lookahead(ramp=False) under a 5-step ramp follows the run whose boost
    # is immediate (boost_warmup_steps=0) over its 3 steps, not the ramped run.
    def make(warmup, ramp=True):
        return ao.plateau_escape(optax.sgd, 0.05, optimizer_kwargs={"momentum": 0.9},
                                 patience=0, boost_warmup_steps=warmup, max_interventions=1,
                                 rollback=None, policy=fixed_policy(),
                                 lookahead=Lookahead(steps=3, candidates=(POLICY_CHOICE,),
                                                     ramp=ramp))

    _, state = run(make(5, ramp=False), steps=FIRST_TRIAL)
    curve = np.asarray(ao.state_field(state, "trial_curves"))[0]
    at_once = [float(loss(run(make(0), steps=FIRST_TRIAL - 1 + k)[0])) for k in range(4)]
    ramped = [float(loss(run(make(5), steps=FIRST_TRIAL - 1 + k)[0])) for k in range(4)]
    np.testing.assert_allclose(curve, at_once, rtol=1e-5)
    assert not np.allclose(curve[1:], ramped[1:], rtol=1e-3)


def test_a_cut_rescues_a_rate_past_the_stability_edge_where_no_boost_can():
    # Base rate 1.2: 1.2 * h_max = 2.4 > 2, so the base rate and every boost diverge;
    # half of it (0.6) converges. The cut wins the trial and the rate drops to it.
    candidates = (POLICY_CHOICE, NO_BOOST, Candidate(cut=0.5))
    _, state = run(make_tx(rate=1.2, lookahead=Lookahead(steps=4, candidates=candidates)),
                   steps=FIRST_TRIAL)
    values, choice = trial(state)
    assert choice == 2 == int(np.nanargmin(values))
    assert values[2] < values[1] and not values[0] < values[1]
    assert float(ao.state_field(state, "boost_to")) == pytest.approx(0.5)
    assert float(optax.tree.get(state, "learning_rate")) == pytest.approx(0.6)


def test_cuts_compound_on_the_rate_in_force_while_boosts_stay_relative_to_the_base():
    cut = Lookahead(steps=1, candidates=(Candidate(cut=0.5),))
    _, state = run(make_tx(rate=0.4, lookahead=cut), steps=6)
    assert int(optax.tree.get(state, "intervention_count")) == 3
    assert float(ao.state_field(state, "boost_to")) == pytest.approx(0.125)
    assert float(optax.tree.get(state, "learning_rate")) == pytest.approx(0.4 * 0.125)
    boost = Lookahead(steps=1, candidates=(POLICY_CHOICE,))
    _, state = run(make_tx(rate=0.01, lookahead=boost), steps=6)
    assert float(ao.state_field(state, "boost_to")) == pytest.approx(5.0)  # not 5 ** 3


def test_a_whole_run_with_several_trials_compiles_once():
    _, state = run(make_tx(lookahead=Lookahead(steps=2)), steps=8, trace_check=True)
    assert int(optax.tree.get(state, "intervention_count")) == 3


def test_map_and_vmap_choose_the_same():
    results = {}
    for memory in ("vmap", "map"):
        _, state = run(make_tx(lookahead=Lookahead(steps=3, memory=memory)), steps=4)
        results[memory] = trial(state)
    assert results["map"][1] == results["vmap"][1]
    np.testing.assert_allclose(results["map"][0], results["vmap"][0], rtol=1e-6)


def test_mode_max_picks_the_largest_score():
    def score_fn(params, weights):  # the monitored value is a score: minus the loss
        loss_value, monitored = value_fn(params, weights)
        return loss_value, -monitored

    picks = {}
    for mode in ("min", "max"):
        tx = make_tx(lookahead=Lookahead(steps=3), mode=mode)
        _, state = run(tx, steps=FIRST_TRIAL, fn=score_fn)
        values, picks[mode] = trial(state)
    assert picks["max"] == int(np.argmax(values)) == 3  # the biggest boost: the lowest loss
    assert picks["min"] == int(np.argmin(values)) == DEFAULT_CANDIDATES.index(NO_BOOST)


def test_the_incumbent_keeps_near_ties():
    _, state = run(make_tx(lookahead=Lookahead(steps=3, rtol=0.99)), steps=FIRST_TRIAL)
    values, choice = trial(state)
    assert choice == 0 and values[3] < values[0]  # beaten, but within the margin


def test_mix_candidates_commit_their_mix():
    # The quadratic is monitored; mix 2 optimises only the pull to 0: it loses to mix 0.
    policy = fixed_policy(mix_plan=(2, 0))
    candidates = (POLICY_CHOICE, Candidate(1.0, "next"), Candidate(1.0, 1))
    _, state = run(make_tx(policy=policy, lookahead=Lookahead(steps=3, candidates=candidates)),
                   steps=FIRST_TRIAL)
    values, choice = trial(state)
    assert choice == 1 and values[1] < values[2] < values[0]
    assert int(ao.state_field(state, "mix_index")) == 0
    assert float(optax.tree.get(state, "loss_weights")["a"]) == 1.0


def test_a_policy_with_one_mix_tries_mix_variants_once():
    one_mix = ao.InterventionPolicy(use_grad_norm=False, mixes=(MIXES[0],),
                                    initial_mix=MIXES[0], final_mix=MIXES[0])
    bound = Lookahead().bind(policy=one_mix, optimizer=optax.sgd(0.1), sign=1.0,
                             max_interventions=3)
    tried, slot = bound._unique()
    assert tried.tolist() == [0, 1, 2, 3]  # the "next" mix candidate is the policy's choice
    assert slot.tolist() == [0, 1, 2, 3, 0]
    _, state = run(make_tx(policy=one_mix, lookahead=Lookahead(steps=2)), steps=FIRST_TRIAL)
    values, _ = trial(state)
    assert values[4] == values[0]
    bound = Lookahead().bind(policy=fixed_policy(), optimizer=optax.sgd(0.1), sign=1.0,
                             max_interventions=3)
    assert bound._unique()[0].tolist() == [0, 1, 2, 3, 4]


def test_data_parallel_trials_take_the_same_decision_as_one_device():
    shards = 2
    # Per-shard targets whose mean is TARGET: the shards' losses differ, their mean does not.
    offsets = jnp.array([[1.0, 0.0, -1.0, 2.0], [-1.0, 0.0, 1.0, -2.0]], jnp.float32)

    def shard_fn(offset):
        def fn(params, weights):
            main = 0.5 * jnp.sum(CURVATURE * (params["w"] - TARGET - offset) ** 2)
            pull = 0.5 * jnp.sum(params["w"] ** 2)
            return weights["a"] * main + weights["b"] * pull, main
        return fn

    tx = make_tx(lookahead=Lookahead(steps=3, batch_axis_name="batch"))

    def device_step(offset, params, state):
        fn = shard_fn(offset)
        grads = jax.grad(lambda p: fn(p, optax.tree.get(state, "loss_weights"))[0])(params)
        grads = jax.lax.pmean(grads, "batch")
        updates, state = tx.update(grads, state, params, value=jnp.float32(1.0), value_fn=fn)
        return optax.apply_updates(params, updates), state

    step = jax.jit(jax.vmap(device_step, axis_name="batch"))
    stacked = lambda tree: jax.tree.map(lambda x: jnp.stack([x] * shards), tree)  # noqa: E731
    params = stacked({"w": jnp.zeros(4, jnp.float32)})
    states = stacked(tx.init({"w": jnp.zeros(4, jnp.float32)}))
    for _ in range(FIRST_TRIAL):
        params, states = step(offsets, params, states)
    values = np.asarray(optax.tree.get(states, "trial_values"))
    choices = np.asarray(optax.tree.get(states, "trial_choice"))
    np.testing.assert_array_equal(values[0], values[1])
    assert choices[0] == choices[1]
    # The averaged trials are the trials of the averaged problem (plus a constant per shard).
    single = make_tx(lookahead=Lookahead(steps=3))
    _, state = run(single, steps=FIRST_TRIAL)
    assert int(optax.tree.get(state, "trial_choice")) == choices[0]
    spread = float(jnp.mean(0.5 * jnp.sum(CURVATURE[None] * offsets ** 2, axis=1)))
    np.testing.assert_allclose(values[0], trial(state)[0] + spread, rtol=1e-5)


def test_the_record_is_read_like_any_field_and_does_not_drift():
    tx = make_tx(lookahead=Lookahead(steps=2))
    params = {"w": jnp.zeros(4, jnp.float32)}
    state = tx.init(params)
    assert isinstance(state.lookahead, LookaheadState)
    values, choice = trial(state)
    assert np.isnan(values).all() and choice == -1
    assert ao.state_field(state, "trial_choice") is state.lookahead.trial_choice
    update = jax.jit(lambda s: tx.update(params, s, params, value=jnp.float32(1.0),
                                         value_fn=value_fn)[1])
    new_state = update(update(state))
    assert trial(new_state)[1] >= 0
    chex.assert_trees_all_equal_shapes_and_dtypes(state, new_state)
    jax.lax.cond(True, lambda: state, lambda: new_state)


def test_without_a_lookahead_there_is_no_record_and_value_fn_goes_to_the_optimizer():
    seen = {}

    def sgd_seeing_value_fn(learning_rate):
        def update(updates, state, params=None, *, value_fn=None, **extra):
            seen["value_fn"] = value_fn
            return jax.tree.map(lambda g: -learning_rate * g, updates), state
        return optax.GradientTransformationExtraArgs(lambda params: optax.EmptyState(), update)

    tx = ao.plateau_escape(sgd_seeing_value_fn, 0.1)
    params = {"w": jnp.zeros(4)}
    state = tx.init(params)
    assert isinstance(state.lookahead, optax.EmptyState)
    assert "trial_values" not in state.fields()
    tx.update(params, state, params, value=1.0, value_fn=value_fn)
    assert seen["value_fn"] is value_fn


def test_update_never_transfers_to_host():
    tx = make_tx(lookahead=Lookahead(steps=2))
    params = {"w": jnp.zeros(4, jnp.float32)}
    update = jax.jit(lambda s: tx.update(params, s, params, value=jnp.float32(1.0),
                                         value_fn=value_fn))
    _, state = update(tx.init(params))
    with jax.transfer_guard("disallow"):
        for _ in range(3):
            _, state = update(state)
    assert int(optax.tree.get(state, "intervention_count")) == 3


def test_missing_value_fn_or_params_is_a_clear_error():
    tx = make_tx(lookahead=Lookahead())
    params = {"w": jnp.zeros(4)}
    state = tx.init(params)
    with pytest.raises(ValueError, match="value_fn"):
        tx.update(params, state, params, value=1.0)
    with pytest.raises(ValueError, match="needs params and value_fn"):
        tx.update(params, state, None, value=1.0, value_fn=value_fn)


@pytest.mark.parametrize("kwargs, exc, name", [
    (dict(steps=0), ValueError, "steps"),
    (dict(steps=2.5), TypeError, "steps"),
    (dict(memory="disk"), ValueError, "memory"),
    # Found by tests/_fuzz.py: an array compared elementwise, accepted or failing unnamed.
    (dict(memory=np.array("map")), ValueError, "memory must be one of"),
    (dict(memory=np.array(["map", "vmap"])), ValueError, "memory must be one of"),
    (dict(candidates=()), ValueError, "candidates"),
    (dict(candidates=POLICY_CHOICE), ValueError, "candidates"),
    (dict(candidates=((-1.0, "policy"),)), ValueError, r"candidates\[0\].*boost_scale"),
    (dict(candidates=((1.0, "bogus"),)), ValueError, r"candidates\[0\].*mix"),
    (dict(candidates=("policy",)), ValueError, r"candidates\[0\]"),
    (dict(batch_axis_name=["batch"]), ValueError, "batch_axis_name"),
    # A tuple is `Hashable` even when it holds a list: it failed at the first update.
    (dict(batch_axis_name=(["batch"],)), ValueError, "batch_axis_name must be None or"),
    (dict(rtol=-0.1), ValueError, "rtol"),
    (dict(atol=float("inf")), ValueError, "atol"),
    (dict(ramp="no"), TypeError, "ramp"),
    (dict(early_trial_window=1), ValueError, r"early_trial_window must be an integer in \[2, "),
    (dict(early_trial_window=2.0), TypeError, "early_trial_window"),
    (dict(early_trial_window=True), TypeError, "early_trial_window"),
    (dict(early_trial_window=2, candidates=(POLICY_CHOICE, Candidate(0.0))), ValueError,
     "early_trial_window needs NO_BOOST"),
    (dict(early_trial_progress=0.0), ValueError, r"early_trial_progress .*\(0, 1\]"),
    (dict(early_trial_progress=1.5), ValueError, "early_trial_progress"),
    (dict(early_trial_progress=float("nan")), ValueError, "early_trial_progress"),
])
def test_invalid_lookahead_raises_at_construction(kwargs, exc, name):
    with pytest.raises(exc, match=name):
        Lookahead(**kwargs)


def test_cut_labels_and_boosts():
    assert Candidate(cut=0.3).label == "cut x0.3"
    assert Candidate(cut=1.0).label == "hold"
    assert Candidate(cut=0.3, mix="current").label == "cut x0.3 current"
    assert Candidate(cut=0.5, mix=2).label == "cut x0.5 mix 2"
    assert float(Candidate(cut=0.5).boost(jnp.float32(5.0), jnp.float32(3.0))) == 1.5
    assert float(Candidate(cut=1.0).boost(jnp.float32(5.0), jnp.float32(3.0))) == 3.0


@pytest.mark.parametrize("kwargs, name", [
    (dict(cut=0.0), r"cut must be a finite number in \(0, 1\]"),
    (dict(cut=1.5), r"cut must be a finite number in \(0, 1\]"),
    (dict(cut=float("nan")), "cut"),
    (dict(cut=1e-50), "cut"),  # 0 in float32
    (dict(cut=0.5, boost_scale=2.0), "either boosts.*boost_scale = 2.0 and cut = 0.5"),
])
def test_invalid_cuts_raise_at_construction(kwargs, name):
    with pytest.raises(ValueError, match=name):
        Candidate(**kwargs)


def test_invalid_candidates_raise_at_construction():
    with pytest.raises(ValueError, match="boost_scale"):
        Candidate(boost_scale=float("nan"))
    with pytest.raises(ValueError, match="mix"):
        Candidate(mix=True)
    with pytest.raises(ValueError, match=r"candidates\[1\].mix = 9"):
        make_tx(lookahead=Lookahead(candidates=(POLICY_CHOICE, Candidate(1.0, 9))))
    with pytest.raises(TypeError, match="lookahead must be a Lookahead"):
        make_tx(lookahead="yes")


# The early trial: a run whose loss falls slowly never plateaus, so only an
# early trial can tell it that a boost is faster. Here the monitored value is
# the loss itself, one step per window and a patience that never runs out, so
# every trial below is an early one.

def make_early_tx(rate, early_trial_window=2, mode="min", **lookahead_kwargs):
    lookahead = Lookahead(steps=3, early_trial_window=early_trial_window, **lookahead_kwargs)
    return ao.plateau_escape(optax.sgd, rate, patience=1000, mode=mode, boost_warmup_steps=0,
                             rollback=None, policy=fixed_policy(), lookahead=lookahead)


def run_on_loss(tx, steps, sign=1.0, fn=value_fn, values=None):
    """SGD steps whose monitored value is ``sign`` times the loss, or ``values[i]`` at step
    ``i`` when given; the state after each step."""
    params = {"w": jnp.zeros(4, jnp.float32)}
    state = tx.init(params)
    traces = []

    @jax.jit
    def step(params, state, given):
        traces.append(1)  # a trial, early or not, must not retrace the update
        weights = optax.tree.get(state, "loss_weights")
        (_, monitored), grads = jax.value_and_grad(fn, has_aux=True)(params, weights)
        signed = lambda p, w: (fn(p, w)[0], sign * fn(p, w)[1])  # noqa: E731
        value = sign * monitored if values is None else given
        updates, state = tx.update(grads, state, params, value=value,
                                   value_fn=(fn if sign == 1.0 else signed))
        return optax.apply_updates(params, updates), state

    states = []
    for i in range(steps):
        params, state = step(params, state, jnp.float32(0.0 if values is None else values[i]))
        states.append(state)
    assert len(traces) == 1
    return states


def test_a_slow_start_is_tried_at_its_window_and_a_faster_boost_committed():
    # Rate 0.01: the loss falls ~1% a step (progress < 10%); x5 stays stable (0.05 * h_max = 0.1).
    states = run_on_loss(make_early_tx(0.01), steps=4)
    first, second, last = states[0], states[1], states[-1]
    assert trial(first)[1] == -1  # window 1 sets the best: no trial
    values, choice = trial(second)
    assert choice == DEFAULT_CANDIDATES.index(Candidate(2.0)) == int(np.argmin(values))
    assert int(optax.tree.get(second, "intervention_count")) == 1
    assert float(optax.tree.get(second, "learning_rate")) == pytest.approx(0.01 * 9.0)
    # Later windows are slow too, but the early trial is one window's.
    np.testing.assert_array_equal(trial(last)[0], values)
    assert trial(last)[1] == choice
    assert int(optax.tree.get(last, "intervention_count")) == 1


def test_an_early_trial_takes_each_boost_at_once_even_with_a_ramp():
    # With a ramp of 100 steps, a ramped 3-step trial would barely raise the rate.
    lookahead = Lookahead(steps=3, early_trial_window=2, candidates=(NO_BOOST, POLICY_CHOICE))
    tx = ao.plateau_escape(optax.sgd, 0.01, patience=1000, boost_warmup_steps=100,
                           rollback=None, policy=fixed_policy(), lookahead=lookahead)
    unramped = make_early_tx(0.01, candidates=(NO_BOOST, POLICY_CHOICE), ramp=False)
    ramped, at_once = (trial(run_on_loss(t, steps=2)[1])[0] for t in (tx, unramped))
    np.testing.assert_allclose(ramped, at_once, rtol=1e-6)


def test_a_fast_start_is_left_alone():
    # Rate 0.3: the loss falls by far more than 10% in a step; no trial, nothing changes.
    plain = run_on_loss(ao.plateau_escape(optax.sgd, 0.3, patience=1000, boost_warmup_steps=0,
                                          rollback=None, policy=fixed_policy(),
                                          lookahead=Lookahead(steps=3)), steps=3)
    early = run_on_loss(make_early_tx(0.3), steps=3)
    assert trial(early[-1])[1] == -1
    assert int(optax.tree.get(early[-1], "intervention_count")) == 0
    chex.assert_trees_all_equal(early[-1].optimizer_state, plain[-1].optimizer_state)
    # The same run made slow-looking by the threshold is tried.
    assert trial(run_on_loss(make_early_tx(0.3, early_trial_progress=1.0), steps=2)[1])[1] >= 0


def test_an_early_trial_that_no_boost_wins_changes_nothing():
    # Rate 0.75: every default boost (>= 3x: 2.25 * h_max > 2) diverges, no boost wins;
    # progress 1.0 tries the window whatever its progress.
    tx = make_early_tx(0.75, early_trial_progress=1.0)
    states = run_on_loss(tx, steps=3)
    values, choice = trial(states[1])
    assert choice == DEFAULT_CANDIDATES.index(NO_BOOST) == int(np.nanargmin(values))
    assert int(optax.tree.get(states[-1], "intervention_count")) == 0
    assert float(ao.state_field(states[-1], "boost_step")) == -1
    assert float(optax.tree.get(states[-1], "learning_rate")) == pytest.approx(0.75)


def test_an_early_trial_whose_candidates_all_diverge_to_nan_commits_nothing():
    # The run stays within |w| < 0.04 for its first 3 steps; every trial, no boost's too,
    # ends beyond 0.05, where the value is NaN.
    tx = make_early_tx(0.01, candidates=(NO_BOOST, Candidate(1000.0)))
    states = run_on_loss(tx, steps=3, fn=nan_beyond(0.05))
    values, choice = trial(states[1])
    assert np.isnan(values).all() and choice == -2
    assert int(optax.tree.get(states[-1], "intervention_count")) == 0
    assert float(optax.tree.get(states[-1], "learning_rate")) == pytest.approx(0.01)
    chex.assert_tree_all_finite(states[-1].optimizer_state)


def test_mode_max_tries_a_slowly_rising_score_as_min_tries_the_falling_loss():
    low, high = (run_on_loss(make_early_tx(0.01, mode=m), steps=2, sign=s)[1]
                 for m, s in (("min", 1.0), ("max", -1.0)))
    assert trial(low)[1] == trial(high)[1] >= 0
    assert float(optax.tree.get(low, "learning_rate")) == float(
        optax.tree.get(high, "learning_rate"))


def run_values(tx, values):
    """The last state of :func:`run_on_loss` with these monitored values."""
    return run_on_loss(tx, len(values), values=values)[-1]


@pytest.mark.parametrize("second", [1.0, 1.1, float("nan")], ids=["stalled", "rising", "nan"])
def test_a_window_that_did_not_improve_is_no_slow_start(second):
    tx = make_early_tx(0.01, early_trial_progress=1.0)
    assert trial(run_values(tx, [1.0, second, 0.5]))[1] == -1
    assert trial(run_values(tx, [1.0, 0.99]))[1] >= 0  # the same run, improving by 1%


def test_no_early_trial_after_an_intervention_nor_with_the_cap_at_zero():
    # Window 2 repeats window 1: a plateau (patience 0), an intervention; cooldown 1 keeps
    # window 3 from plateauing, and its 1% progress would be a slow start.
    lookahead = Lookahead(steps=3, early_trial_window=3)
    options = dict(cooldown=1, boost_warmup_steps=0, rollback=None, policy=fixed_policy(),
                   lookahead=lookahead)
    after_plateau = run_values(ao.plateau_escape(optax.sgd, 0.05, patience=0, **options),
                               [1.0, 1.0])
    later = run_values(ao.plateau_escape(optax.sgd, 0.05, patience=0, **options),
                       [1.0, 1.0, 0.99])
    assert int(optax.tree.get(later, "intervention_count")) == 1
    np.testing.assert_array_equal(trial(later)[0], trial(after_plateau)[0])
    # Without the plateau before it, window 3 is tried.
    patient = run_values(ao.plateau_escape(optax.sgd, 0.05, patience=5, **options),
                         [1.0, 1.0, 0.99])
    assert trial(patient)[1] >= 0
    capped = ao.plateau_escape(optax.sgd, 0.01, patience=1000, max_interventions=0,
                               rollback=None, policy=fixed_policy(),
                               lookahead=Lookahead(steps=3, early_trial_window=2))
    assert trial(run_values(capped, [1.0, 0.99, 0.98]))[1] == -1


def test_an_early_boost_is_watched_by_the_guard():
    # Guarded, the boost the early trial commits is snapshotted like a plateau's.
    lookahead = Lookahead(steps=3, early_trial_window=2)
    tx = ao.plateau_escape(optax.sgd, 0.01, patience=1000, boost_warmup_steps=0,
                           policy=fixed_policy(), lookahead=lookahead)
    state = run_on_loss(tx, steps=2)[1]
    assert int(optax.tree.get(state, "intervention_count")) == 1
    assert int(ao.state_field(state, "guard_windows_left")) > 0
