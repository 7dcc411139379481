"""Worker for tests/test_parallel.py: one U-Net run on 1 device, the same run on 8.

Run it in a fresh process with 8 fake CPU devices (XLA reads the flag once,
when jax initialises, so the test process itself cannot switch):

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/_multidevice_worker.py out.json

It trains a small U-Net with ``plateau_escape`` set to intervene within a few
steps, three times over the same global batches:

* ``single``: a 1-device mesh and the plain ``make_train_step``;
* ``plain8``: an 8-device mesh, the plain ``make_train_step`` with the state
  replicated and each batch sharded (jit's sharding propagation only);
* ``pinned8``: an 8-device mesh, ``parallel.data_parallel(make_train_step(...))``
  driven by ``loop.fit`` with unsharded batches, as the demo would use it.

It also runs a tiny ``jax.shard_map`` step twice to show the documented rule:
averaging only the gradients lets the devices' intervention counts diverge;
averaging the loss too keeps them equal.

It writes a JSON summary to the path in ``argv[1]``; the test asserts on it.
"""

from __future__ import annotations

import json
import sys

import jax

# The 1-device and 8-device programs reduce in different orders; full-precision
# matmuls keep the difference at float32 rounding.
jax.config.update("jax_default_matmul_precision", "highest")

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import adaptive_optax as ao  # noqa: E402
from adaptive_optax import parallel  # noqa: E402
from adaptive_optax.segmentation.policies import adaptive_mix_policy  # noqa: E402
from adaptive_optax.segmentation.data import SegmentationData, synthetic_shapes  # noqa: E402
from adaptive_optax.segmentation.loop import fit  # noqa: E402
from adaptive_optax.segmentation.train import (  # noqa: E402
    init_train_state,
    make_eval_step,
    make_train_step,
)
from adaptive_optax.segmentation.unet import UNet  # noqa: E402

DEVICES = 8
GLOBAL_BATCH = 8
STEPS_PER_EPOCH = 5
EPOCHS = 4  # 20 steps


def build(policy: ao.InterventionPolicy):
    """The model and optimizer every run starts from (same seed, same config)."""
    # An "rbg" key: threefry initialisation compiles many small eager kernels,
    # seconds of start-up on a 2-core machine.
    rngs = nnx.Rngs(jax.random.key(0, impl="rbg"))
    model = UNet(depth=1, base_width=4, norm="group", rngs=rngs)
    # rtol=0.02 with patience=0: any step that does not beat the best monitor
    # by 2 % is a plateau, so interventions come within the first steps; the
    # monitor's margins to that threshold are ~1e-3, far above float noise.
    # eps=1e-4, not Adam's 1e-8: GroupNorm makes some gradient directions ~0
    # (scale/shift invariance), and a tiny eps turns the float noise there into
    # +-lr steps that differ between reduction orders. The comparison is about
    # data parallelism, not about that amplification.
    tx = ao.plateau_escape(optax.adam, 1e-3, patience=0, cooldown=2, rtol=0.02,
                           max_interventions=3, policy=policy,
                           optimizer_kwargs={"eps": 1e-4})
    return init_train_state(model, tx)


def run(num_devices: int, how: str, train, val, policy) -> dict:
    """Trains 20 steps on ``num_devices`` devices; returns history and final params."""
    mesh = parallel.data_parallel_mesh(num_devices)
    graphdef, state = build(policy)
    state = parallel.replicate(state, mesh)
    step = make_train_step(graphdef, reference_weights=policy.initial_mix)
    replicated_after_each_step = []
    if how == "pinned":
        step = parallel.data_parallel(step, mesh)
        sharded_step = step
    else:
        def sharded_step(state, batch):
            return step(state, parallel.shard_batch(batch, mesh))

    def checked_step(state, batch):
        state, metrics = sharded_step(state, batch)
        replicated_after_each_step.append(parallel.is_replicated((state, metrics)))
        return state, metrics

    state, history = fit(checked_step, make_eval_step(graphdef), state, train, val,
                         epochs=EPOCHS, batch_size=GLOBAL_BATCH,
                         steps_per_epoch=STEPS_PER_EPOCH, seed=0)
    params = nnx.to_pure_dict(nnx.state(nnx.merge(graphdef, state)[0], nnx.Param))
    leaves = jax.tree.leaves(state)
    return dict(
        devices=num_devices,
        how=how,
        mesh_devices=int(mesh.size),
        steps={k: history.steps[k] for k in ("loss", "monitor", "learning_rate",
                                             "intervention_count", "mix_index",
                                             "plateau_count", "grad_norm_ema")},
        interventions=history.interventions,
        params=[np.asarray(x, np.float64).ravel().tolist() for x in jax.tree.leaves(params)],
        replicated_each_step=all(replicated_after_each_step),
        state_leaf_devices=sorted({len(x.sharding.device_set) for x in leaves}),
        state_fully_replicated=all(x.sharding.is_fully_replicated for x in leaves),
    )


