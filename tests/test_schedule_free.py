"""boost_neutral_schedule_free: optax's schedule-free, its average weighted by the base rate."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import adaptive_optax as ao
from adaptive_optax.schedule_free import boost_neutral_schedule_free

RATE = optax.warmup_constant_schedule(0.0, 3e-2, 5)
OPTAX = {"adamw": optax.contrib.schedule_free_adamw, "sgd": optax.contrib.schedule_free_sgd}


def run(tx, values, steps=None, params=None):
    """``tx`` over ``values`` with sin gradients; returns (params, state, [(grads, state)])."""
    params = params if params is not None else {"w": jnp.arange(3.0)}
    state = tx.init(params)
    update = jax.jit(tx.update)
    steps = []
    for t, v in enumerate(values):
        grads = jax.tree.map(lambda x: jnp.sin(x + t), params)
        updates, state = update(grads, state, params, value=jnp.float32(v))
        params = optax.apply_updates(params, updates)
        steps.append((grads, state))
    return params, state, steps


@pytest.mark.parametrize("variant", ["adamw", "sgd"])
def test_without_interventions_it_is_optaxs_schedule_free_update_for_update(variant):
    ours = ao.plateau_escape(boost_neutral_schedule_free(RATE, variant), RATE, max_interventions=0)
    theirs = ao.plateau_escape(OPTAX[variant], RATE, max_interventions=0)
    values = np.linspace(1.0, 0.5, 12)
    p_ours, s_ours, _ = run(ours, values)
    p_theirs, s_theirs, _ = run(theirs, values)
    np.testing.assert_array_equal(p_ours["w"], p_theirs["w"])
    sf_ours = optax.tree.get(s_ours, "ScheduleFreeState")
    sf_theirs = optax.tree.get(s_theirs, "ScheduleFreeState")
    np.testing.assert_array_equal(sf_ours.weight_sum, sf_theirs.weight_sum)
    np.testing.assert_array_equal(sf_ours.z["w"], sf_theirs.z["w"])


@pytest.mark.parametrize("variant", ["adamw", "sgd"])
def test_a_boost_scales_the_steps_but_not_the_averaging_weights(variant):
    # A flat value with patience 0 and windows of 2: the seed's boost at once.
    options = dict(patience=0, accumulation_steps=2, max_interventions=1,
                   **ao.presets.unguarded_options())
    ours = ao.plateau_escape(boost_neutral_schedule_free(3e-2, variant), 3e-2, **options)
    theirs = ao.plateau_escape(OPTAX[variant], 3e-2, **options)
    _, s_ours, steps = run(ours, [1.0] * 8)
    _, s_theirs, _ = run(theirs, [1.0] * 8)
    assert int(optax.tree.get(s_ours, "intervention_count")) == 1
    lrs = [float(optax.tree.get(s, "learning_rate")) for _, s in steps]
    assert max(lrs) > 2 * 3e-2  # the boost is in the injected rate
    sf_ours = optax.tree.get(s_ours, "ScheduleFreeState")
    sf_theirs = optax.tree.get(s_theirs, "ScheduleFreeState")
    # Ours weights every step by the base rate; optax's by the boosted running maximum.
    np.testing.assert_allclose(sf_ours.max_lr, 3e-2, rtol=1e-6)
    np.testing.assert_allclose(sf_ours.weight_sum, 8 * 3e-2 ** 2, rtol=1e-5)
    np.testing.assert_allclose(sf_theirs.max_lr, max(lrs), rtol=1e-6)
    # The boost still drives z: for SGD, z moves by -(boosted rate) * gradient.
    if variant == "sgd":
        boosted = int(np.argmax(lrs))
        z = [optax.tree.get(steps[i][1], "ScheduleFreeState").z["w"]
             for i in (boosted - 1, boosted)]
        np.testing.assert_allclose(z[1] - z[0], -lrs[boosted] * steps[boosted][0]["w"], rtol=1e-5)


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match=r"variant must be one of \('adamw', 'sgd'\)"):
        boost_neutral_schedule_free(1e-3, "adam")
    with pytest.raises(ValueError, match="base_learning_rate"):
        boost_neutral_schedule_free(-1.0)
    with pytest.raises(TypeError, match="base_learning_rate"):
        boost_neutral_schedule_free("fast")


def test_its_factory_takes_the_variants_keywords_and_refuses_warmup_steps():
    factory = boost_neutral_schedule_free(1e-3)
    ao.plateau_escape(factory, 1e-3, optimizer_kwargs={"b1": 0.95, "weight_decay": 1e-4})
    with pytest.raises(TypeError, match="warmup_steps"):
        ao.plateau_escape(factory, 1e-3, optimizer_kwargs={"warmup_steps": 5})
