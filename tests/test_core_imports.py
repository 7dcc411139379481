"""The optimizer core imports and runs without flax, orbax or matplotlib.

``import adaptive_optax`` is the optimizer only (jax, optax, numpy); the
segmentation application, which needs flax, is ``adaptive_optax.segmentation``.
The check runs in a fresh interpreter in which importing flax, orbax or
matplotlib fails, so a core module that imports one of them (or imports the
segmentation package) fails this test.
"""

import subprocess
import sys

import pytest

import adaptive_optax as ao

BLOCKED = ("flax", "orbax", "matplotlib")

# A None entry in sys.modules makes `import NAME` (and `import NAME.sub`) raise
# ImportError, set before anything else is imported.
CORE_RUN = f"""
import sys
for name in {BLOCKED!r}:
    sys.modules[name] = None

import jax
import jax.numpy as jnp
import optax

import adaptive_optax as ao

tx = ao.plateau_escape(optax.adam, 1e-2)
params = {{"w": jnp.ones((3, 2)), "b": jnp.zeros(2)}}
state = tx.init(params)

@jax.jit
def step(params, state):
    loss, grads = jax.value_and_grad(
        lambda p: jnp.sum((p["w"].sum(0) + p["b"] - 1.0) ** 2))(params)
    updates, state = tx.update(grads, state, params, value=loss)
    return optax.apply_updates(params, updates), state, loss

for _ in range(3):
    params, state, loss = step(params, state)
assert bool(jnp.isfinite(loss)), loss
assert int(optax.tree.get(state, "intervention_count")) >= 0

blocked = {BLOCKED!r} + ("adaptive_optax.segmentation",)
loaded = sorted(name for name in sys.modules
                if sys.modules[name] is not None
                and any(name == b or name.startswith(b + ".") for b in blocked))
print("loaded:", loaded)
assert not loaded, loaded
print("ok")
"""


def test_the_core_imports_and_updates_with_flax_orbax_and_matplotlib_blocked():
    out = subprocess.run([sys.executable, "-c", CORE_RUN], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.strip().endswith("ok"), out.stdout


def test_blocking_works_in_the_subprocess():
    # The check above means something only if a blocked import really fails there.
    code = "import sys; sys.modules['flax'] = None\ntry:\n    import flax.nnx\n" \
           "except ImportError:\n    print('blocked')"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "blocked", out.stdout + out.stderr


@pytest.mark.parametrize("name", ["UNet", "fit", "History", "load_dataset", "make_optimizer",
                                  "STRATEGIES", "losses", "train"])
def test_a_moved_name_says_where_it_went(name):
    with pytest.raises(AttributeError,
                       match=rf"adaptive_optax\.{name} moved to adaptive_optax\.segmentation\.{name}"):
        getattr(ao, name)
    assert not hasattr(ao, name)
    assert name not in ao.__all__


def test_an_unknown_name_is_a_plain_attribute_error():
    with pytest.raises(AttributeError, match="has no attribute 'no_such_name'"):
        ao.no_such_name  # noqa: B018


def test_the_application_names_are_in_the_segmentation_package():
    from adaptive_optax import segmentation

    for name in segmentation.__all__:
        assert getattr(segmentation, name) is not None, name
    assert segmentation.__all__ == sorted(segmentation.__all__)
