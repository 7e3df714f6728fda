"""Op-level plans from measured :class:`~.op_costs.OpCosts`: for every op call of the
forward, whether its output is stored for backward or recomputed.

Modes (:func:`plan_none`, :func:`plan_full`, :func:`plan_budget`):

* ``none``: nothing is recomputed;
* ``full``: every transformer block is one checkpoint region (it keeps only its input);
* ``budget``: the least recompute time within a byte budget, solved exactly by the
  pseudo-polynomial knapsack of :mod:`.knapsack` over the measured costs.

The budget plan depends on how the model runs, so it is planned for one or the other:

* eager (``compiled=False``): each block is left plain, made a plain checkpoint region, or
  made a selective (SAC) region storing some of its op outputs. Eager recomputation re-runs
  every op of a region that is not stored (up to the region's last op that saves anything
  for backward: checkpoint stops there), so an op's value is its own measured time, plus
  SAC's own per-op time; the problem is an exact multiple-choice knapsack over the blocks,
  each block's SAC subsets from an inner one. Bytes outside the blocks (embedding, head and
  loss) are not planned: eagerly they could only be recomputed by making the whole forward
  one region, whose recomputation runs at the start of backward and would bring every
  block's tensors back at once.
* compiled (``compiled=True``): the whole forward is one SAC region; the compiler's
  partitioner honours the tags (``MUST_SAVE`` nodes are saved, ``PREFER_RECOMPUTE`` ones
  recomputed inside the fused backward kernels). Pointwise ops, norms and reductions fuse
  into the backward kernels and are always recomputed; what costs is recomputing a matmul
  or attention. Each block's output (the residual stream) is always stored, and the
  knapsack chooses, for every compute op backward needs, whether to store its output, a
  tensor after it that backward reads instead (post-RoPE q and k, ``log_softmax``'s output
  rather than the logits: same bytes, no recompute at all), or nothing
  (:meth:`OpCosts.choices`); values are measured times. The LM head is one such group, so
  low budgets can recompute the head, as the compiler's own ``activation_memory_budget`` does.

Learnable gates over the same choices (:func:`gate_plan`): one
:class:`~raydrat.core.techniques.recompute.gates.RecomputeGates` gate per
:meth:`OpCosts.items` entry, with its measured bytes and recompute time as costs; their
store/recompute decisions become a plan through :func:`plan_from_stored`. Plans take effect
through :mod:`.op_apply`.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Literal

import torch

from raydrat.config.recompute import GatesConfig
from raydrat.core.techniques.recompute.gates import RecomputeGates
from raydrat.core.techniques.recompute.knapsack import (
    BucketKnapsack,
    BudgetBelowMinimum,
    bucket_resolution,
    solve_groups,
    to_buckets,
)
from raydrat.core.techniques.recompute.op_costs import POST, PRE, Key, OpCosts, OpSite

PlanMode = Literal["none", "full", "budget"]


@dataclass(frozen=True)
class OpPlan:
    mode: PlanMode
    compiled: bool = False
    """Planned for a compiled model: one SAC region over the whole forward."""
    saved: frozenset = frozenset()
    """Keys of the op calls whose outputs are stored (everything else in a region is recomputed)."""
    plain_blocks: frozenset = frozenset()
    """Eager budget plans: blocks run without a region (stored whole)."""
    full_blocks: frozenset = frozenset()
    """Eager budget plans: blocks run as a plain checkpoint region (nothing stored inside,
    no SAC: cheaper than a SAC region storing nothing)."""
    predicted_bytes: int | None = None
    """Saved bytes the plan should leave for backward (from the measured costs)."""
    recompute_s: float | None = None
    """Predicted recompute time per step (eager: every op re-run; compiled: the compute ops)."""
    budget_bytes: int | None = None
    resolution: int | None = None
    """Bytes per knapsack bucket."""
    counts: dict = field(default_factory=dict, compare=False, hash=False)
    stored_choices: int = 0
    """Of the op-level choices (:meth:`OpCosts.items`), how many the plan stores."""
    n_choices: int = 0
    """How many op-level choices the plan chose among."""

    @property
    def stored_fraction(self) -> float:
        return self.stored_choices / max(1, self.n_choices)

    def describe(self) -> str:
        if self.mode != "budget":
            return self.mode
        kind = "compiled" if self.compiled else "eager"
        return (
            f"budget ({kind}): {len(self.saved)} op outputs stored, {len(self.plain_blocks)} plain blocks, "
            f"{len(self.full_blocks)} fully recomputed blocks, "
            f"{(self.predicted_bytes or 0) / 2**20:.2f} MiB predicted, recompute {1e3 * (self.recompute_s or 0):.1f} ms"
        )


def plan_to_json(plan: OpPlan) -> dict:
    """``plan`` as JSON values (keys as ``[region, op, shape, index]``); :func:`plan_from_json`
    reads it back."""
    return {
        "mode": plan.mode,
        "compiled": plan.compiled,
        "saved": sorted(([r, op, list(shape), i] for r, op, shape, i in plan.saved), key=str),
        "plain_blocks": sorted(plan.plain_blocks),
        "full_blocks": sorted(plan.full_blocks),
        "predicted_bytes": plan.predicted_bytes,
        "recompute_s": plan.recompute_s,
        "budget_bytes": plan.budget_bytes,
        "resolution": plan.resolution,
        "counts": sorted(([op, list(shape), list(n)] for (op, shape), n in plan.counts.items()), key=str),
        "stored_choices": plan.stored_choices,
        "n_choices": plan.n_choices,
    }


def _ints(value, n: int | None = None) -> tuple[int, ...]:
    if not isinstance(value, list) or not all(type(v) is int for v in value) or n not in (None, len(value)):
        raise ValueError(f"expected a list of {n or 'some'} integers, got {value!r}")
    return tuple(value)


def _key(value) -> Key:
    if not isinstance(value, list) or len(value) != 4:
        raise ValueError(f"an op call's key is [region, op, shape, index], got {value!r}")
    region, op, shape, index = value
    if not (type(region) is int or region in (PRE, POST)) or not isinstance(op, str) or type(index) is not int:
        raise ValueError(f"malformed op call key {value!r}")
    return (region, op, _ints(shape), index)


def _optional(value, *kinds: type):
    if value is not None and type(value) not in kinds:
        raise ValueError(f"expected {' or '.join(k.__name__ for k in kinds)} or null, got {value!r}")
    return value


def plan_from_json(data: dict) -> OpPlan:
    """The plan :func:`plan_to_json` wrote; anything malformed raises ``ValueError``."""
    if not isinstance(data, dict) or data.get("mode") not in ("none", "full", "budget"):
        raise ValueError("not an op plan (no mode none, full or budget)")
    counts = {}
    for entry in data["counts"]:
        if not isinstance(entry, list) or len(entry) != 3 or not isinstance(entry[0], str):
            raise ValueError(f"malformed op count {entry!r}")
        counts[(entry[0], _ints(entry[1]))] = _ints(entry[2], 3)
    if (
        type(data["compiled"]) is not bool
        or type(data["stored_choices"]) is not int
        or type(data["n_choices"]) is not int
    ):
        raise ValueError("compiled, stored_choices and n_choices must be a bool and two integers")
    return OpPlan(
        data["mode"],
        data["compiled"],
        frozenset(_key(k) for k in data["saved"]),
        frozenset(_ints(data["plain_blocks"])),
        frozenset(_ints(data["full_blocks"])),
        _optional(data["predicted_bytes"], int),
        _optional(data["recompute_s"], float, int),
        _optional(data["budget_bytes"], int),
        _optional(data["resolution"], int),
        counts,
        data["stored_choices"],
        data["n_choices"],
    )


def plan_none() -> OpPlan:
    return OpPlan("none")


def plan_full(costs: OpCosts | None = None, compiled: bool = False) -> OpPlan:
    """Every block one checkpointed region (``torch.utils.checkpoint``, nothing stored inside)."""
    predicted = None
    recompute = None
    if costs is not None and not compiled:  # compiled: the head is left to the partitioner
        predicted = costs.regions_keep()
        recompute = sum(s.eager_value_s for s in costs.items(False))
    return OpPlan("full", compiled, predicted_bytes=predicted, recompute_s=recompute)


def minimum_bytes(costs: OpCosts, compiled: bool) -> int:
    """The least saved bytes a budget plan can reach (eager: the bytes outside the blocks
    plus, per block, its output or its plain bytes if smaller; compiled: the blocks' outputs
    and the loss)."""
    if compiled:
        return costs.compiled_floor()
    return costs.outside_bytes + sum(min(b, costs.region_keep(i)) for i, b in enumerate(costs.block_bytes))


def _below_minimum(budget: int, minimum: int, compiled: bool) -> BudgetBelowMinimum:
    kind = "compiled" if compiled else "eager"
    return BudgetBelowMinimum(
        f"activation budget {budget / 2**20:.3f} MiB is below the minimum a {kind} op-level plan can reach on this "
        f"model and batch, {minimum / 2**20:.3f} MiB ({minimum} bytes; every block recomputed, keeping its input): "
        f"raise the budget to at least that",
        minimum,
    )


def plan_budget(costs: OpCosts, budget_bytes: int, compiled: bool = False, resolution: int | None = None) -> OpPlan:
    """The plan with the least predicted recompute time whose saved bytes fit ``budget_bytes``
    (exact knapsack over the measured costs, bytes in buckets of ``resolution``; default:
    the smallest power of two that keeps the budget within ``MAX_BUCKETS`` buckets).
    A budget below :func:`minimum_bytes` raises :class:`BudgetBelowMinimum` naming it."""
    minimum = minimum_bytes(costs, compiled)
    if budget_bytes < minimum:
        raise _below_minimum(budget_bytes, minimum, compiled)
    if compiled:
        return _plan_compiled(costs, budget_bytes, resolution)
    return _plan_eager(costs, budget_bytes, resolution)


def _plan_compiled(costs: OpCosts, budget: int, resolution: int | None) -> OpPlan:
    if not costs.uniform:
        raise ValueError("compiled op plans need every block to run the same op sequence")
    fixed = costs.compiled_floor()
    choices = costs.choices()
    plan = solve_groups([[(b, t) for _, b, t in c.options] for c in choices], budget - fixed, resolution)
    stored = [costs.site(c.options[k][0]) for c, k in zip(choices, plan.choices) if k > 0]
    return _budget_plan(costs, True, stored, fixed + plan.nbytes, plan.cost, budget, plan.resolution)


@dataclass
class _EagerBlock:
    """One block's options in an eager budget plan: plain, a checkpoint region, or a SAC
    region storing the inner knapsack's best subset of its ops at each size."""

    layer: int
    ops: list[OpSite]
    inner: BucketKnapsack
    options: list[tuple[int, float]]
    """``(buckets above the block's base, recompute seconds)`` per option."""
    meanings: list[int | str]
    """Per option: ``"plain"``, ``"full"`` or the inner knapsack's capacity."""


