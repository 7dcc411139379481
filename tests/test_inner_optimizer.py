"""Tests of adaptive_optax.inner_optimizer: building the wrapped optimizer."""

import functools
import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
import optax
import pytest

import adaptive_optax as ao
from adaptive_optax.segmentation.policies import scripted_policy
from adaptive_optax.inner_optimizer import as_schedule, inject_learning_rate, with_learning_rate


def test_as_schedule_makes_a_float32_constant_and_keeps_schedules():
    schedule = as_schedule(0.25)
    assert schedule(jnp.int32(7)).dtype == jnp.float32 and float(schedule(7)) == 0.25
    cosine = optax.cosine_decay_schedule(1.0, 10)
    assert as_schedule(cosine) is cosine
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="learning_rate"):
            as_schedule(bad)
    for bad in (True, "0.1"):
        with pytest.raises(TypeError, match="learning_rate"):
            as_schedule(bad)


def test_only_the_learning_rate_is_injected_and_set_in_its_dtype():
    tx = inject_learning_rate(optax.adam, {"b1": 0.8})
    state = tx.init({"w": jnp.zeros(3, jnp.bfloat16)})
    assert list(state.hyperparams) == ["learning_rate"]
    # inject_hyperparams keeps the rate in the parameters' dtype, so bf16 updates
    # are not promoted to float32; with_learning_rate keeps that dtype.
    assert state.hyperparams["learning_rate"].dtype == jnp.bfloat16
    state = with_learning_rate(state, jnp.float32(0.5))
    chex.assert_trees_all_equal(state.hyperparams["learning_rate"], jnp.bfloat16(0.5))
    assert state.inner_state[0].mu["w"].dtype == jnp.bfloat16


@pytest.mark.parametrize("kwargs, name", [({"b1": "x"}, "b1"), ({"b1": 0.9, "eps": "tiny"}, "eps"),
                                          ({"weight_decay": None}, "weight_decay")])
def test_a_bad_keyword_value_is_named_at_construction(kwargs, name):
    optimizer = optax.adamw if "weight_decay" in kwargs else optax.adam
    with pytest.raises(TypeError, match=rf"optimizer_kwargs\['{name}'\] = .* does not work with"):
        ao.plateau_escape(optimizer, 1e-3, optimizer_kwargs=kwargs)


PARAMS = {"kernel": jnp.ones((3, 2)), "bias": jnp.ones(2)}


@pytest.mark.parametrize("mask", [{"kernel": True, "bias": False},
                                  lambda p: {"kernel": True, "bias": False}])
def test_a_mask_shaped_like_the_parameters_is_accepted(mask):
    # The stand-in parameter of the construction-time check has another
    # structure; a pytree or callable keyword is checked against the real ones.
    tx = ao.plateau_escape(optax.adamw, 0.1, optimizer_kwargs=dict(weight_decay=0.5, mask=mask))
    zero = jax.tree.map(jnp.zeros_like, PARAMS)
    updates, _ = jax.jit(lambda s: tx.update(zero, s, PARAMS, value=1.0))(tx.init(PARAMS))
    # Zero gradients: only weight decay moves a parameter, and only the kernel is decayed.
    chex.assert_trees_all_close(updates, {"kernel": jnp.full((3, 2), -0.05), "bias": jnp.zeros(2)})


def test_a_nested_list_mask_is_accepted():
    # A ragged nested list made np.ndim raise in the scalar test at construction.
    params = [[jnp.ones((3, 2)), jnp.ones(2)], jnp.ones(2)]
    tx = ao.plateau_escape(optax.adamw, 0.1,
                           optimizer_kwargs=dict(weight_decay=0.5, mask=[[True, False], True]))
    zero = jax.tree.map(jnp.zeros_like, params)
    updates, _ = tx.update(zero, tx.init(params), params, value=1.0)
    chex.assert_trees_all_close(updates, [[jnp.full((3, 2), -0.05), jnp.zeros(2)],
                                          jnp.full(2, -0.05)])


def test_structured_keywords_are_checked_once_per_parameter_signature(monkeypatch):
    # The reset path calls init inside every traced update: the check (two
    # abstract traces over all parameters) must not rerun there.
    from adaptive_optax import inner_optimizer
    calls = []
    real = inner_optimizer._fails
    monkeypatch.setattr(inner_optimizer, "_fails", lambda *a: calls.append(1) or real(*a))
    tx = ao.plateau_escape(optax.adamw, 0.1, optimizer_kwargs={"mask": {"kernel": True,
                                                                          "bias": False}},
                           policy=scripted_policy())  # resets: init runs inside update
    state = tx.init(PARAMS)
    first = len(calls)
    assert first == 2  # without the keyword, then with it
    tx.init(PARAMS)
    jax.jit(lambda s: tx.update(PARAMS, s, PARAMS, value=1.0))(state)
    assert len(calls) == first
    tx.init({"kernel": jnp.ones((4, 2)), "bias": jnp.ones(2)})  # another signature: checked
    assert len(calls) == first + 2


@pytest.mark.parametrize("kwargs, name", [({"mask": {"kernel": True}}, "mask"),
                                          ({"b1": 0.9, "eps": [1, 2]}, "eps")])
def test_a_structured_keyword_that_does_not_fit_is_named_at_init(kwargs, name):
    tx = ao.plateau_escape(optax.adamw, 1e-3, optimizer_kwargs=kwargs)  # structure unknown here
    for init in (tx.init, jax.jit(tx.init)):
        with pytest.raises(TypeError, match=rf"optimizer_kwargs\['{name}'\] = .* does not work"):
            init(PARAMS)


