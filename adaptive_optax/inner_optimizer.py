"""The optimizer that :func:`~adaptive_optax.plateau_escape` wraps, with its rate injected.

``plateau_escape(optax.adam, 1e-3, optimizer_kwargs={"b1": 0.95})`` (or
``plateau_escape(functools.partial(optax.adam, b1=0.95), 1e-3)``) builds
``optax.adam`` through ``optax.inject_hyperparams`` so that the effective
learning rate is an array in the state, changed every step without
recompiling. This module builds it, checks the factory and its keyword
arguments at construction, and writes the rate into the inner state.

The optimizer's own keywords have a namespace of their own, apart from
``plateau_escape``'s options: some names are both (``optax.noisy_sgd`` takes a
``seed``, as ``plateau_escape`` does for its mix plan).
"""

from __future__ import annotations

import difflib
import functools
import inspect
import math
import numbers
import reprlib
from collections.abc import Callable, Iterable, Mapping
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
    optimizer_kwargs: Mapping[str, Any] | None = None,
) -> optax.GradientTransformationExtraArgs:
    """Builds ``optimizer(learning_rate=..., **optimizer_kwargs)`` with the rate injected.

    Only the rate is injected: the other hyperparameters stay Python floats,
    so an injected float32 ``b1`` cannot promote bfloat16 moments to float32.
    The placeholder rate is overwritten in the state before every update.

    A ``functools.partial`` of a factory counts as the factory with the
    keywords it binds; they are checked like ``optimizer_kwargs``, which
    override them (as keywords of a call of the partial would).

    Args:
        optimizer: An optax optimizer factory with a ``learning_rate`` argument,
            or a ``functools.partial`` of one that leaves ``learning_rate`` unbound.
        optimizer_kwargs: Its other keyword arguments (``None``: none).

    Returns:
        The ``optax.inject_hyperparams`` transformation.

    Raises:
        TypeError: If ``optimizer`` is not such a factory, ``learning_rate``
            is bound in the partial or given in ``optimizer_kwargs`` (the
            rate is injected: pass it to ``plateau_escape``),
            ``optimizer_kwargs`` is not a mapping of names, a keyword does not
            fit the factory's signature, or a scalar keyword's value breaks it
            (found by tracing one abstract step on a stand-in parameter,
            below); the message names the keyword. Keywords holding a pytree
            or a callable (``mask=`` of ``optax.adamw``) may depend on the
            parameters' structure: they are checked the same way, against the
            real parameters, when the returned transformation's ``init`` runs.

    Example:
        >>> tx = inject_learning_rate(optax.adam, {"b1": 0.95})
        >>> sorted(tx.init({"w": jnp.zeros(2)}).hyperparams)
        ['learning_rate']
        >>> tx = inject_learning_rate(functools.partial(optax.adam, b1=0.95))  # the same
    """
    if isinstance(optimizer, optax.GradientTransformation):
        raise TypeError("optimizer must be a factory taking learning_rate (e.g. optax.adam), "
                        "not a built GradientTransformation (e.g. optax.adam(1e-3)).")
    if not callable(optimizer):
        raise TypeError("optimizer must be an optax optimizer factory such as optax.adam, "
                        f"got {optimizer!r}.")
    optimizer, optimizer_kwargs, labels = _unbind(optimizer, optimizer_kwargs)
    name = _name(optimizer)
    try:
        signature = inspect.signature(optimizer)
    except (TypeError, ValueError) as err:
        raise TypeError(f"optimizer must be a Python callable, got {optimizer!r}.") from err
    if "learning_rate" not in signature.parameters:
        raise TypeError(f"optimizer must take a learning_rate argument (a functools.partial "
                        f"must leave it unbound); {name!r} takes {list(signature.parameters)}.")
    takes = _parameters(optimizer)
    unknown = [k for k in optimizer_kwargs if takes is not None and k not in takes]
    if unknown:
        raise TypeError(f"{', '.join(labels[k] for k in unknown)}: not an argument of {name!r}, "
                        f"which takes {sorted(takes - {'learning_rate'})}.")
    try:
        signature.bind(learning_rate=1.0, **optimizer_kwargs)
    except TypeError as err:
        given = ", ".join(labels.values()) or "none"
        raise TypeError(f"optimizer {name!r} cannot be called with learning_rate and the "
                        f"keywords given ({given}): {err}.") from None
    scalar = {k: v for k, v in optimizer_kwargs.items() if _is_scalar(v)}
    structured = {k: v for k, v in optimizer_kwargs.items() if k not in scalar}
    _check_keywords(optimizer, name, scalar, labels, _STAND_IN_PARAMS)
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
            _check_keywords(optimizer, name, structured, labels, abstract)
            checked.add(signature)
        return tx.init(params)

    return optax.GradientTransformationExtraArgs(init, tx.update)


