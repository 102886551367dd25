"""Argument checks shared by the methods' configs (on `apply` and on `load` alike), training and data: one wording.

Each returns the (normalised) value or raises ValueError naming the setting and what it got.
bool is an int in Python, so integer and number checks refuse it explicitly (r=True is no rank).
"""

from __future__ import annotations

import math
from collections.abc import Iterable


def positive_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


def count(value, name: str) -> int:
    """An integer >= 0 (a seed, a number of examples)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be an integer >= 0, got {value!r}")
    return value


def number(value, name: str, *, low: float | None = None, high: float | None = None,
           low_open: bool = False, high_open: bool = False, nonzero: bool = False) -> float:
    """A finite real in [low, high] (an end is open with `low_open` / `high_open`)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if (low is not None and (value < low or low_open and value == low)
            or high is not None and (value > high or high_open and value == high)):
        interval = f"{'(' if low_open else '['}{'-inf' if low is None else low}, {'inf' if high is None else high}{')' if high_open else ']'}"
        raise ValueError(f"{name} must be in {interval}, got {value!r}")
    if nonzero and value == 0:
        raise ValueError(f"{name} must not be 0, got {value!r}")
    return value


def boolean(value, name: str) -> bool:
    if not isinstance(value, bool):  # "false" and "no" are true in Python: refuse strings and numbers
        raise ValueError(f"{name} must be True or False, got {value!r}")
    return value


def choice(value, name: str, options: Iterable[str]) -> str:
    options = tuple(options)
    if value not in options:
        raise ValueError(f"unknown {name} {value!r}; valid: {', '.join(map(str, options))}")
    return value


def names(value, name: str) -> tuple[str, ...]:
    """Module names: one string or an iterable of strings, as a tuple."""
    items = (value,) if isinstance(value, str) else value
    try:
        items = tuple(items)
    except TypeError:
        raise ValueError(f"{name} must be a module name or a list of them, got {value!r}") from None
    if not all(isinstance(item, str) and item for item in items):
        raise ValueError(f"{name} must be a module name or a list of them, got {value!r}")
    return items
