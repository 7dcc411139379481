"""The update-ratio limit on boosts: the bound itself, and plateau_escape(max_update_ratio=...)."""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import adaptive_optax as ao
from adaptive_optax.boost_limit import update_ratio_limit
from adaptive_optax.lookahead import NO_BOOST, POLICY_CHOICE, Candidate, Lookahead

PARAMS = {"w": jnp.ones(4, jnp.float32)}
SGD = optax.sgd(1.0)


def sgd_step(grads, state, params):
    return SGD.update(grads, state, params)


def limit_of(grads, params=PARAMS, needed=True, max_ratio=0.05):
    return float(update_ratio_limit(jnp.bool_(needed), max_ratio, sgd_step, grads,
                                    SGD.init(params), params))


def test_the_limit_keeps_the_boosted_update_within_the_ratio():
    # the update is 1% of the weights' norm: a boost up to 5x keeps it within 5%
    assert limit_of({"w": jnp.full(4, 0.01)}) == pytest.approx(5.0)
    assert limit_of({"w": jnp.full(4, 0.001)}) == pytest.approx(50.0)


def test_the_limit_never_asks_for_a_cut():
    assert limit_of({"w": jnp.full(4, 1.0)}) == 1.0  # the update is 100% of the weights


def test_edge_cases_give_no_boost_or_no_limit():
    assert limit_of({"w": jnp.zeros(4)}) == math.inf  # a zero step: nothing to bound
    assert limit_of({"w": jnp.full(4, jnp.nan)}) == 1.0  # unknown size: no boost
    assert limit_of({"w": jnp.full(4, 0.1)}, params={"w": jnp.zeros(4)}) == 1.0
    assert limit_of({"w": jnp.full(4, 0.01)}, needed=False) == math.inf


def test_a_step_that_may_not_intervene_ignores_the_update():
    def step(grads, state, params):
        return jax.tree.map(lambda g: jnp.full_like(g, jnp.nan), grads), state

    # A NaN update gives no boost where it is read; where it is not, there is no limit.
    limit = jax.jit(lambda needed: update_ratio_limit(
        needed, 0.05, step, {"w": jnp.full(4, 0.01)}, SGD.init(PARAMS), PARAMS))
    assert float(limit(jnp.bool_(False))) == math.inf
    assert float(limit(jnp.bool_(True))) == 1.0  # the NaN update: no boost


def make_tx(rate, max_update_ratio=None, **kwargs):
    policy = ao.InterventionPolicy(use_grad_norm=False, fixed_boosts=(10.0,), damping=(1.0,))
    return ao.plateau_escape(optax.sgd, rate, patience=0, boost_warmup_steps=0, policy=policy,
                             rollback=None, max_update_ratio=max_update_ratio, **kwargs)


def rates(tx, steps=4, grads=0.01, trace_check=False, value_fn=None):
    """Effective rate after each step on a flat monitored value (a plateau every window)."""
    def step(params, state):
        updates, state = tx.update({"w": jnp.full(4, grads, jnp.float32)}, state, params,
                                   value=jnp.float32(1.0), value_fn=value_fn)
        return params, state  # params held: every step sees the same ratio

    step = jax.jit(chex.assert_max_traces(step, n=1) if trace_check else step)
    params, state, out = PARAMS, tx.init(PARAMS), []
    for _ in range(steps):
        params, state = step(params, state)
        out.append(float(optax.tree.get(state, "learning_rate")))
    return np.array(out), state


def test_a_rate_whose_steps_are_large_gets_only_the_boost_the_ratio_allows():
    # rate 0.5: the step is 0.5% of the weights; 1% allows x2 of the policy's x10
    uncapped, _ = rates(make_tx(0.5))
    capped, _ = rates(make_tx(0.5, max_update_ratio=0.01))
    np.testing.assert_allclose(uncapped[:2], [0.5, 5.0], rtol=1e-6)
    np.testing.assert_allclose(capped[:2], [0.5, 1.0], rtol=1e-6)


def test_a_rate_whose_steps_are_tiny_keeps_the_full_boost():
    uncapped, _ = rates(make_tx(1e-3))
    capped, _ = rates(make_tx(1e-3, max_update_ratio=0.01))
    np.testing.assert_array_equal(capped, uncapped)
    assert capped[1] == pytest.approx(1e-2)


def test_the_limit_is_read_at_each_intervention_and_compiles_once():
    # the first boost is capped at x2; a later one, from the same state, too:
    # the limit is relative to the base rate, not to the rate in force
    capped, state = rates(make_tx(0.5, max_update_ratio=0.01), steps=4, trace_check=True)
    assert int(optax.tree.get(state, "intervention_count")) == 3
    np.testing.assert_allclose(capped[1:], [1.0, 1.0, 1.0], rtol=1e-6)


def test_the_capped_update_never_transfers_to_host():
    tx = make_tx(0.5, max_update_ratio=0.01)
    update = jax.jit(lambda s: tx.update(PARAMS, s, PARAMS, value=jnp.float32(1.0)))
    _, state = update(tx.init(PARAMS))
    with jax.transfer_guard("disallow"):
        for _ in range(3):
            _, state = update(state)
    assert int(optax.tree.get(state, "intervention_count")) == 3


def value_fn(params, weights):
    del weights
    value = jnp.sum(params["w"] ** 2)
    return value, value


def test_lookahead_candidates_past_the_limit_are_tried_and_committed_at_it():
    # every candidate boosts; "x2" is past the limit, so it ties with the policy's
    # (capped) boost and the incumbent keeps it: the committed rate is the limit's
    lookahead = Lookahead(steps=1, candidates=(POLICY_CHOICE, Candidate(2.0)))
    tx = make_tx(0.5, max_update_ratio=0.01, lookahead=lookahead)
    capped, state = rates(tx, steps=2, value_fn=value_fn)
    assert capped[1] == pytest.approx(1.0)
    values = np.asarray(optax.tree.get(state, "trial_values"))
    assert values[0] == values[1]  # both tried at the limit's rate


def test_no_boost_still_wins_a_trial_where_the_capped_boost_overshoots():
    # sum(w**2) from w = 1: a step at rate 0.5 lands on the minimum, one at the
    # capped x2 (rate 1.0) overshoots to w = -1
    lookahead = Lookahead(steps=1, candidates=(POLICY_CHOICE, NO_BOOST))
    tx = make_tx(0.5, max_update_ratio=0.01, lookahead=lookahead)
    capped, state = rates(tx, steps=2, value_fn=value_fn)
    np.testing.assert_allclose(np.asarray(optax.tree.get(state, "trial_values")), [4.0, 0.0],
                               atol=1e-6)
    assert int(optax.tree.get(state, "trial_choice")) == 1
    assert capped[1] == pytest.approx(0.5)


@pytest.mark.parametrize("value", [0.0, -0.1, math.inf, math.nan, "0.1", True])
def test_invalid_max_update_ratio_raises_at_construction(value):
    with pytest.raises((ValueError, TypeError), match="max_update_ratio"):
        make_tx(0.5, max_update_ratio=value)


def test_update_without_params_is_a_clear_error():
    tx = make_tx(0.5, max_update_ratio=0.01)
    with pytest.raises(ValueError, match="max_update_ratio needs params"):
        tx.update(PARAMS, tx.init(PARAMS), value=1.0)