def _eager_block(costs: OpCosts, layer: int, ops: list[OpSite], base: int, res: int, cap: int) -> _EagerBlock:
    inner = BucketKnapsack(cap)
    save_cost = costs.sac_save_overhead_s - costs.sac_op_overhead_s
    for s in ops:
        inner.add_group([(0, s.eager_value_s), (to_buckets(s.nbytes, res), save_cost)])
    region_w = to_buckets(costs.region_keep(layer) - base, res)
    full_cost = sum(s.eager_value_s for s in ops)
    block = _EagerBlock(
        layer,
        ops,
        inner,
        [(to_buckets(costs.block_bytes[layer] - base, res), 0.0), (region_w, full_cost)],
        ["plain", "full"],
    )
    overhead = costs.sac_region_s(layer, 0)
    best = inner.best.tolist()
    for c in range(1, cap + 1 - region_w):
        if best[c] < best[c - 1] and overhead + best[c] < full_cost:
            block.options.append((region_w + c, overhead + best[c]))
            block.meanings.append(c)
    return block


def _eager_choice(costs: OpCosts, block: _EagerBlock, choice: int | str) -> tuple[list[OpSite], int, tuple[float, ...]]:
    """A block's chosen option: the ops it stores, the bytes it keeps, its recompute times."""
    layer, ops = block.layer, block.ops
    if choice == "plain":
        return [], costs.block_bytes[layer], ()
    if choice == "full":
        return [], costs.region_keep(layer), (sum(s.eager_value_s for s in ops),)
    picks = block.inner.choices(choice)
    keep = [s for s, p in zip(ops, picks) if p == 1]
    rerun = sum(s.eager_value_s for s, p in zip(ops, picks) if p == 0)
    return keep, costs.region_keep(layer) + sum(s.nbytes for s in keep), (costs.sac_region_s(layer, len(keep)), rerun)


