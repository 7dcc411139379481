"""Boost multiplier: hold, warm-up ramp, decay back to the base."""

import jax.numpy as jnp
import numpy as np

from adaptive_optax.boost import boost_multiplier


def curve(steps, **kwargs):
    return np.array([float(boost_multiplier(jnp.int32(t), 2.0, 10.0, **kwargs)) for t in steps])


def test_hold_is_the_boost_from_the_first_step_on():
    np.testing.assert_allclose(curve(range(50)), 10.0)


def test_warmup_ramps_from_the_old_multiplier_and_reaches_boost_at_w():
    got = curve(range(6), warmup_steps=3)
    np.testing.assert_allclose(got, [4.0, 6.0, 8.0, 10.0, 10.0, 10.0], rtol=1e-6)
    assert np.all(np.diff(got) >= 0)


def test_decay_returns_linearly_to_the_base():
    got = curve(range(7), decay_steps=4)
    np.testing.assert_allclose(got, [10.0, 7.75, 5.5, 3.25, 1.0, 1.0, 1.0], rtol=1e-6)


def test_warmup_then_decay():
    got = curve(range(8), warmup_steps=2, decay_steps=2)
    np.testing.assert_allclose(got, [14 / 3, 22 / 3, 10.0, 5.5, 1.0, 1.0, 1.0, 1.0], rtol=1e-6)
