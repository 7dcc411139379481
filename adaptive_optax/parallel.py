"""Data-parallel training on several devices or processes, with JAX's own SPMD engine.

``plateau_escape`` decides in-graph, from scalars in its state (the monitored
value's window mean, the gradient-norm EMA, a PRNG key). Data parallelism is
safe exactly when every device holds the *same* scalars, i.e. when the value
and the gradients it sees are *global* means over the whole batch. This module
gets that from ``jax.jit``'s sharding propagation instead of hand-written
collectives:

1. :func:`data_parallel_mesh` builds a 1-D mesh with the axis ``"data"``;
2. :func:`replicate` puts the train state (parameters and the full optimizer
   state) on every device;
3. :func:`shard_batch` splits the batch along its leading axis;
4. the unchanged :func:`adaptive_optax.segmentation.train.make_train_step`
   (a plain ``jax.jit``) then compiles one SPMD program: the loss is a mean over the
   global batch, XLA inserts the all-reduce of the gradients, and the value,
   gradient norm, plateau counters and interventions are replicated, so every
   device takes the same decision at the same step. :func:`data_parallel`
   additionally pins the input and output shardings, so the returned state is
   replicated by contract rather than by the propagator's choice.

The same holds across processes (``jax.distributed.initialize``): the mesh
spans all processes' devices, :func:`replicate` and :func:`shard_batch` build
global arrays from process-local data, and ``scripts/two_process.py`` checks
that two processes record identical intervention histories.

**The rule for per-device losses.** Code that computes a loss per device
(``jax.shard_map``, ``jax.pmap``) must average *both* the loss and the
gradients over the data axis before ``update``, e.g. with :func:`global_mean`
(``jax.lax.pmean``). Averaging only the gradients keeps the parameters in
sync for a while, but each device's plateau detector then watches its own
shard's loss: devices declare plateaus at different steps, boost the learning
rate by different factors, pick different loss mixes, and the replicas
silently diverge. BatchNorm statistics under ``jax.jit`` sharding are global
batch statistics (SPMD semantics), unlike under ``pmap``.

This module belongs to the optimizer core, not to
:mod:`adaptive_optax.segmentation`, because it imports only jax and numpy and
works on any train step and pytree (the segmentation ones are only examples).

Example:
    >>> import jax
    >>> mesh = data_parallel_mesh()
    >>> mesh.axis_names
    ('data',)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from adaptive_optax._validation import check_int

__all__ = [
    "DATA_AXIS",
    "assert_replicated",
    "batch_sharding",
    "data_parallel",
    "data_parallel_mesh",
    "global_mean",
    "is_replicated",
    "replicate",
    "replicated_sharding",
    "set_cpu_device_count",
    "shard_batch",
]

DATA_AXIS = "data"

T = TypeVar("T")


def set_cpu_device_count(num_devices: int) -> None:
    """Gives the CPU backend ``num_devices`` devices (to try data parallelism on one host).

    The same as ``XLA_FLAGS=--xla_force_host_platform_device_count=N``, but
    callable after ``import jax`` (and after importing this package), as long
    as no JAX computation has run yet: a ``--devices N`` command-line flag can
    call it right after parsing its arguments. It changes only the CPU
    backend; on a GPU machine ``jax.devices()`` still lists the GPUs.

    Args:
        num_devices: Number of CPU devices (>= 1).

    Raises:
        TypeError: If ``num_devices`` is not an int.
        ValueError: If ``num_devices`` is < 1.
        RuntimeError: If JAX's backends are already initialised (any array
            created or computation run before), which fixes the count.

    Example:
        >>> set_cpu_device_count(8)  # doctest: +SKIP
        >>> jax.device_count()  # doctest: +SKIP
        8
    """
    num_devices = check_int("num_devices", num_devices, 1)
    try:
        jax.config.update("jax_num_cpu_devices", int(num_devices))
    except RuntimeError as err:
        raise RuntimeError(
            f"cannot set num_devices = {num_devices} CPU devices: JAX has already run a "
            "computation in this process (its device count is fixed then). Call "
            "set_cpu_device_count before creating any array, or set XLA_FLAGS="
            f"--xla_force_host_platform_device_count={num_devices} before starting Python."
        ) from err


def data_parallel_mesh(
    num_devices: int | None = None, *, devices: Sequence[jax.Device] | None = None
) -> Mesh:
    """A 1-D device mesh whose single axis ``"data"`` splits the batch.

    Args:
        num_devices: How many devices to use (the first ``num_devices`` of
            ``devices``); ``None`` uses all of them. With several processes
            the chosen devices must include at least one of every process,
            so that every process holds a part of the mesh (``None`` always
            does).
        devices: The devices to choose from; default ``jax.devices()`` (all
            devices of all processes).

    Returns:
        A ``jax.sharding.Mesh`` with axis ``"data"`` of ``Auto`` type, so that
        ``jax.jit`` propagates shardings (``jax.make_mesh`` would default to
        ``Explicit`` axes, which change how jnp ops treat sharded arrays).

    Raises:
        TypeError: If ``num_devices`` is not an int or ``None``.
        ValueError: If ``num_devices`` is < 1, more than the available
            devices, or leaves a process without a device.

    Example:
        >>> mesh = data_parallel_mesh(1)
        >>> mesh.shape["data"]
        1
    """
    available = list(jax.devices() if devices is None else devices)
    if num_devices is None:
        num_devices = len(available)
    num_devices = check_int("num_devices", num_devices, 1)
    if num_devices > len(available):
        raise ValueError(
            f"num_devices = {num_devices} exceeds the {len(available)} available devices "
            f"({jax.default_backend()}); on CPU, call set_cpu_device_count({num_devices}) "
            "before any JAX computation, or set XLA_FLAGS="
            f"--xla_force_host_platform_device_count={num_devices} before starting Python.")
    chosen = available[:num_devices]
    processes = {d.process_index for d in chosen}
    # A process without a device in the mesh could not feed its part of the batch.
    if jax.process_count() > 1 and len(processes) < jax.process_count():
        raise ValueError(
            f"num_devices = {num_devices} leaves {jax.process_count() - len(processes)} of "
            f"{jax.process_count()} processes without a device; use num_devices=None.")
    return Mesh(np.asarray(chosen), (DATA_AXIS,), axis_types=(AxisType.Auto,))


def replicated_sharding(mesh: Mesh) -> NamedSharding:
    """The sharding that keeps a full copy of an array on every device of ``mesh``.

    Example:
        >>> replicated_sharding(data_parallel_mesh(1)).is_fully_replicated
        True
    """
    return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """The sharding that splits an array's leading (batch) axis over ``"data"``.

    Example:
        >>> batch_sharding(data_parallel_mesh(1)).spec == PartitionSpec("data")
        True
    """
    return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def replicate(tree: T, mesh: Mesh) -> T:
    """Puts a full copy of every leaf of ``tree`` on every device of ``mesh``.

    With several processes each process must pass the same values (e.g. a
    model built from the same seed); the result is a tree of global arrays.

    Args:
        tree: A pytree of arrays, e.g. the state from
            :func:`adaptive_optax.segmentation.train.init_train_state`.
        mesh: From :func:`data_parallel_mesh`.

    Returns:
        The same tree with replicated ``jax.Array`` leaves.

    Example:
        >>> import jax.numpy as jnp
        >>> tree = replicate({"w": jnp.ones(3)}, data_parallel_mesh())
        >>> tree["w"].sharding.is_fully_replicated
        True
    """
    sharding = replicated_sharding(mesh)
    if jax.process_count() == 1:
        return jax.device_put(tree, sharding)
    # Every process holds the whole (replicated) value, so its local data is the global array.
    return jax.tree.map(
        lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), tree)


def shard_batch(batch: T, mesh: Mesh) -> T:
    """Splits every leaf of ``batch`` along its leading axis over the ``"data"`` axis.

    In a single process ``batch`` is the global batch. With several processes
    each process passes its own slice (its local batch); the result is the
    global batch of ``process_count`` times the local size.

    Args:
        batch: A pytree of arrays with the same leading size, e.g. a
            :class:`adaptive_optax.segmentation.data.SegmentationData` batch.
        mesh: From :func:`data_parallel_mesh`.

    Returns:
        The batch as global ``jax.Array`` leaves sharded along axis 0.

    Raises:
        ValueError: If a leaf is a scalar, the leaves' leading sizes differ, or
            the batch size is not divisible by the devices that hold it.

    Example:
        >>> import jax.numpy as jnp
        >>> batch = shard_batch(jnp.zeros((4, 2)), data_parallel_mesh(1))
        >>> batch.shape
        (4, 2)
    """
    leaves = jax.tree.leaves(batch)
    if not leaves:
        raise ValueError("batch has no array leaves to shard.")
    sizes = set()
    for leaf in leaves:
        if np.ndim(leaf) == 0:
            raise ValueError("every batch leaf needs a leading batch axis; got a scalar leaf.")
        sizes.add(int(np.shape(leaf)[0]))
    if len(sizes) > 1:
        raise ValueError(f"batch leaves disagree on the batch size: leading sizes {sorted(sizes)}.")
    size = sizes.pop()
    sharding = batch_sharding(mesh)
    multi = jax.process_count() > 1
    devices = len(mesh.local_devices) if multi else mesh.size
    if size % devices:
        where = "local devices of this process" if multi else "devices"
        raise ValueError(
            f"batch size {size} is not divisible by the {devices} {where} of the mesh; "
            f"use a batch size that is a multiple of {devices}.")
    if not multi:
        return jax.device_put(batch, sharding)
    return jax.tree.map(
        lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), batch)


def data_parallel(
    train_step: Callable[[Any, Any], tuple[Any, Any]], mesh: Mesh, *, donate: bool = True
) -> Callable[[Any, Any], tuple[Any, Any]]:
    """Jits ``train_step(state, batch)`` with the data-parallel shardings pinned.

    The plain step from :func:`adaptive_optax.segmentation.train.make_train_step`
    already runs data-parallel on a replicated state and a sharded batch; this
    wrapper makes the contract explicit: the state and all outputs (new state,
    metrics) are replicated, the batch is sharded along its leading axis. An
    uncommitted input (numpy, or a batch from ``jnp.asarray`` on the default
    device) is moved to these shardings, so the step drops into
    :func:`adaptive_optax.segmentation.loop.fit` unchanged; jit refuses an
    array committed to one device (``jax.device_put(x, device)``): pass it
    through :func:`shard_batch` first.

    Args:
        train_step: A function of ``(state, batch)`` returning
            ``(state, metrics)``, jitted or not.
        mesh: From :func:`data_parallel_mesh`.
        donate: Donate the state buffers (as ``make_train_step`` does).

    Returns:
        The jitted step; it compiles once per batch shape.

    Example:
        >>> import jax.numpy as jnp
        >>> mesh = data_parallel_mesh(1)
        >>> step = data_parallel(lambda s, b: (s + b.mean(), b.sum()), mesh, donate=False)
        >>> state, total = step(replicate(jnp.zeros(()), mesh), jnp.ones((2, 3)))
        >>> float(state), float(total)
        (1.0, 6.0)
    """
    if not callable(train_step):
        raise TypeError(f"train_step must be callable, got {train_step!r}.")
    replicated = replicated_sharding(mesh)
    return jax.jit(
        train_step,
        in_shardings=(replicated, batch_sharding(mesh)),
        out_shardings=replicated,
        donate_argnums=(0,) if donate else (),
    )


def is_replicated(tree) -> bool:
    """Whether every array leaf of ``tree`` is fully replicated on its devices.

    Example:
        >>> import jax.numpy as jnp
        >>> is_replicated(replicate({"w": jnp.ones(2)}, data_parallel_mesh()))
        True
    """
    return all(not isinstance(x, jax.Array) or x.sharding.is_fully_replicated
               for x in jax.tree.leaves(tree))


def assert_replicated(tree, *, name: str = "tree") -> None:
    """Raises if a leaf of ``tree`` is not fully replicated.

    Args:
        tree: A pytree of ``jax.Array`` leaves.
        name: What ``tree`` is, for the message.

    Raises:
        ValueError: Naming the first leaf path that is not replicated and its
            sharding.

    Example:
        >>> import jax.numpy as jnp
        >>> assert_replicated({"w": jnp.ones(2)})
    """
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        if isinstance(leaf, jax.Array) and not leaf.sharding.is_fully_replicated:
            raise ValueError(f"{name}{jax.tree_util.keystr(path)} is not replicated: "
                             f"sharding {leaf.sharding}.")


def global_mean(tree: T, axis_name: str = DATA_AXIS) -> T:
    """``jax.lax.pmean`` over ``axis_name``: the sync rule for per-device losses.

    Inside ``jax.shard_map`` or ``jax.pmap``, call it on *both* the loss
    (the monitored value) and the gradients before ``update``; see the module
    docstring for what goes wrong otherwise.

    Args:
        tree: A pytree of per-device arrays (e.g. ``(loss, grads)``).
        axis_name: The mapped axis to average over.

    Returns:
        The tree averaged over the axis (the same on every device).

    Example:
        >>> import jax.numpy as jnp
        >>> from functools import partial
        >>> mesh = data_parallel_mesh(1)
        >>> @partial(jax.shard_map, mesh=mesh, in_specs=PartitionSpec("data"),
        ...          out_specs=PartitionSpec())
        ... def mean_loss(x):
        ...     return global_mean(jnp.mean(x))
        >>> float(mean_loss(jnp.arange(4.0)))
        1.5
    """
    return jax.lax.pmean(tree, axis_name)