def _plan_eager(costs: OpCosts, budget: int, resolution: int | None) -> OpPlan:
    """Per block one of: plain (stores what autograd stores, no recompute), a plain
    checkpoint region (keeps its input, re-runs every op), or a SAC region storing a subset
    of op outputs (re-runs the rest, plus SAC's per-op overhead); an exact
    multiple-choice knapsack over the blocks, each block's SAC subsets from an inner one."""
    by_block: dict[int, list[OpSite]] = defaultdict(list)
    for s in costs.items(False):
        by_block[s.region].append(s)
    bases = [min(b, costs.region_keep(i)) for i, b in enumerate(costs.block_bytes)]
    excess = budget - costs.outside_bytes - sum(bases)
    res = resolution or bucket_resolution(excess)
    cap = excess // res
    blocks = [_eager_block(costs, i, by_block.get(i, []), bases[i], res, cap) for i in range(costs.n_layer)]
    outer = BucketKnapsack(cap)
    for block in blocks:
        outer.add_group(block.options)
    chosen = [block.meanings[k] for block, k in zip(blocks, outer.choices())]
    stored: list[OpSite] = []
    nbytes, recompute = costs.outside_bytes, 0.0
    for block, choice in zip(blocks, chosen):
        keep, kept_bytes, seconds = _eager_choice(costs, block, choice)
        stored += keep
        nbytes += kept_bytes
        for t in seconds:
            recompute += t
    plain = frozenset(b.layer for b, c in zip(blocks, chosen) if c == "plain")
    full = frozenset(b.layer for b, c in zip(blocks, chosen) if c == "full")
    return _budget_plan(costs, False, stored, nbytes, recompute, budget, res, plain, full)


