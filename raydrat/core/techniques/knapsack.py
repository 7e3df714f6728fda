"""``recompute.mode: budget``: the exact choice of branches to store under a memory budget.

Each branch ``i`` costs ``w_i`` bytes when stored (its internals; its input is alive either
way) and saves ``v_i`` FLOPs of recomputation. Store the set S with ``sum w_i <= budget``
that maximises ``sum v_i`` (equivalently: minimises the recomputed FLOPs). This is a 0/1
knapsack; :func:`solve_budget` solves it exactly with a Pareto-front dynamic programme
(states ``(bytes, flops)`` after each branch, dominated states dropped), which stays small
because a transformer's branches come in a few distinct sizes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence


@dataclass(frozen=True)
class BudgetPlan:
    stored: list[bool]
    """Per branch (in input order): True stores, False recomputes."""
    stored_bytes: int
    recompute_flops: int
    """FLOPs of the branches left to recompute."""


def solve_budget(costs: Sequence, budget_bytes: int) -> BudgetPlan:
    """The optimum plan for ``costs`` (objects with ``stored_bytes`` and ``recompute_flops``)
    with at most ``budget_bytes`` stored. A negative budget raises ValueError."""
    if budget_bytes < 0:
        raise ValueError(f"budget of {budget_bytes} bytes is below the minimum (0: recompute every branch)")
    weights = [int(c.stored_bytes) for c in costs]
    values = [int(c.recompute_flops) for c in costs]
    # front: list of (weight, value, chosen-bitmask), sorted by weight, values increasing
    front: list[tuple[int, int, int]] = [(0, 0, 0)]
    for i, (w, v) in enumerate(zip(weights, values)):
        candidates = front + [(fw + w, fv + v, mask | (1 << i)) for fw, fv, mask in front if fw + w <= budget_bytes]
        candidates.sort(key=lambda s: (s[0], -s[1]))
        pruned: list[tuple[int, int, int]] = []
        for state in candidates:
            if not pruned or state[1] > pruned[-1][1]:
                pruned.append(state)
        front = pruned
    best_w, best_v, mask = max(front, key=lambda s: (s[1], -s[0]))
    stored = [bool(mask >> i & 1) for i in range(len(costs))]
    return BudgetPlan(stored=stored, stored_bytes=best_w, recompute_flops=sum(values) - best_v)
