"""The named option sets: what README tells users to start with, and the seed's rules."""

import jax.numpy as jnp
import optax
import pytest

import adaptive_optax as ao
from adaptive_optax import presets
from adaptive_optax.lookahead import Lookahead


def test_recommended_is_a_ramp_over_one_window_and_the_rate_only_guard():
    options = presets.recommended_options(12)
    assert set(options) == {"accumulation_steps", "boost_warmup_steps", "rollback"}
    assert options["accumulation_steps"] == options["boost_warmup_steps"] == 12
    assert options["rollback"] == ao.RollbackGuard(restore_params=False)


def test_recommended_with_lookahead_adds_the_trials_and_the_update_ratio_limit():
    options = presets.recommended_options(3, lookahead=True)
    assert options["lookahead"] == Lookahead(early_trial_window=2)
    assert options["max_update_ratio"] == presets.MAX_UPDATE_RATIO == 0.005
    assert {k: v for k, v in options.items() if k not in ("lookahead", "max_update_ratio")} == \
        presets.recommended_options(3)
    tx = ao.plateau_escape(optax.adam, 1e-3, **options)
    params = {"w": jnp.ones(2)}
    with pytest.raises(ValueError, match="value_fn"):
        tx.update({"w": jnp.ones(2)}, tx.init(params), params, value=jnp.float32(1.0))


@pytest.mark.parametrize("kwargs, error, name", [
    (dict(accumulation_steps=0), ValueError, "accumulation_steps"),
    (dict(accumulation_steps=2.5), TypeError, "accumulation_steps"),
    (dict(accumulation_steps=2, lookahead="yes"), TypeError, "lookahead"),
])
def test_recommended_refuses_bad_arguments_by_name(kwargs, error, name):
    with pytest.raises(error, match=name):
        presets.recommended_options(**kwargs)


def test_unguarded_is_the_seeds_immediate_boost_without_a_guard():
    assert presets.unguarded_options() == {"boost_warmup_steps": 0, "rollback": None}
