"""The optimizer that :func:`~adaptive_optax.plateau_escape` wraps, with its rate injected.

``plateau_escape(optax.adam, 1e-3, b1=0.95)`` builds ``optax.adam`` through
``optax.inject_hyperparams`` so that the effective learning rate is an array in
the state, changed every step without recompiling. This module builds it,
checks the factory and its keyword arguments at construction, and writes the
rate into the inner state.
"""

from __future__ import annotations

import inspect
import math
import numbers
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from adaptive_optax._validation import check_float


def as_schedule(learning_rate: float | optax.Schedule) -> optax.Schedule:
    """A float > 0 as a constant float32 schedule; a schedule as is.

    A scalar array (``jnp.float32(1e-3)``, as optax accepts) counts as a float.

    Raises:
        TypeError: If ``learning_rate`` is neither a real number, a real
            scalar array nor a callable; the message names it.
        ValueError: If it is a number outside ``(0, float32 max]``.

    Example:
        >>> float(as_schedule(0.1)(5))
        0.1...
    """
    if callable(learning_rate):
        return learning_rate
    # A concrete real scalar array (jnp.float32(1e-3)) counts as a float, as in optax.
    if (getattr(learning_rate, "shape", None) == ()
            and not isinstance(learning_rate, jax.core.Tracer)
            and np.issubdtype(np.asarray(learning_rate).dtype, np.floating)):
        learning_rate = float(np.asarray(learning_rate))
    if isinstance(learning_rate, bool) or not isinstance(learning_rate, numbers.Real):
        raise TypeError("learning_rate must be a float > 0 or an optax schedule, got "
                        f"learning_rate = {learning_rate!r}.")
    value = check_float("learning_rate", learning_rate, low=0.0, high=math.inf,
                        low_open=True, high_open=True)
    return lambda step: jnp.full([], value, jnp.float32)


def inject_learning_rate(
    optimizer: Callable[..., optax.GradientTransformation],
    optimizer_kwargs: dict[str, Any],
) -> optax.GradientTransformationExtraArgs:
    """Builds ``optimizer(learning_rate=..., **optimizer_kwargs)`` with the rate injected.

    Only the rate is injected: the other hyperparameters stay Python floats,
    so an injected float32 ``b1`` cannot promote bfloat16 moments to float32.
    The placeholder rate is overwritten in the state before every update.

    Args:
        optimizer: An optax optimizer factory with a ``learning_rate`` argument.
        optimizer_kwargs: Its other arguments.

    Returns:
        The ``optax.inject_hyperparams`` transformation.

    Raises:
        TypeError: If ``optimizer`` is not such a factory, a keyword does not
            fit its signature, or a scalar keyword's value breaks it (found by
            tracing one abstract step on a stand-in parameter, below); the
            message names the keyword. Keywords holding a pytree or a callable
            (``mask=`` of ``optax.adamw``) may depend on the parameters'
            structure: they are checked the same way, against the real
            parameters, when the returned transformation's ``init`` runs.

    Example:
        >>> tx = inject_learning_rate(optax.adam, {"b1": 0.95})
        >>> sorted(tx.init({"w": jnp.zeros(2)}).hyperparams)
        ['learning_rate']
    """
    if isinstance(optimizer, optax.GradientTransformation):
        raise TypeError("optimizer must be a factory taking learning_rate (e.g. optax.adam), "
                        "not a built GradientTransformation (e.g. optax.adam(1e-3)).")
    if not callable(optimizer):
        raise TypeError("optimizer must be an optax optimizer factory such as optax.adam, "
                        f"got {optimizer!r}.")
    try:
        signature = inspect.signature(optimizer)
    except (TypeError, ValueError) as err:
        raise TypeError(f"optimizer must be a Python callable, got {optimizer!r}.") from err
    if "learning_rate" not in signature.parameters:
        raise TypeError(f"optimizer must take a learning_rate argument; {optimizer!r} takes "
                        f"{list(signature.parameters)}.")
    if "learning_rate" in optimizer_kwargs:
        raise TypeError("pass learning_rate to plateau_escape, not among optimizer kwargs.")
    name = getattr(optimizer, "__name__", repr(optimizer))
    try:
        signature.bind(learning_rate=1.0, **optimizer_kwargs)
    except TypeError as err:
        raise TypeError(f"optimizer keyword arguments {sorted(optimizer_kwargs)} do not fit "
                        f"{name!r}: {err}.") from None
    scalar = {k: v for k, v in optimizer_kwargs.items() if _is_scalar(v)}
    structured = {k: v for k, v in optimizer_kwargs.items() if k not in scalar}
    _check_keywords(optimizer, name, scalar, _STAND_IN_PARAMS)
    tx = _build(optimizer, optimizer_kwargs)
    if not structured:
        return tx
    checked = set()  # parameter signatures already checked (the reset path calls init again)

    def init(params):
        abstract = jax.tree.map(lambda p: jax.ShapeDtypeStruct(jnp.shape(p), jnp.result_type(p)),
                                params)
        signature = (jax.tree.structure(abstract),
                     tuple((a.shape, a.dtype) for a in jax.tree.leaves(abstract)))
        if signature not in checked:  # traced abstractly: no compute, but not free on big trees
            _check_keywords(optimizer, name, structured, abstract)
            checked.add(signature)
        return tx.init(params)

    return optax.GradientTransformationExtraArgs(init, tx.update)