def _budget_plan(
    costs: OpCosts,
    compiled: bool,
    stored: list[OpSite],
    nbytes: int,
    recompute: float,
    budget: int | None,
    res: int | None,
    plain: frozenset = frozenset(),
    full: frozenset = frozenset(),
) -> OpPlan:
    saved = [s.key for s in stored] + (costs.anchors if compiled else [])
    return OpPlan(
        "budget",
        compiled,
        frozenset(saved),
        plain,
        full,
        int(nbytes),
        float(recompute),
        None if budget is None else int(budget),
        res,
        dict(costs.counts),
        len({s.key for s in stored}),
        len(costs.items(compiled)),
    )


def _stored_recompute_s(costs: OpCosts, items: list[OpSite], stored: list[bool], compiled: bool) -> float:
    """Predicted recompute time of storing exactly ``items[i]`` where ``stored[i]``."""
    keep = [s for s, k in zip(items, stored) if k]
    if compiled:  # what every group costs with nothing stored, less what the stored options save
        return sum(c.options[0][2] for c in costs.choices()) - sum(costs.item_value(s, True) for s in keep)
    recompute = sum(s.eager_value_s for s, k in zip(items, stored) if not k)
    # every block a SAC region: its own per-op time too
    return recompute + sum(costs.sac_region_s(i, sum(1 for s in keep if s.region == i)) for i in range(costs.n_layer))


def plan_from_stored(
    costs: OpCosts, stored: Iterable[bool], compiled: bool = False, budget_bytes: int | None = None
) -> OpPlan:
    """A budget-mode plan storing exactly ``costs.items(compiled)[i]`` where ``stored[i]``
    (e.g. gate decisions); eager blocks are all SAC regions."""
    items = costs.items(compiled)
    stored = list(stored)
    if len(stored) != len(items):
        raise ValueError(f"{len(stored)} decisions for {len(items)} op-level choices")
    keep = [s for s, k in zip(items, stored) if k]
    nbytes = gated_minimum(costs, compiled) + sum(s.nbytes for s in keep)
    recompute = _stored_recompute_s(costs, items, stored, compiled)
    return _budget_plan(costs, compiled, keep, nbytes, recompute, budget_bytes, None)


def gated_minimum(costs: OpCosts, compiled: bool) -> int:
    """Saved bytes with every choice recomputed and every block a region."""
    return costs.compiled_floor() if compiled else costs.regions_keep()


def op_gates(costs: OpCosts, budget_bytes: int, compiled: bool = False, cfg: GatesConfig | None = None):
    """Learnable recomputation gates over the op-level choices (:meth:`OpCosts.items`), in
    their memory-budget form: one gate per choice, its stored bytes and recompute time
    (eager or compiled value) as measured costs, warmed up by ``cfg.warmup_steps``
    gate-only updates with an Adam of their own. A budget below every block recomputed
    raises :class:`BudgetBelowMinimum`."""
    minimum = gated_minimum(costs, compiled)
    if budget_bytes < minimum:
        raise _below_minimum(budget_bytes, minimum, compiled)
    items = costs.items(compiled)
    cfg = (cfg or GatesConfig()).model_copy(update={"cost_model": "activation_size"})
    gates = RecomputeGates([(s.region, s.name) for s in items], cfg, costs.n_layer, budget_mb=budget_bytes / 2**20)
    values = [costs.item_value(s, compiled) for s in items]
    gates.set_measured([s.nbytes for s in items], [round(v * 1e9) for v in values], outside_bytes=minimum)
    gates.pretrain(torch.optim.Adam(gates.parameters(), lr=cfg.lr), cfg.warmup_steps)
    return gates


def gate_plan(costs: OpCosts, budget_bytes: int, compiled: bool = False, cfg: GatesConfig | None = None):
    """The plan of :func:`op_gates`' hard decision (which never exceeds the budget).
    Returns ``(plan, gates)``; training keeps updating the gates and re-plans from
    :meth:`RecomputeGates.decide`."""
    gates = op_gates(costs, budget_bytes, compiled, cfg)
    hard, _ = gates.decide()
    return plan_from_stored(costs, hard.tolist(), compiled, budget_bytes), gates