def test_an_unknown_keyword_is_named_at_construction():
    with pytest.raises(TypeError, match=r"optimizer_kwargs\['beta'\]: not an argument of 'adam', "
                                        r"which takes \['b1', 'b2', "):
        ao.plateau_escape(optax.adam, 1e-3, optimizer_kwargs={"beta": 0.9})
    with pytest.raises(TypeError, match=r"functools.partial keyword beta: not an argument"):
        ao.plateau_escape(functools.partial(optax.adam, beta=0.9), 1e-3)


def test_a_factory_that_needs_more_than_value_is_not_blamed_on_its_keywords():
    # Its update needs an extra argument the abstract check cannot supply; the
    # check must not reject the (valid) keyword because of that.
    def needs_extra(learning_rate, decay=0.5):
        def update(updates, state, params=None, *, temperature, **extra):
            return jax.tree.map(lambda u: -learning_rate * decay * temperature * u, updates), state
        return optax.GradientTransformationExtraArgs(lambda p: optax.EmptyState(), update)

    tx = ao.plateau_escape(needs_extra, 0.1, optimizer_kwargs={"decay": 0.25})
    params = {"w": jnp.ones(2)}
    updates, _ = tx.update(params, tx.init(params), params, value=1.0, temperature=2.0)
    chex.assert_trees_all_close(updates, {"w": jnp.full(2, -0.05)})


def test_construction_starts_no_backend():
    # jax.distributed.initialize must run before any backend starts; building
    # the optimizer (and checking its keywords) must not start one.
    code = ("import optax, adaptive_optax as ao\n"
            "ao.plateau_escape(optax.adam, 1e-3, patience=1, optimizer_kwargs={'b1': 0.9})\n"
            "from jax._src import xla_bridge\n"
            "print(sorted(xla_bridge._backends))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def _first_update(tx):
    params = {"w": jnp.ones(3)}
    updates, _ = tx.update({"w": jnp.array([0.1, -0.2, 0.3])}, tx.init(params), params, value=1.0)
    return updates


def test_a_partial_of_the_factory_is_its_optimizer_kwargs():
    # b1 acts from the first step; eps (huge, to be seen) too.
    expected = _first_update(ao.plateau_escape(optax.adam, 0.1,
                                               optimizer_kwargs={"b1": 0.5, "eps": 1.0}))
    partial = ao.plateau_escape(functools.partial(optax.adam, b1=0.5, eps=1.0), 0.1)
    chex.assert_trees_all_close(_first_update(partial), expected)
    # optimizer_kwargs override the partial's keywords, as in a call of the partial.
    both = ao.plateau_escape(functools.partial(optax.adam, b1=0.5, eps=0.1), 0.1,
                             optimizer_kwargs={"eps": 1.0})
    chex.assert_trees_all_close(_first_update(both), expected)
    plain = _first_update(ao.plateau_escape(optax.adam, 0.1))
    assert not jnp.allclose(plain["w"], expected["w"])
    with pytest.raises(TypeError, match=r"functools.partial keyword b1 = 'x' does not work with "
                                        r"'adam'"):
        ao.plateau_escape(functools.partial(optax.adam, b1="x"), 0.1)


@pytest.mark.parametrize("optimizer, optimizer_kwargs, match", [
    (optax.adam, {"learning_rate": 0.1}, "pass learning_rate to plateau_escape, not in "
                                         "optimizer_kwargs"),
    (functools.partial(optax.adam, learning_rate=0.1), None, "binds learning_rate; leave it "
                                                             "unbound"),
    (functools.partial(optax.sgd, 0.1), None, "must take a learning_rate argument \\(a "
                                              "functools.partial must leave it unbound\\)"),
])
def test_a_learning_rate_for_the_optimizer_is_refused(optimizer, optimizer_kwargs, match):
    # The rate is plateau_escape's: it injects it with its boosts.
    with pytest.raises(TypeError, match=match):
        ao.plateau_escape(optimizer, 0.1, optimizer_kwargs=optimizer_kwargs)


@pytest.mark.parametrize("bad", [[("b1", 0.9)], "b1", {1: 0.9}])
def test_optimizer_kwargs_must_map_names(bad):
    with pytest.raises(TypeError, match="optimizer_kwargs must be a mapping"):
        ao.plateau_escape(optax.adam, 0.1, optimizer_kwargs=bad)


def test_the_old_spelling_names_the_new_one():
    message = ("plateau_escape got an unexpected keyword argument 'b1': pass the optimizer's own "
               "arguments as optimizer_kwargs={'b1': 0.95} (or "
               "functools.partial(optax.adam, b1=0.95)).")
    with pytest.raises(TypeError) as err:
        ao.plateau_escape(optax.adam, 1e-3, b1=0.95)
    assert str(err.value) == message
    # Also for keyword-only calls, several keywords, and one neither function takes.
    with pytest.raises(TypeError, match=r"unexpected keyword arguments 'momentum', 'patiense': "
                                        r"pass .* optimizer_kwargs=\{'momentum': 0.9\} \(or "
                                        r"functools.partial\(optax.sgd, momentum=0.9\)\); "
                                        r"'patiense' is not an argument of optax.sgd either "
                                        r"\(did you mean patience\?\)\."):
        ao.plateau_escape(optimizer=optax.sgd, learning_rate=0.1, momentum=0.9, patiense=1)