def with_learning_rate(inner_state, lr: jax.Array):
    """``inner_state`` with ``hyperparams["learning_rate"]`` set to ``lr`` (its dtype kept)."""
    hyperparams = dict(inner_state.hyperparams)
    hyperparams["learning_rate"] = jnp.asarray(lr, hyperparams["learning_rate"].dtype)
    return inner_state._replace(hyperparams=hyperparams)


def _build(optimizer, optimizer_kwargs) -> optax.GradientTransformationExtraArgs:
    def with_rate(learning_rate):
        return optimizer(learning_rate=learning_rate, **optimizer_kwargs)

    return optax.inject_hyperparams(with_rate)(learning_rate=1.0)


# What scalar keywords (b1, eps, weight_decay, ...) are checked against at construction.
_STAND_IN_PARAMS = {"w": jax.ShapeDtypeStruct((2,), jnp.float32)}


def _is_scalar(value: Any) -> bool:
    """A keyword value that cannot depend on the parameters' structure."""
    if value is None or isinstance(value, (numbers.Number, str)):
        return True
    if callable(value) or isinstance(value, (dict, list, tuple)):
        return False
    try:
        return np.ndim(value) == 0
    except ValueError:  # not array-like
        return False


def _check_keywords(optimizer, name: str, optimizer_kwargs: dict[str, Any], params) -> None:
    """Raises a TypeError naming the first keyword whose value breaks one traced step.

    A keyword is blamed only if the optimizer traces without any, so a factory
    that needs more than ``plateau_escape`` passes (other extra args, say) is
    not rejected.
    """
    if not optimizer_kwargs or _fails(optimizer, {}, params) is not None:
        return
    for key, value in optimizer_kwargs.items():
        err = _fails(optimizer, {key: value}, params)
        if err is not None:
            raise TypeError(f"optimizer keyword argument {key} = {value!r} does not work "
                            f"with {name!r}: {type(err).__name__}: {err}") from err


def _fails(optimizer, optimizer_kwargs, params) -> Exception | None:
    """The error of one init + update traced on abstract ``params``, or None.

    ``jax.eval_shape`` computes nothing and starts no backend (so this is safe
    before ``jax.distributed.initialize``).
    """
    value = jax.ShapeDtypeStruct((), jnp.float32)

    def step(params, value):
        tx = _build(optimizer, optimizer_kwargs)
        return tx.update(params, tx.init(params), params, value=value)

    try:
        jax.eval_shape(step, params, value)
    except Exception as err:  # noqa: BLE001 - any failure of the user's factory counts
        return err
    return None
