"""The exact choice of what to store under a memory budget: a pseudo-polynomial knapsack.

The general problem (:func:`solve_groups`) is a multiple-choice knapsack: every group
offers options ``(bytes, cost)`` and exactly one option is taken per group; take the
options with the least total cost whose bytes fit the budget. A plain 0/1 item is a group
``[(0, cost if not stored), (bytes, 0)]``; a transformer block planned op by op is a group
whose options are "no region" and the block's own best plans at each size
(:mod:`raydrat.core.techniques.recompute.op_plan`).

Solver: dynamic programme over the budget in buckets of ``resolution`` bytes, O(total
options x budget / resolution) time, whatever the number of groups (never exponential in
the number of groups). Each group's smallest option is taken as its base, so the minimum plan
is always representable; the bytes above the base are rounded *up* to whole buckets, so
the plan returned always fits the budget in real bytes. It is the exact optimum of the
bucketed instance: exact when every option's bytes above its group's base are multiples
of the resolution (always at resolution 1; tensor sizes are multiples of large powers of
two), and otherwise never worse than the exact optimum at ``budget - groups x resolution``.
Default resolution: the smallest power of two that keeps the budget within
``MAX_BUCKETS`` buckets (1 byte for budgets up to 8 KiB above the minimum).

``recompute.mode: budget`` per branch (:func:`solve_budget`): each branch ``i`` costs
``w_i`` bytes when stored and saves ``v_i`` FLOPs of recomputation; store the set with
``sum w_i <= budget`` that recomputes the fewest FLOPs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

MAX_BUCKETS = 1 << 13
"""Default bound on the budget's buckets: the DP's table width."""


class BudgetBelowMinimum(ValueError):
    """The budget is below the least bytes any plan needs; ``minimum_bytes`` says how many."""

    def __init__(self, message: str, minimum_bytes: int):
        super().__init__(message)
        self.minimum_bytes = minimum_bytes


def bucket_resolution(excess_bytes: int, max_buckets: int = MAX_BUCKETS) -> int:
    """Smallest power of two ``r`` with ``excess_bytes / r <= max_buckets``."""
    need = max(1, math.ceil(max(0, excess_bytes) / max_buckets))
    return 1 << (need - 1).bit_length()


def to_buckets(nbytes: int, resolution: int) -> int:
    """Bytes in whole buckets, rounded up (so a plan's real bytes never exceed its buckets)."""
    return -(-int(nbytes) // resolution)


class BucketKnapsack:
    """The DP table of a multiple-choice knapsack in bucket units, built group by group.

    ``best[c]``: least cost of one option per group added so far, with at most ``c``
    buckets. :meth:`choices` reconstructs the options of the plan at any capacity, so a
    caller can use this table as the frontier of a sub-problem (a block's op plans).
    """

    def __init__(self, capacity: int):
        if capacity < 0:
            raise ValueError(f"capacity {capacity} < 0")
        self.capacity = capacity
        self.best = torch.zeros(capacity + 1, dtype=torch.float64)
        self._arg: list[torch.Tensor] = []
        self._weights: list[list[int]] = []

    def add_group(self, options: Sequence[tuple[int, float]]) -> None:
        """Add a group of options ``(buckets, cost)``; one of them is taken."""
        cap = self.capacity
        new = torch.full((cap + 1,), math.inf, dtype=torch.float64)
        arg = torch.full((cap + 1,), -1, dtype=torch.int32)
        weights = []
        for k, (w, cost) in enumerate(options):
            w = int(w)
            weights.append(w)
            if w > cap:
                continue
            cand = self.best[: cap + 1 - w] + float(cost)
            better = cand < new[w:]  # strict: among equal costs the first option wins
            new[w:] = torch.where(better, cand, new[w:])
            arg[w:] = torch.where(better, torch.tensor(k, dtype=torch.int32), arg[w:])
        self.best = new
        self._arg.append(arg)
        self._weights.append(weights)

    def choices(self, capacity: int | None = None) -> list[int]:
        """Option index per group for the best plan within ``capacity`` buckets."""
        c = self.capacity if capacity is None else capacity
        if not math.isfinite(float(self.best[c])):
            raise ValueError(f"no plan fits {c} buckets")
        out = []
        for arg, weights in zip(reversed(self._arg), reversed(self._weights)):
            k = int(arg[c])
            out.append(k)
            c -= weights[k]
        return out[::-1]


@dataclass(frozen=True)
class GroupPlan:
    choices: list[int]
    """Option index taken in each group (input order)."""
    nbytes: int
    """Exact bytes of the chosen options."""
    cost: float
    resolution: int
    """Bytes per bucket the DP used."""


def solve_groups(
    groups: Sequence[Sequence[tuple[int, float]]],
    budget_bytes: int,
    resolution: int | None = None,
    max_buckets: int = MAX_BUCKETS,
) -> GroupPlan:
    """One option ``(bytes, cost)`` per group, least total cost with total bytes within
    ``budget_bytes``. Raises :class:`BudgetBelowMinimum` (naming the minimum) when even
    the smallest option of every group does not fit."""
    if any(len(g) == 0 for g in groups):
        raise ValueError("every group needs at least one option")
    bases = [min(int(b) for b, _ in g) for g in groups]
    minimum = sum(bases)
    if budget_bytes < minimum:
        raise BudgetBelowMinimum(
            f"budget of {budget_bytes} bytes is below the minimum {minimum} bytes (the smallest option of every group)",
            minimum,
        )
    excess = int(budget_bytes) - minimum
    res = resolution or bucket_resolution(excess, max_buckets)
    dp = BucketKnapsack(excess // res)
    for g, base in zip(groups, bases):
        dp.add_group([(to_buckets(int(b) - base, res), c) for b, c in g])
    chosen = dp.choices()
    nbytes = sum(int(g[k][0]) for g, k in zip(groups, chosen))
    cost = sum(float(g[k][1]) for g, k in zip(groups, chosen))
    return GroupPlan(chosen, nbytes, cost, res)


@dataclass(frozen=True)
class BudgetPlan:
    stored: list[bool]
    """Per branch (in input order): True stores, False recomputes."""
    stored_bytes: int
    recompute_flops: int
    """FLOPs of the branches left to recompute."""


def solve_budget(costs: Sequence, budget_bytes: int, resolution: int | None = None) -> BudgetPlan:
    """The optimum plan for ``costs`` (objects with ``stored_bytes`` and ``recompute_flops``)
    with at most ``budget_bytes`` stored (exact at the default resolution for budgets up to
    ``MAX_BUCKETS`` bytes, and whenever branch sizes are multiples of the resolution). A
    negative budget raises ValueError."""
    if budget_bytes < 0:
        raise ValueError(f"budget of {budget_bytes} bytes is below the minimum (0: recompute every branch)")
    groups = [[(0, int(c.recompute_flops)), (int(c.stored_bytes), 0)] for c in costs]
    plan = solve_groups(groups, budget_bytes, resolution)
    stored = [k == 1 for k in plan.choices]
    flops = sum(int(c.recompute_flops) for c, s in zip(costs, stored) if not s)
    return BudgetPlan(stored=stored, stored_bytes=plan.nbytes, recompute_flops=flops)
