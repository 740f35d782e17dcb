"""The factor plan: what each variable's preconditioner will be, and what it will cost, before
anything is allocated (``plan``, ``plan_bytes``, ``describe_plan``, ``memory_limit_bytes``).

A plan is a list of dicts, one per variable in build order: ``variable`` (its path), ``shape``,
``modes`` (the factor sizes; empty for the plain momentum step), ``factors`` (``"full"`` or
``"diagonal"`` per mode), ``override`` (the kind a ``factor_overrides`` pattern set, or None)
and ``state_bytes``; KFAC adds ``layer`` and a ``note`` (a bias shares its kernel's factors).
"""

from __future__ import annotations

import logging
import math
import re

from keras_tnt import backend
from keras_tnt import kronecker
from keras_tnt._variables import first_override
from keras_tnt._variables import format_bytes
from keras_tnt._variables import itemsize
from keras_tnt._variables import statistics_dtype
from keras_tnt._variables import variable_path

DEFAULT_MAX_FACTOR_DIM = 4096
logger = logging.getLogger("keras_tnt")


def row_sparse(shape, diagonal) -> bool:
    """Whether TNT takes a tensor's row-sparse step (docs/algorithm.md §2): its modes are its
    axes (at most 3, none merged), at least two, and the first has a diagonal factor (not
    ``factor_overrides`` "none": no factors at all)."""
    return 2 <= len(shape) <= 3 and len(diagonal) == len(shape) and bool(diagonal[0])


def tensor_entry(var, max_factor_dim, overrides, carries_directions=False) -> dict:
    """One tensor's entry for TNT and Shampoo: a factor per mode of
    :func:`~keras_tnt.kronecker.tensor_modes`, diagonal above ``max_factor_dim``; with
    ``carries_directions`` (TNT) a row-sparse tensor also keeps its damped factors."""
    path = variable_path(var)
    shape = tuple(int(d) for d in var.shape)
    modes = kronecker.tensor_modes(shape)
    override = first_override(overrides, [path])
    if override == "none":
        modes = ()
    if override in ("full", "diagonal"):
        factors = [override] * len(modes)
    else:
        factors = ["diagonal" if max_factor_dim and d > max_factor_dim else "full" for d in modes]
    numbers = sum(d if f == "diagonal" else d * d for d, f in zip(modes, factors, strict=True))
    state = math.prod(shape) * itemsize(var.dtype)  # momentum
    state += 2 * numbers * itemsize(statistics_dtype(var.dtype))  # statistics and inverses
    state += itemsize(backend.count_dtype())  # its statistics count
    entry = {
        "variable": path,
        "shape": shape,
        "modes": modes,
        "factors": factors,
        "override": override,
        "state_bytes": int(state),
    }
    if carries_directions and row_sparse(shape, [f == "diagonal" for f in factors]):
        entry["state_bytes"] += numbers * itemsize(statistics_dtype(var.dtype))
        entry["note"] = "row-sparse step"
    return entry


def shared_bytes(var_list, counters: int, use_ema, gradient_accumulation_steps) -> int:
    """State outside the entries: ``counters`` optimizer-wide counters, and Keras' copy of every
    variable for ``use_ema`` (the moving average) and ``gradient_accumulation_steps`` (the
    accumulator)."""
    copies = int(bool(use_ema)) + int(bool(gradient_accumulation_steps))
    variables = sum(math.prod(int(d) for d in v.shape) * itemsize(v.dtype) for v in var_list)
    return counters * itemsize(backend.count_dtype()) + copies * variables


def describe(entries, shared: int, use_ema, gradient_accumulation_steps) -> str:
    """The plan as a table, with the total optimizer-state memory."""
    width = max([len(e["variable"]) for e in entries] + [8])
    lines = [f"{'variable':<{width}}  {'shape':<20} {'factors':<36} state"]
    for e in entries:
        if not e["modes"]:
            factors = e.get("note") or "none (plain momentum)"
        else:
            factors = " x ".join(
                f"{d}{'d' if f == 'diagonal' else ''}"
                for d, f in zip(e["modes"], e["factors"], strict=True)
            )
            factors += " (d: diagonal)" if "diagonal" in e["factors"] else ""
            factors += f", {e['note']}" if e.get("note") else ""
        lines.append(
            f"{e['variable']:<{width}}  {str(e['shape']):<20} {factors:<36} "
            f"{format_bytes(e['state_bytes'])}"
        )
    what = ["optimizer-wide counters"]
    what += ["use_ema averages"] if use_ema else []
    what += ["gradient accumulators"] if gradient_accumulation_steps else []
    lines.append(f"{', '.join(what)}: {format_bytes(shared)}")
    total = sum(e["state_bytes"] for e in entries) + shared
    lines.append(f"total optimizer state: {format_bytes(total)} ({total} bytes)")
    return "\n".join(lines)


def check(name, entries, shared: int, overrides, memory_limit_bytes, max_factor_dim) -> None:
    """Raises before any allocation if the plan breaks a setting (an override that matches no
    variable, the memory limit); logs one line about it (a warning when modes above
    ``max_factor_dim`` got diagonal factors)."""
    unused = [p for p in overrides if not any(re.search(p, e["variable"]) for e in entries)]
    if unused:
        paths = ", ".join(e["variable"] for e in entries[:6])
        raise ValueError(
            f"`factor_overrides`: {', '.join(map(repr, unused))} matches no variable "
            f"(variable paths look like: {paths}{', ...' if len(entries) > 6 else ''})."
        )
    total = sum(e["state_bytes"] for e in entries) + shared
    if memory_limit_bytes is not None and total > memory_limit_bytes:
        largest = sorted(entries, key=lambda e: -e["state_bytes"])[:3]
        raise ValueError(
            f"The optimizer state would take {format_bytes(total)} ({total} bytes), over "
            f"`memory_limit_bytes={memory_limit_bytes}`. Largest: "
            + "; ".join(
                f"{e['variable']} {e['shape']}: {format_bytes(e['state_bytes'])}" for e in largest
            )
            + ". Lower `max_factor_dim`, or set `factor_overrides` (e.g. 'diagonal' or "
            "'none' for those variables)."
        )
    bounded = sum(1 for e in entries if e["override"] is None and "diagonal" in e["factors"])
    summary = (
        f"{name}: {len(entries)} variables, "
        f"{sum(f == 'full' for e in entries for f in e['factors'])} full and "
        f"{sum(f == 'diagonal' for e in entries for f in e['factors'])} diagonal factors, "
        f"{sum(not e['modes'] and 'note' not in e for e in entries)} plain momentum; "
        f"optimizer state {format_bytes(total)}"
    )
    if bounded:
        logger.warning(
            "%s (%d %s modes above max_factor_dim=%s, which got diagonal factors; see "
            "optimizer.describe_plan()).",
            summary,
            bounded,
            "variable has" if bounded == 1 else "variables have",
            max_factor_dim,
        )
    else:
        logger.info("%s.", summary)
