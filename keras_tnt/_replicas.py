"""Who computes what when the preconditioner work is split across replicas.

The optimizers hand out units of work (TNT and Shampoo: a tensor; KFAC: a layer, or a tensor it
does not factor) with a cost each; :func:`plan_owners` gives each unit one owner replica. The
plan depends only on the costs and the replica count, so every replica and worker computes the
same plan without talking to the others.
"""

from __future__ import annotations

import math
from collections.abc import Sequence


def preconditioner_cost(modes: Sequence[int], diagonal: Sequence[bool] | None = None) -> int:
    """Multiply-adds of one tensor's preconditioner work, to balance it across replicas.

    ``Σ d_i³`` for the factorisations of a refresh plus ``2 Π d_i · Σ d_i`` for the mode
    contractions and the preconditioned direction (one product per mode each). A diagonal mode
    costs ``d_i + 2 Π d_i`` instead. A tensor with no modes costs nothing.
    """
    if not modes:
        return 0
    size = math.prod(modes)
    flags = (False,) * len(modes) if diagonal is None else tuple(bool(f) for f in diagonal)
    if len(flags) != len(modes):
        raise ValueError(f"`diagonal` needs one flag per mode {tuple(modes)}; got {flags}.")
    return int(sum(d + 2 * size if diag else d**3 + 2 * size * d for d, diag in zip(modes, flags)))


def layer_cost(input_size: int, output_size: int, diagonal=(False, False)) -> int:
    """Multiply-adds of one KFAC layer's preconditioner work: the refresh (``d_in³ + d_out³``)
    and the direction ``A⁻¹ M G⁻¹`` (``d_in·d_out·(d_in + d_out)``); a diagonal side costs
    ``d`` and ``d_in·d_out`` instead. (Its factors are sums over each replica's own examples,
    not redundant work.)"""
    cost = 0
    for d, diag in zip((input_size, output_size), diagonal, strict=True):
        other = input_size * output_size
        cost += d + other if diag else d**3 + other * d
    return cost


def plan_owners(costs: Sequence[int], replicas: int) -> list[int]:
    """The replica that owns each unit: longest processing time first.

    Units are taken by decreasing cost (ties: lower index first) and each goes to the replica
    with the least work so far (ties: lower replica id), so the plan is deterministic and the
    same on every replica and worker. The heaviest replica carries at most ``4/3`` of the
    optimum (Graham's bound).
    """
    if replicas < 1:
        raise ValueError(f"`replicas` must be >= 1; received {replicas}.")
    load = [0] * replicas
    owners = [0] * len(costs)
    for index in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        replica = min(range(replicas), key=lambda r: (load[r], r))
        owners[index] = replica
        load[replica] += costs[index]
    return owners
