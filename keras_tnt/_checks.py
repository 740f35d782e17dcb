"""Argument checks shared by the optimizers: each names the argument and what is allowed."""

from __future__ import annotations

import numbers
import re

# What a variable's preconditioner can be: every mode a full factor, every mode a diagonal one,
# or none (the plain momentum step, as for a scalar).
FACTOR_KINDS = ("full", "diagonal", "none")


def number(name, value, low, high=None, low_open=False, high_open=True) -> float:
    """``value`` as a float in the interval from ``low`` to ``high`` (None: no upper bound)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"`{name}` must be a number; received {name}={value!r}.")
    value = float(value)
    bad_low = value <= low if low_open else value < low
    bad_high = high is not None and (value >= high if high_open else value > high)
    if bad_low or bad_high or value != value:
        lo = "(" if low_open else "["
        hi = ")" if high_open else "]"
        interval = f"{lo}{low}, {high if high is not None else 'inf'}{hi}"
        raise ValueError(f"`{name}` must be in {interval}; received {name}={value!r}.")
    return value


def period(name, value) -> int:
    """An integer >= 1 (an update period)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"`{name}` must be an integer >= 1; received {name}={value!r}.")
    if value < 1:
        raise ValueError(f"`{name}` must be an integer >= 1; received {name}={value!r}.")
    return int(value)


def flag(name, value, allow_none=False):
    """True or False (or None when ``allow_none``)."""
    if value is None and allow_none:
        return None
    if not isinstance(value, bool):
        allowed = "None, True or False" if allow_none else "True or False"
        raise TypeError(f"`{name}` must be {allowed}; received {value!r}.")
    return value


def one_of(name, value, allowed):
    if value not in allowed:
        raise ValueError(
            f"`{name}` must be one of {', '.join(map(repr, allowed))}; received {value!r}."
        )
    return value


# What `grafting` can be: whose per-tensor step size the direction takes (None: its own).
GRAFTING = (None, "sgd", "adam")


def grafting(value):
    """None, ``"sgd"`` or ``"adam"`` (docs/algorithm.md §2, "Grafting")."""
    if value not in GRAFTING:
        raise ValueError(
            "`grafting` must be None (the optimizer's own step size), 'sgd' (SGD with "
            "momentum's per-tensor step size) or 'adam' (Adam's); received "
            f"grafting={value!r}."
        )
    return value


def max_factor_dim(value):
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"`max_factor_dim` must be an integer >= 1 or None; received {value!r}.")
    if value < 1:
        raise ValueError(f"`max_factor_dim` must be an integer >= 1 or None; received {value!r}.")
    return int(value)


def factor_overrides(overrides) -> dict:
    if overrides is None:
        return {}
    if not isinstance(overrides, dict):
        raise TypeError(
            "`factor_overrides` must be a dict {pattern: kind} with kind one of "
            f"{', '.join(map(repr, FACTOR_KINDS))}; received {overrides!r}."
        )
    checked = {}
    for pattern, kind in overrides.items():
        if not isinstance(pattern, str):
            raise TypeError(f"`factor_overrides` keys must be strings; received {pattern!r}.")
        if kind not in FACTOR_KINDS:
            raise ValueError(
                f"`factor_overrides[{pattern!r}]` must be one of "
                f"{', '.join(map(repr, FACTOR_KINDS))}; received {kind!r}."
            )
        try:
            re.compile(pattern)
        except re.error as error:
            raise ValueError(
                f"`factor_overrides` key {pattern!r} is not a valid regular expression: {error}."
            ) from None
        checked[pattern] = kind
    return checked


def memory_limit(value):
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not value > 0:
        raise ValueError(
            f"`memory_limit_bytes` must be a number of bytes > 0 or None; received {value!r}."
        )
    return int(value)


def require_targets(optimizer, y) -> None:
    """An empirical-Fisher warm start (TNT-EF, Shampoo) differentiates the loss at the TRUE
    targets: batches without them are an error that says so (not a backend's failure on
    ``None``)."""
    if y is None:
        raise ValueError(
            f"The warm start of {type(optimizer).__name__} with empirical Fisher statistics (the "
            "gradient of the loss at the true targets) needs targets: pass batches of "
            "(inputs, targets), e.g. `warm_start((x, y))` or `WarmStart((x, y))`, or a dataset "
            "of (inputs, targets) pairs; received batches of inputs only."
        )