def unexpected_keywords_error(
    function_name: str,
    unexpected: Mapping[str, Any],
    optimizer: Any,
    options: Iterable[str],
) -> TypeError:
    """The error for keywords ``function_name`` does not take, pointing to ``optimizer_kwargs``.

    A keyword that ``optimizer`` takes (or might: its signature is unknown or
    has ``**kwargs``) is shown in the two spellings that pass it to the
    optimizer; one that it does not take either is named with the closest of
    ``options``, if any.

    Example:
        >>> error = unexpected_keywords_error("plateau_escape", {"b1": 0.95}, optax.adam, [])
        >>> print(error)  # doctest: +NORMALIZE_WHITESPACE
        plateau_escape got an unexpected keyword argument 'b1': pass the optimizer's own
        arguments as optimizer_kwargs={'b1': 0.95} (or functools.partial(optax.adam, b1=0.95)).
    """
    spelled = _spelled(optimizer)
    takes = _parameters(optimizer)
    for_optimizer = {k: v for k, v in unexpected.items() if takes is None or k in takes}
    parts = []
    if for_optimizer:
        as_dict = ", ".join(f"{k!r}: {reprlib.repr(v)}" for k, v in for_optimizer.items())
        as_args = ", ".join(f"{k}={reprlib.repr(v)}" for k, v in for_optimizer.items())
        parts.append(f"pass the optimizer's own arguments as optimizer_kwargs={{{as_dict}}} "
                     f"(or functools.partial({spelled}, {as_args}))")
    for key in unexpected:
        if key not in for_optimizer:
            close = difflib.get_close_matches(key, list(options), n=1)
            parts.append(f"{key!r} is not an argument of {spelled} either"
                         + (f" (did you mean {close[0]}?)" if close else ""))
    what = ("unexpected keyword arguments" if len(unexpected) > 1
            else "an unexpected keyword argument")
    return TypeError(f"{function_name} got {what} {', '.join(map(repr, unexpected))}: "
                     f"{'; '.join(parts)}.")


def with_learning_rate(inner_state, lr: jax.Array):
    """``inner_state`` with ``hyperparams["learning_rate"]`` set to ``lr`` (its dtype kept)."""
    hyperparams = dict(inner_state.hyperparams)
    hyperparams["learning_rate"] = jnp.asarray(lr, hyperparams["learning_rate"].dtype)
    return inner_state._replace(hyperparams=hyperparams)


def reset_where(inner: optax.GradientTransformation, inner_state, reset: jax.Array, params):
    """``inner_state`` re-initialised from ``params`` where ``reset``; the injected
    hyperparameters (the rate) are kept either way."""
    fresh = inner.init(params)._replace(hyperparams=inner_state.hyperparams)
    return optax.tree.where(reset, fresh, inner_state)


def unaliased(inner_state, params):
    """``inner_state`` with its leaves that *are* parameter arrays copied.

    Optimizers that keep parameter values (prodigy's ``params0``, schedule-free's
    ``z``) return the parameter arrays themselves from ``init``; a train step
    that donates both the parameters and the state would then donate one
    buffer twice, which XLA refuses at the first step.
    """
    ids = {id(p) for p in jax.tree.leaves(params)}
    return jax.tree.map(lambda x: jnp.copy(x) if id(x) in ids else x, inner_state)


def _build(optimizer, optimizer_kwargs) -> optax.GradientTransformationExtraArgs:
    def with_rate(learning_rate):
        return optimizer(learning_rate=learning_rate, **optimizer_kwargs)

    return optax.inject_hyperparams(with_rate)(learning_rate=1.0)


def _unbind(optimizer, optimizer_kwargs) -> tuple[Callable, dict[str, Any], dict[str, str]]:
    """``(factory, keywords, labels)``: a partial's bound keywords joined to ``optimizer_kwargs``.

    ``labels`` names each keyword as the user wrote it, for the error messages.
    """
    if optimizer_kwargs is None:
        optimizer_kwargs = {}
    if (not isinstance(optimizer_kwargs, Mapping)
            or not all(isinstance(k, str) for k in optimizer_kwargs)):
        raise TypeError("optimizer_kwargs must be a mapping from the optimizer's keyword names to "
                        "their values (e.g. {'b1': 0.95}) or None, got "
                        f"optimizer_kwargs = {optimizer_kwargs!r}.")
    if "learning_rate" in optimizer_kwargs:
        raise TypeError("pass learning_rate to plateau_escape, not in optimizer_kwargs: "
                        "plateau_escape injects it (and its boosts) into the optimizer.")
    keywords = dict(optimizer_kwargs)
    labels = {k: f"optimizer_kwargs[{k!r}]" for k in keywords}
    if isinstance(optimizer, functools.partial):  # nested partials are flattened by Python
        bound = optimizer.keywords
        if "learning_rate" in bound:
            raise TypeError(f"optimizer {optimizer!r} binds learning_rate; leave it unbound and "
                            "pass the rate to plateau_escape, which injects it (and its boosts).")
        keywords = {**bound, **keywords}
        labels = {**{k: f"functools.partial keyword {k}" for k in bound}, **labels}
        # Positional arguments stay bound (one binding learning_rate is refused below).
        optimizer = (functools.partial(optimizer.func, *optimizer.args) if optimizer.args
                     else optimizer.func)
    return optimizer, keywords, labels


def _parameters(optimizer) -> set[str] | None:
    """The keyword names ``optimizer`` takes; None if unknown (or any, by ``**kwargs``)."""
    try:
        parameters = inspect.signature(optimizer).parameters
    except (TypeError, ValueError):
        return None
    if any(p.kind is p.VAR_KEYWORD for p in parameters.values()):
        return None
    return set(parameters)


def _name(optimizer) -> str:
    """The factory's name, for messages (``'adam'``)."""
    func = optimizer.func if isinstance(optimizer, functools.partial) else optimizer
    return getattr(func, "__name__", repr(func))


def _spelled(optimizer) -> str:
    """``optimizer`` as code spells it: ``optax.adam``, ``optax.contrib.prodigy`` or its name."""
    func = optimizer.func if isinstance(optimizer, functools.partial) else optimizer
    name = getattr(func, "__name__", "")
    for prefix, namespace in (("optax", optax), ("optax.contrib", optax.contrib)):
        if name and getattr(namespace, name, None) is func:
            return f"{prefix}.{name}"
    return name if name.isidentifier() else "optimizer"


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


def _check_keywords(optimizer, name: str, optimizer_kwargs: dict[str, Any],
                    labels: dict[str, str], params) -> None:
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
            raise TypeError(f"{labels[key]} = {value!r} does not work with {name!r}: "
                            f"{type(err).__name__}: {err}") from err


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
