"""First, do no harm: a run that has converged at a good rate is not wrecked.

A small tanh network fits a noisy regression with Adam. At a good rate (3e-2)
the run converges, the detector calls the noise floor a plateau, the gradient
norm there is small, so the seed's rules pick big boosts (x10-x15) and the
loss jumps (3.6x in the window after the first intervention, measured when
this test was written). The defaults (a one-window ramp and the rate-reverting
guard) must keep every post-intervention window below 1.5x the one that fired
it and end where the constant rate ends; at a rate that stalls (1e-3) they
must still rescue the run. So must the update-ratio limit on its own
(``max_update_ratio``, with the seed's unguarded, unramped boosts): at the good
rate Adam's steps are already large against the weights, so it allows no big
boost; at the stalling rate they are tiny, and the boosts go through as before.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import adaptive_optax as ao

WINDOW = 20
STEPS = 1200


def _problem(seed=0, n=512, d=8, hidden=32):
    k = jax.random.split(jax.random.key(seed), 4)
    x = jax.random.normal(k[0], (n, d))
    y = jnp.tanh(x @ jax.random.normal(k[1], (d, 1))) + 0.1 * jax.random.normal(k[2], (n, 1))
    params = {"w1": jax.random.normal(k[3], (d, hidden)) / np.sqrt(d), "b1": jnp.zeros((1, hidden)),
              "w2": jnp.zeros((hidden, 1)), "b2": jnp.zeros((1, 1))}
    return x, y, params


def _loss(params, x, y):
    return jnp.mean((jnp.tanh(x @ params["w1"] + params["b1"]) @ params["w2"] + params["b2"] - y) ** 2)


def train(lr, **options):
    """Per-step mini-batch losses, intervention counts, and the full-data loss at the end."""
    tx = ao.plateau_escape(optax.adam, lr, accumulation_steps=WINDOW, patience=2, cooldown=1,
                           rtol=1e-3, **options)
    x, y, params = _problem()
    batches = jax.random.randint(jax.random.key(1), (STEPS, 32), 0, x.shape[0])

    def step(carry, index):
        params, state = carry
        loss, grads = jax.value_and_grad(_loss)(params, x[index], y[index])
        updates, state = tx.update(grads, state, params, value=loss)
        return (optax.apply_updates(params, updates), state), (
            loss, optax.tree.get(state, "intervention_count"))

    (params, _), (losses, counts) = jax.jit(
        lambda carry: jax.lax.scan(step, carry, batches))((params, tx.init(params)))
    return np.asarray(losses), np.asarray(counts), float(_loss(params, x, y))


def jumps(losses, counts):
    """Mean of the window after each intervention over the mean of the window that fired it."""
    steps = np.nonzero(np.diff(counts, prepend=0))[0]
    return [losses[s + 1:s + 1 + WINDOW].mean() / losses[s - WINDOW + 1:s + 1].mean()
            for s in steps if s + 1 + WINDOW <= len(losses)]


@pytest.fixture(scope="module")
def constant_at_a_good_rate():
    return train(3e-2, max_interventions=0)


def test_the_seed_rules_wreck_a_converged_run(constant_at_a_good_rate):
    # The failure this file guards against, reproduced (so the test below can fail).
    losses, counts, final = train(3e-2, **ao.presets.unguarded_options())
    assert counts[-1] >= 1
    assert max(jumps(losses, counts)) >= 1.5
    assert final > 2.0 * constant_at_a_good_rate[2]


def test_the_defaults_do_no_harm_to_a_converged_run(constant_at_a_good_rate):
    losses, counts, final = train(3e-2)
    assert counts[-1] >= 1  # it did intervene: the guard, not inaction, kept the run
    assert max(jumps(losses, counts)) < 1.5
    assert final <= 1.05 * constant_at_a_good_rate[2]


def test_the_defaults_still_rescue_a_stalling_rate():
    _, _, stalled = train(1e-3, max_interventions=0)
    _, counts, rescued = train(1e-3)
    assert counts[-1] >= 1
    assert rescued < 0.7 * stalled


def test_the_update_ratio_limit_alone_keeps_the_seed_rules_from_wrecking_it(
        constant_at_a_good_rate):
    losses, counts, final = train(3e-2, **ao.presets.unguarded_options(), max_update_ratio=0.005)
    assert counts[-1] >= 1
    assert max(jumps(losses, counts)) < 1.5
    assert final <= 1.05 * constant_at_a_good_rate[2]


def test_the_update_ratio_limit_leaves_the_rescue_of_a_stalling_rate_as_it_was():
    unguarded = ao.presets.unguarded_options()
    capped, counts, rescued = train(1e-3, **unguarded, max_update_ratio=0.005)
    uncapped, _, _ = train(1e-3, **unguarded)
    assert counts[-1] >= 1
    np.testing.assert_array_equal(capped, uncapped)  # every boost under the limit
    assert rescued < 0.7 * train(1e-3, max_interventions=0)[2]