def shard_map_rule(average_value: bool, guarded: bool = False) -> dict[str, list[int]]:
    """Per-device intervention (and rollback) counts after a shard_map loop, with or
    without pmean(loss); ``guarded`` adds a rollback guard, whose snapshot is then
    taken under a per-device (varying) predicate."""
    mesh = parallel.data_parallel_mesh(DEVICES)
    guard = ao.RollbackGuard(guard_windows=1, rtol=0.0) if guarded else None
    tx = ao.plateau_escape(optax.sgd, 0.02, patience=0, rtol=0.01, max_interventions=5,
                           max_learning_rate=0.1, rollback=guard)
    # Shards 0-3 hold a learnable linear target, shards 4-7 pure noise: the
    # first half's local loss keeps improving, the second half's plateaus at
    # once, so per-shard plateau detectors disagree from the first steps.
    rng = np.random.default_rng(0)
    x = rng.normal(size=(DEVICES * 4, 3)).astype(np.float32)
    y = (x @ np.array([1.0, -2.0, 0.5], np.float32)).astype(np.float32)
    y[DEVICES * 2:] = rng.normal(size=DEVICES * 2).astype(np.float32)
    params = {"w": jnp.zeros(3)}
    stacked = jax.tree.map(lambda a: jnp.broadcast_to(a, (DEVICES, *a.shape)), tx.init(params))

    @jax.jit
    @jax.shard_map(mesh=mesh, in_specs=(P(), P("data"), P("data"), P("data")),
                   out_specs=(P(), P("data")))
    def step(params, opt_state, x, y):
        opt_state = jax.tree.map(lambda a: a[0], opt_state)  # this device's copy
        loss, grads = jax.value_and_grad(lambda p: jnp.mean((x @ p["w"] - y) ** 2))(params)
        grads = parallel.global_mean(grads)
        if average_value:
            loss = parallel.global_mean(loss)
        updates, opt_state = tx.update(grads, opt_state, params, value=loss)
        # Parameters stay in sync (the grads are averaged) in both variants.
        params = optax.apply_updates(params, parallel.global_mean(updates))
        return params, jax.tree.map(lambda a: a[None], opt_state)

    for _ in range(12):
        params, stacked = step(params, stacked, x, y)
    return dict(interventions=np.asarray(optax.tree.get(stacked, "intervention_count")).tolist(),
                rollbacks=np.asarray(ao.state_field(stacked, "rollback_count")).tolist()
                if guarded else [])


def error_messages() -> dict:
    """What the helpers say on misuse that needs several devices to provoke."""
    mesh = parallel.data_parallel_mesh(DEVICES)
    out = {}
    for key, call in [
        ("shard_batch", lambda: parallel.shard_batch(np.zeros((6, 2), np.float32), mesh)),
        ("mesh", lambda: parallel.data_parallel_mesh(DEVICES + 1)),
        ("assert_replicated", lambda: parallel.assert_replicated(
            {"x": parallel.shard_batch(np.zeros((8, 2), np.float32), mesh)}, name="state")),
    ]:
        try:
            call()
            out[key] = None
        except ValueError as err:
            out[key] = str(err)
    sharded = parallel.shard_batch(np.zeros((8, 2), np.float32), mesh)
    out["sharded_is_replicated"] = parallel.is_replicated(sharded)
    out["sharded_devices"] = len(sharded.sharding.device_set)
    return out


def main(out_path: str) -> None:
    if jax.device_count() < DEVICES:
        raise SystemExit(f"need {DEVICES} devices, found {jax.device_count()}; set XLA_FLAGS="
                         f"--xla_force_host_platform_device_count={DEVICES}.")
    policy = adaptive_mix_policy()
    train = synthetic_shapes(GLOBAL_BATCH * STEPS_PER_EPOCH, size=32, seed=0)
    val = SegmentationData(*(a[:GLOBAL_BATCH] for a in synthetic_shapes(GLOBAL_BATCH, size=32,
                                                                         seed=1)))
    summary = dict(
        device_count=jax.device_count(),
        runs=[run(1, "plain", train, val, policy),
              run(DEVICES, "plain", train, val, policy),
              run(DEVICES, "pinned", train, val, policy)],
        shard_map_counts_grads_only=shard_map_rule(average_value=False),
        shard_map_counts_loss_and_grads=shard_map_rule(average_value=True),
        shard_map_guarded_grads_only=shard_map_rule(average_value=False, guarded=True),
        errors=error_messages(),
    )
    with open(out_path, "w") as f:
        json.dump(summary, f)


if __name__ == "__main__":
    main(sys.argv[1])
