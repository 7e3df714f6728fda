"""Measuring :class:`~.op_costs.OpCosts` on this device: one recorded training forward
(the op recorder of :mod:`.record`, with saved-tensor hooks to learn what backward reads),
``repeats`` timed ones, and eager selective checkpointing's own time per op, measured in
situ on a block at a tiny input."""

from __future__ import annotations

import functools
import math
import statistics
from collections import defaultdict
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from raydrat.core.techniques.recompute.op_apply import Hits, block_contexts
from raydrat.core.techniques.recompute.op_costs import COMPUTE_OPS, POST, PRE, OpCosts, OpSite
from raydrat.core.techniques.recompute.record import (
    Call,
    Clock,
    OpRecorder,
    Recording,
    excluded_storages,
    op_clock,
    record_forward,
)
from raydrat.core.techniques.recompute.wrapper import CheckpointWrapper, lifted


def measure_op_costs(
    model: nn.Module,
    idx: torch.Tensor,
    targets: torch.Tensor,
    context: Any = None,
    repeats: int = 3,
    sac_overheads: bool = True,
) -> OpCosts:
    """Measure every op call of a training forward of ``model`` on this batch: its time
    (median of ``repeats`` timed forwards after one warm-up, by
    :func:`~raydrat.core.techniques.recompute.record.op_clock`; on CUDA each op is
    synchronised), the bytes of the storage it outputs, what a plain forward keeps per block
    and outside the blocks, and which outputs backward needs. Every checkpoint wrapper is
    off for the measurement, its switch restored afterwards. ``context``: e.g. autocast.
    ``sac_overheads``: measure eager SAC's own time per op too (a quarter of the
    measurement on the demo model; only eager plans use it, compiled SAC has none)."""
    if repeats < 1:
        raise ValueError("repeats must be >= 1")
    was_training = model.training
    model.train()
    with lifted(model):
        first = _record(model, idx, targets, context, saved=True)
        runs = [_times(first.calls, _record(model, idx, targets, context)) for _ in range(repeats)]
    model.train(was_training)
    model.zero_grad(set_to_none=True)
    times = _block_means(first.calls, [statistics.median(ts) for ts in zip(*runs)], len(model.layers))
    costs = _op_costs(first, times, len(model.layers), idx.device)
    if sac_overheads and len(model.layers):
        costs.sac_op_overhead_s, costs.sac_save_overhead_s = _sac_overheads_of(model, idx)
    return costs


def _record(model: nn.Module, idx, targets, context, saved: bool = False) -> Recording:
    device = idx.device
    recorder = OpRecorder(
        excluded_storages(model, idx, targets), op_clock(device), device.type == "cuda", region=PRE, after=POST
    )
    blocks = [(int(key), block) for key, block in model.layers.items()]
    return record_forward(model, idx, targets, context, blocks, recorder, saved=saved)


def _times(reference: list[Call], again: Recording) -> list[float]:
    if [(c.region, c.op) for c in again.calls] != [(c.region, c.op) for c in reference]:
        raise RuntimeError("the forward ran different ops on a repeat: op costs need a deterministic op sequence")
    return [c.time_s for c in again.calls]


def _block_positions(calls: list[Call], n_layer: int) -> tuple[list[list[int]], bool]:
    """Per block its calls' positions, and whether every block runs the same op sequence."""
    per_block = [[i for i, c in enumerate(calls) if c.region == layer] for layer in range(n_layer)]
    signature = [[(calls[i].op, calls[i].index, calls[i].shape) for i in ids] for ids in per_block]
    return per_block, n_layer > 0 and all(s == signature[0] for s in signature)


def _block_means(calls: list[Call], times: list[float], n_layer: int) -> list[float]:
    """Blocks that run the same ops: each position's time averaged over the blocks."""
    per_block, uniform = _block_positions(calls, n_layer)
    if uniform:
        for position in zip(*per_block):
            mean = sum(times[i] for i in position) / len(position)
            for i in position:
                times[i] = mean
    return times


def _needed(calls: list[Call], packed: list[int], anchors: set[int]) -> set[int]:
    """What backward needs with only the block outputs stored: walk back from every saved
    tensor through the ops that produced it, stopping at block outputs."""
    needed: set[int] = set()
    stack = list(set(packed))
    while stack:
        j = stack.pop()
        if j in needed or j in anchors:
            continue
        needed.add(j)
        stack.extend(calls[j].inputs)
    return needed


