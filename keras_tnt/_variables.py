"""How the optimizers name, type and size their state: one place for each rule."""

from __future__ import annotations

import re

import keras
import numpy as np


def variable_path(var) -> str:
    """A variable's path (``dense/kernel``); a raw ``tf.Variable``'s name (``Variable:0``)."""
    return var.path if hasattr(var, "path") else str(var.name)


def slot_prefix(var) -> str:
    """The prefix of a variable's slot names: its path, with what a scope name cannot hold
    (``/``, ``:``) as ``_``."""
    return re.sub(r"[^A-Za-z0-9_.\-]", "_", variable_path(var))


def statistics_dtype(dtype) -> str:
    """The dtype of the statistics, inverses and sampled targets of a ``dtype`` tensor: float64
    for float64, else float32 (bfloat16 and float16 models keep their curvature in float32)."""
    return "float64" if keras.backend.standardize_dtype(dtype) == "float64" else "float32"


def itemsize(dtype) -> int:
    """Bytes per number of ``dtype``."""
    return int(np.dtype(keras.backend.standardize_dtype(dtype)).itemsize)


def format_bytes(n: int) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


def first_override(overrides: dict, paths) -> str | None:
    """The kind of the first ``factor_overrides`` pattern found (``re.search``) in any of
    ``paths``, or None."""
    return next(
        (kind for pattern, kind in overrides.items() if any(re.search(pattern, p) for p in paths)),
        None,
    )
