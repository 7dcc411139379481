"""Argument checks shared by the constructors: each error names the argument and its range."""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence


def check_int(name: str, value, minimum: int) -> int:
    """Returns ``value`` as an int.

    Raises:
        TypeError: If ``value`` is not an integer (bools are not).
        ValueError: If it is below ``minimum``.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer >= {minimum}, got {name} = {value!r}.")
    if value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {name} = {value!r}.")
    return int(value)


def check_float(
    name: str,
    value,
    *,
    low: float = -math.inf,
    high: float = math.inf,
    low_open: bool = False,
    high_open: bool = False,
) -> float:
    """Returns ``value`` as a float, or raises if it is outside the interval."""
    lb, rb = ("(" if low_open else "["), (")" if high_open else "]")
    interval = f"{lb}{low}, {high}{rb}"
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a real number in {interval}, got {name} = {value!r}.")
    v = float(value)
    too_low = v <= low if low_open else v < low
    too_high = v >= high if high_open else v > high
    if math.isnan(v) or too_low or too_high:
        raise ValueError(f"{name} must be in {interval}, got {name} = {value!r}.")
    return v


def check_floats(name: str, values, *, low: float = -math.inf, low_open: bool = False,
                 high: float = math.inf, min_len: int = 1) -> tuple[float, ...]:
    """Returns a tuple of floats, each checked as by :func:`check_float`."""
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
        raise ValueError(f"{name} must be a sequence of numbers, got {name} = {values!r}.")
    if len(values) < min_len:
        raise ValueError(f"{name} needs at least {min_len} entries, got {name} = {values!r}.")
    return tuple(
        check_float(f"{name}[{i}]", v, low=low, high=high, low_open=low_open)
        for i, v in enumerate(values)
    )
