"""Argument checks shared by the constructors: each error names the argument and its range."""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import numpy as np

# State counters are int32 and hyperparameters float32: larger values would
# only fail (or overflow to inf) at the first update, far from their cause.
INT32_MAX = int(np.iinfo(np.int32).max)
FLOAT32_MAX = float(np.finfo(np.float32).max)


def check_int(name: str, value, minimum: int, maximum: int = INT32_MAX) -> int:
    """Returns ``value`` as an int.

    Raises:
        TypeError: If ``value`` is not an integer (bools are not).
        ValueError: If it is outside ``[minimum, maximum]``.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer in [{minimum}, {maximum}], got "
                        f"{name} = {value!r}.")
    if not minimum <= value <= maximum:
        raise ValueError(f"{name} must be an integer in [{minimum}, {maximum}], got "
                         f"{name} = {value!r}.")
    return int(value)


def check_bool(name: str, value) -> bool:
    """Returns ``value`` if it is a bool; raises TypeError otherwise (``"no"`` is truthy)."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be True or False, got {name} = {value!r}.")
    return bool(value)


def check_float(
    name: str,
    value,
    *,
    low: float = -FLOAT32_MAX,
    high: float = FLOAT32_MAX,
    low_open: bool = False,
    high_open: bool = False,
) -> float:
    """Returns ``value`` as a finite float, or raises if it is outside the interval.

    Bounds are clipped to the float32 range, so infinities and values that
    would overflow float32 state are always rejected. The value is checked
    after rounding to float32 too, where the state uses it: a learning rate of
    ``1e-46`` is 0 there, an ``rtol`` of ``1 - 1e-12`` is 1.
    """
    low, high = max(low, -FLOAT32_MAX), min(high, FLOAT32_MAX)
    lb, rb = ("(" if low_open else "["), (")" if high_open else "]")
    interval = f"{lb}{low:g}, {high:g}{rb}"
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number in {interval}, got {name} = {value!r}.")
    v = float(value)
    too_low = v <= low if low_open else v < low
    too_high = v >= high if high_open else v > high
    if not math.isfinite(v) or too_low or too_high:
        raise ValueError(f"{name} must be a finite number in {interval}, got {name} = {value!r}.")
    r = float(np.float32(v))
    if (r <= low if low_open else r < low) or (r >= high if high_open else r > high):
        raise ValueError(f"{name} must be a finite number in {interval} after rounding to "
                         f"float32, got {name} = {value!r}, which is {r!r} in float32.")
    return v


def check_floats(name: str, values, *, low: float = -FLOAT32_MAX, low_open: bool = False,
                 high: float = FLOAT32_MAX, min_len: int = 1) -> tuple[float, ...]:
    """Returns a tuple of floats, each checked as by :func:`check_float`."""
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
        raise ValueError(f"{name} must be a sequence of numbers, got {name} = {values!r}.")
    if len(values) < min_len:
        raise ValueError(f"{name} needs at least {min_len} entries, got {name} = {values!r}.")
    out = []
    for i, v in enumerate(values):
        try:
            out.append(check_float(f"{name}[{i}]", v, low=low, high=high, low_open=low_open))
        except TypeError as err:  # a sequence entry of the wrong type is a bad value of `name`
            raise ValueError(str(err)) from None
    return tuple(out)
