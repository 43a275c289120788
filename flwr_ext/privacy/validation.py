"""Checks for privacy parameters: every error names the parameter, value and range.

A typo in a privacy parameter (a negative noise multiplier, ``delta=1``, a sampling
rate given in percent) must stop the run at construction, with a message that says
what to change, rather than silently weaken the guarantee in round 7.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from numbers import Integral, Real

__all__ = [
    "check_choice",
    "check_int",
    "check_open_unit",
    "check_positive",
    "check_rate",
]


def _number(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"{name} must be a number, got {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return value


def check_positive(name: str, value: object) -> float:
    """Return ``value`` as a float if it is a finite number > 0.

    Raises
    ------
    TypeError
        If ``value`` is not a number (bool is rejected).
    ValueError
        If ``value`` is not finite or not > 0.
    """
    value = _number(name, value)
    if value <= 0:
        raise ValueError(f"{name} must be > 0 (range (0, inf)), got {value}")
    return value


def check_open_unit(name: str, value: object) -> float:
    """Return ``value`` as a float if it lies in the open interval (0, 1)."""
    value = _number(name, value)
    if not 0 < value < 1:
        raise ValueError(f"{name} must be in the open interval (0, 1), got {value}")
    return value


def check_rate(name: str, value: object) -> float:
    """Return ``value`` as a float if it lies in (0, 1] (a probability > 0)."""
    value = _number(name, value)
    if not 0 < value <= 1:
        raise ValueError(
            f"{name} must be a probability in (0, 1], got {value}"
            + (" (a percentage? use e.g. 0.2 for 20 %)" if value > 1 else "")
        )
    return value


def check_int(name: str, value: object, minimum: int = 1) -> int:
    """Return ``value`` as an int if it is an integer >= ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise TypeError(f"{name} must be an integer, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value}")
    return int(value)


def check_choice(name: str, value: object, choices: Iterable[str]) -> str:
    """Return ``value`` if it is one of ``choices``."""
    options = tuple(choices)
    if value not in options:
        raise ValueError(f"{name} must be one of {options}, got {value!r}")
    return str(value)
