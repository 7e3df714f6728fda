"""Per-branch costs of recomputation (``recompute.granularity: branch``): what each
attention and MLP branch keeps for backward, and what backward repeats if it is recomputed,
measured on one forward through the op recorder (:mod:`.record`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from raydrat.core.techniques.recompute.measure import flop_counter
from raydrat.core.techniques.recompute.record import OpRecorder, Recording, excluded_storages, record_forward
from raydrat.core.techniques.recompute.wrapper import iter_branches, lifted


@dataclass(frozen=True)
class BranchCost:
    """One attention or MLP branch: bytes its input keeps alive whatever the policy,
    the extra bytes it keeps when stored (not recomputed), and the forward FLOPs that
    backward repeats when it is recomputed."""

    layer: int
    kind: str  # "attn" | "mlp"
    input_bytes: int
    stored_bytes: int
    recompute_flops: int


def measure_branch_costs(
    model: nn.Module, idx: torch.Tensor, targets: torch.Tensor, context: Any = None
) -> tuple[list[BranchCost], int]:
    """Measured :class:`BranchCost` per branch and the bytes alive after forward with every
    branch recomputed (the minimum), from one forward pass with every branch stored.

    ``stored_bytes``: the storages a branch creates that are still alive after forward.
    ``recompute_flops``: the FLOPs backward repeats when the branch is recomputed: its
    forward ops up to the last one whose output is kept (non-reentrant checkpointing
    stops recomputing there). Every checkpoint wrapper is off for the forward, its switch
    restored afterwards. ``context``: e.g. autocast."""
    branches = list(iter_branches(model))
    recorder = OpRecorder(excluded_storages(model, idx, targets), counter=flop_counter())
    with lifted(model):
        rec = record_forward(model, idx, targets, context, [(i, b) for i, (*_, b) in enumerate(branches)], recorder)
    stored = rec.alive_by_region()
    costs = [_branch_cost(rec, i, layer, kind, stored.get(i, 0)) for i, (layer, kind, _) in enumerate(branches)]
    return costs, stored.get(None, 0)


def _branch_cost(rec: Recording, i: int, layer: int, kind: str, stored: int) -> BranchCost:
    visit = rec.visits[i]
    kept = [c.flops for j, c in enumerate(rec.calls) if c.region == i and j in rec.kept]
    end = kept[-1] if kept else visit.flops
    return BranchCost(layer, kind, visit.input_bytes, stored, end - visit.flops)