def _counts(calls: list[Call]) -> dict[tuple, tuple[int, int, int]]:
    """Per (op, output shape): calls before the blocks, in block 0, after the blocks."""
    counts: dict[tuple, list[int]] = defaultdict(lambda: [0, 0, 0])
    for c in calls:
        slot = 0 if c.region == PRE else 2 if c.region == POST else 1
        if slot != 1 or c.region == 0:
            counts[(c.op, c.shape)][slot] += 1
    return {op: tuple(v) for op, v in counts.items()}


def _sites(rec: Recording, times: list[float], needed: set[int]) -> list[OpSite]:
    sites = []
    for j, c in enumerate(rec.calls):
        value = times[j] if j <= rec.last_pack.get(c.region, -1) else 0.0
        sites.append(
            OpSite(c.region, c.op, c.index, c.nbytes, times[j], c.shape, c.op in COMPUTE_OPS, value, j in needed)
        )
    return sites


def _op_costs(rec: Recording, times: list[float], n_layer: int, device: torch.device) -> OpCosts:
    calls = rec.calls
    anchors = [rec.visits[layer].output_call if layer in rec.visits else None for layer in range(n_layer)]
    if any(a is None for a in anchors):
        raise RuntimeError("a block's output was not produced by an op of that block")
    regions = rec.alive_by_region()
    return OpCosts(
        sites=_sites(rec, times, _needed(calls, rec.packed, set(anchors))),
        n_layer=n_layer,
        none_bytes=sum(rec.alive.values()),
        outside_bytes=regions.get(PRE, 0) + regions.get(POST, 0),
        block_bytes=[regions.get(layer, 0) for layer in range(n_layer)],
        anchor_bytes=[calls[a].nbytes for a in anchors],
        anchors=[(calls[a].region, calls[a].op, calls[a].shape, calls[a].index) for a in anchors],
        counts=_counts(calls),
        uniform=_block_positions(calls, n_layer)[1],
        device=device.type,
        region_bytes=torch.get_rng_state().untyped_storage().nbytes() if device.type == "cpu" else 0,
        loss_bytes=rec.loss_bytes,
        inputs=[tuple(c.inputs) for c in calls],
        packed=frozenset(rec.packed),
    )


def _sac_overheads_of(model: nn.Module, idx: torch.Tensor) -> tuple[float, float]:
    """:func:`sac_overheads` of block 0, its checkpoint wrappers off."""
    tiny = torch.randn(1, min(4, idx.shape[1]), model.cfg.d_model, device=idx.device, requires_grad=True)
    block = model.layers["0"]
    with lifted(model):
        out = sac_overheads(
            block.inner if isinstance(block, CheckpointWrapper) else block, 0, tiny, op_clock(idx.device)
        )
    model.zero_grad(set_to_none=True)
    return out


def sac_overheads(block: nn.Module, layer: int, x: torch.Tensor, clock: Clock, reps: int = 8, rounds: int = 3):
    """Eager SAC's own time per op call of ``block``, from the block at a tiny input (its
    compute is then negligible): ``(recomputed, saved)``, seconds per call. A region's SAC
    cost is ``calls * recomputed + len(stored) * (saved - recomputed)`` on top of the ops
    it re-runs."""

    def timed(context_fn) -> float:
        kwargs = {} if context_fn is None else {"context_fn": context_fn}
        best = math.inf
        for _ in range(rounds):
            t0 = clock()
            for _ in range(reps):
                out = checkpoint(block, x, use_reentrant=False, preserve_rng_state=True, **kwargs)
                out.sum().backward()
            best = min(best, (clock() - t0) / reps)
        return best

    recorder = OpRecorder(set())
    with torch.no_grad(), recorder:
        block(x)
    calls = recorder.calls
    # every op output but the block's own (the last call) stored
    saved = frozenset((layer, c.op, c.shape, c.index) for c in calls[:-1] if c.nbytes > 0)
    full = timed(None)
    recompute_all = timed(functools.partial(block_contexts, layer, Hits(frozenset())))
    save_all = timed(functools.partial(block_contexts, layer, Hits(saved)))
    per_recomputed = max(0.0, (recompute_all - full) / len(calls))
    per_saved = max(0.0, (save_all - full - (len(calls) - len(saved)) * per_recomputed) / max(1, len(saved)))
    return per_recomputed, per_saved
