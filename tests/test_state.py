"""Tests of adaptive_optax.state: the packed storage of the plateau-escape state."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import adaptive_optax as ao
from adaptive_optax.segmentation.policies import adaptive_mix_policy
from adaptive_optax import state as st
from adaptive_optax.grad_norm import GradNormState
from adaptive_optax.plateau import PlateauState
from adaptive_optax.policy import InterventionState
from adaptive_optax.rollback import RollbackState
from helpers import compiled_update_text, concatenate_sizes, hlo_counts

PARAMS = {"w": jnp.ones(4), "b": jnp.zeros([])}
GRADS = {"w": jnp.full(4, 0.1), "b": jnp.float32(0.1)}


def odd_records(guarded: bool):
    """Records whose values exercise every storage path: NaN, inf, bools, int32
    extremes, counters past 2**24 and PRNG-key words with the high bit set."""
    plateau = PlateauState(
        window_sum=jnp.float32(1.5), window_m2=jnp.float32(0.25),
        window_finite=jnp.int32(3), window_step=jnp.int32(4),
        windows_completed=jnp.int32(2**24 + 1), window_value=jnp.float32(np.nan),
        window_sd=jnp.float32(0.125),
        best_value=jnp.float32(-np.inf), plateau_count=jnp.int32(7),
        cooldown_count=jnp.int32(1), nonfinite_count=jnp.int32(2**31 - 1))
    grad = GradNormState(grad_norm_ema=jnp.float32(0.04), grad_norm_acc=jnp.float32(1e-30),
                         grad_norm_steps=jnp.int32(9), last_grad_norm=jnp.float32(np.inf),
                         nonfinite_grad_count=jnp.int32(-2**31))
    intervention = InterventionState(
        intervention_count=jnp.int32(2), lr_multiplier=jnp.float32(7.0),
        boost_from=jnp.float32(10.0), boost_to=jnp.float32(7.0), boost_step=jnp.int32(-1),
        mix_index=jnp.int32(5), planned_mix_index=jnp.array([3, 0, 6], jnp.int32),
        rng_key=jnp.array([0xFFFFFFFF, 0x80000001], jnp.uint32),
        conservatism=jnp.float32(0.25), force_final_mix=jnp.bool_(True))
    rollback = optax.EmptyState()
    if guarded:
        rollback = RollbackState(snapshot_params={"w": jnp.arange(3.0)},
                                 snapshot_boost_from=jnp.float32(5.0),
                                 snapshot_boost_to=jnp.float32(3.5),
                                 snapshot_boost_step=jnp.int32(-7),
                                 snapshot_mix_index=jnp.int32(4),
                                 snapshot_value=jnp.float32(np.nan),
                                 snapshot_sd=jnp.float32(0.5), probe_sum=jnp.float32(-1.5),
                                 probe_count=jnp.int32(11),
                                 guard_windows_left=jnp.int32(2), rollback_count=jnp.int32(1))
    return dict(step=jnp.int32(2**24 + 3), base_learning_rate=jnp.float32(1e-3),
                plateau=plateau, grad_norm=grad, intervention=intervention, rollback=rollback,
                loss_weights={"dice": jnp.float32(0.6), "focal": jnp.float32(0.4)},
                optimizer_state=optax.inject_hyperparams(optax.sgd)(learning_rate=0.1).init({}))


def test_layout_stores_every_record_field_exactly_once():
    stored = [*st.PUBLIC_FIELDS, *st.FLOAT_FIELDS, *st.INT_FIELDS,
              "rng_key", "planned_mix_index", "snapshot_params"]
    assert len(stored) == len(set(stored))
    records = {"step", "base_learning_rate"}
    for cls in (PlateauState, GradNormState, InterventionState, RollbackState):
        records |= set(cls._fields)
    assert set(stored) == records


@pytest.mark.parametrize("guarded", [False, True])
def test_records_round_trip_bit_exactly(guarded):
    records = odd_records(guarded)
    state = jax.jit(lambda r: st.PlateauEscapeState.from_records(**r))(records)
    chex.assert_trees_all_equal(state.plateau, records["plateau"])
    chex.assert_trees_all_equal(state.grad_norm, records["grad_norm"])
    chex.assert_trees_all_equal(state.intervention, records["intervention"])
    chex.assert_trees_all_equal(state.rollback, records["rollback"])
    assert int(state.step) == 2**24 + 3  # would be 2**24 + 4 stored as float32
    assert state.intervention.force_final_mix.dtype == jnp.bool_
    assert state.intervention.rng_key.dtype == jnp.uint32
    assert state.guarded is guarded
    assert state.packed_floats.dtype == jnp.float32 and state.packed_ints.dtype == jnp.int32
    assert state.packed_ints.shape == (len(st.INT_FIELDS) + 2 + 3,)


def test_fields_are_flat_and_leave_out_an_absent_guard():
    fields = st.PlateauEscapeState.from_records(**odd_records(False)).fields()
    assert "rollback_count" not in fields and "snapshot_value" not in fields
    assert float(fields["lr_multiplier"]) == 7.0
    assert float(fields["learning_rate"]) == pytest.approx(0.1)
    assert set(fields["loss_weights"]) == {"dice", "focal"}
    guarded = st.PlateauEscapeState.from_records(**odd_records(True)).fields()
    assert int(guarded["rollback_count"]) == 1
    assert "snapshot_params" not in guarded  # a parameter tree, not a field


def test_a_state_without_a_guard_stores_finite_placeholders():
    state = ao.plateau_escape(optax.adam, 1e-3, rollback=None).init(PARAMS)
    floats = dict(zip(st.FLOAT_FIELDS, np.asarray(state.packed_floats)))
    # Only window_value (NaN until the first window) may be non-finite.
    assert {k for k, v in floats.items() if not np.isfinite(v)} == {"window_value"}
    assert isinstance(state.rollback, optax.EmptyState)


def test_the_state_adds_eight_leaves_to_the_inner_optimizer_and_one_per_loss_weight():
    # 4 public scalars, 2 packed vectors, the injected learning rate and
    # inject_hyperparams' step count; unpacked it was 28. The default policy
    # has no loss mixes: its loss_weights is an empty dict, with no leaves.
    adam = optax.adam(1e-3).init(PARAMS)
    state = ao.plateau_escape(optax.adam, 1e-3).init(PARAMS)
    assert len(jax.tree.leaves(state)) - len(jax.tree.leaves(adam)) == 8
    assert state.loss_weights == {}
    mixed = ao.plateau_escape(optax.adam, 1e-3, policy=adaptive_mix_policy()).init(PARAMS)
    assert len(jax.tree.leaves(mixed)) - len(jax.tree.leaves(state)) == 4  # dice, focal, ...
    guarded = ao.plateau_escape(optax.adam, 1e-3, rollback=ao.RollbackGuard()).init(PARAMS)
    assert len(jax.tree.leaves(guarded)) - len(jax.tree.leaves(state)) == 2  # the snapshot


@pytest.mark.parametrize("name", st.PUBLIC_FIELDS + ("loss_weights", "learning_rate"))
def test_public_fields_are_found_once_by_optax_tree_get(name):
    tx = optax.chain(optax.clip(1.0), ao.plateau_escape(optax.adam, 1e-3))
    state = tx.init(PARAMS)
    assert len(optax.tree.get_all_with_path(state, name)) == 1
    chex.assert_trees_all_equal(optax.tree.get(state, name), ao.state_field(state, name))


def test_state_field_reads_packed_fields_through_a_chain():
    tx = optax.chain(optax.clip(1.0), ao.plateau_escape(optax.adam, 1e-3, accumulation_steps=2))
    state = tx.init(PARAMS)
    for value in (1.0, 0.5):
        _, state = tx.update(GRADS, state, PARAMS, value=jnp.float32(value))
    assert optax.tree.get(state, "windows_completed") is None  # packed, not a leaf
    assert int(ao.state_field(state, "windows_completed")) == 1
    assert float(ao.state_field(state, "window_value")) == pytest.approx(0.75)
    assert int(ao.state_field(state, "step")) == 2
    assert ao.find_state(state).plateau.window_step.dtype == jnp.int32


def test_fields_of_a_vmapped_state_are_read_per_run():
    # The packed vectors' last axis holds the fields; a leading axis is a batch of runs.
    tx = ao.plateau_escape(optax.adam, 1e-3, accumulation_steps=2)
    init, update = jax.vmap(tx.init), jax.vmap(lambda g, s, p, v: tx.update(g, s, p, value=v))
    params = jax.tree.map(lambda x: jnp.stack([x] * 3), PARAMS)
    grads = jax.tree.map(lambda x: jnp.stack([x] * 3), GRADS)
    state = init(params)
    for step in range(4):
        _, state = update(grads, state, params, jnp.array([1.0, 2.0, 3.0]) / (step + 1))
    fields = ao.find_state(state).fields()
    np.testing.assert_array_equal(fields["windows_completed"], [2, 2, 2])
    np.testing.assert_array_equal(fields["step"], [4, 4, 4])
    np.testing.assert_allclose(fields["window_value"], np.array([1.0, 2.0, 3.0]) * 7 / 24)
    assert fields["rng_key"].shape == (3, 2) and fields["planned_mix_index"].shape == (3, 3)
    one_run = jax.tree.map(lambda x: x[1], state)
    for name, value in ao.find_state(one_run).fields().items():
        chex.assert_trees_all_equal(jax.tree.map(lambda x: x[1], fields[name]), value)


def test_state_field_and_find_state_errors_name_the_problem():
    state = ao.plateau_escape(optax.adam, 1e-3).init(PARAMS)
    with pytest.raises(KeyError, match="'window_vale' is not a field.*window_value"):
        ao.state_field(state, "window_vale")
    with pytest.raises(ValueError, match="holds no PlateauEscapeState"):
        ao.find_state(optax.adam(1e-3).init(PARAMS))


def test_update_compiles_to_few_ops():
    """A regression guard on the compiled update's size (not a timing).

    Each op of the optimized HLO is a thunk on CPU and roughly a kernel launch
    on GPU. Counted as the benchmarks count them (``executed_ops``: entry ops,
    plus the largest branch of each conditional, since the CPU skip runs Adam's
    update inside one). On this 2-leaf model (jax 0.10, CPU) plain Adam runs 9
    ops; plateau_escape 38 (28 in the entry computation). The bound leaves
    room for XLA version drift.
    """
    def counts(tx):
        text = compiled_update_text(tx, PARAMS, GRADS)
        return hlo_counts(text)["executed_ops"], text

    adam, _ = counts(optax.with_extra_args_support(optax.adam(1e-3)))
    escape, text = counts(ao.plateau_escape(optax.adam, 1e-3))
    assert escape - adam <= 40, (adam, escape)
    # The packing is selects, not a concatenate (one thunk per scalar on CPU);
    # the one concatenate joins the 5 gradient elements for the norm.
    packed_sizes = {len(st.FLOAT_FIELDS), len(st.INT_FIELDS) + 2 + 3}
    concatenated = concatenate_sizes(text)
    assert concatenated == [5] and not packed_sizes & set(concatenated), concatenated
