"""Op-level activation recomputation for a :class:`GPT`, applied from outside the model.

A plan decides, for every op call of the forward, whether its output is stored for
backward or recomputed, through PyTorch's selective activation checkpointing (SAC:
``torch.utils.checkpoint.create_selective_checkpoint_contexts`` with a policy per op:
``MUST_SAVE`` this matmul's output, ``PREFER_RECOMPUTE`` that norm). An op call is named
by SAC's own key: the op and its call index among calls of the same op in its region
(:class:`OpSite`); the first two blocks' third ``aten.mm`` are ``(0, "aten.mm.default", 2)``
and ``(1, "aten.mm.default", 2)``.

Modes (:func:`plan_none`, :func:`plan_full`, :func:`plan_budget`):

* ``none``: nothing is wrapped;
* ``full``: every transformer block is one ``torch.utils.checkpoint`` region (it keeps only
  its input; the previous, per-branch ``full`` kept both branch inputs);
* ``budget``: the least recompute time within a byte budget, solved exactly by the
  pseudo-polynomial knapsack of :mod:`raydrat.core.techniques.recompute.knapsack` over costs measured on this
  device (:func:`measure_op_costs`: every op's measured time and the bytes of the storage
  it outputs, and which outputs backward needs).

The budget plan depends on how the model runs, so it is planned for one or the other:

* eager (``compiled=False``): each block is left plain, made a plain checkpoint region, or
  made a SAC region storing some of its op outputs. Eager recomputation re-runs every op of
  a region that is not stored (up to the region's last op that saves anything for
  backward: checkpoint stops there), so an op's value is its own measured time, plus SAC's
  own per-op time (measured in situ on the block at a tiny input); the problem is an exact
  multiple-choice knapsack over the blocks, each block's SAC subsets from an inner one.
  Bytes outside the blocks (embedding, head and loss) are not planned: eagerly they could
  only be recomputed by making the whole forward one region, whose recomputation runs at
  the start of backward and would bring every block's tensors back at once.
* compiled (``compiled=True``): the whole forward is one SAC region; the compiler's
  partitioner honours the tags (``MUST_SAVE`` nodes are saved, ``PREFER_RECOMPUTE`` ones
  recomputed inside the fused backward kernels). Pointwise ops, norms and reductions fuse
  into the backward kernels and are always recomputed; what costs is recomputing a matmul
  or attention. Each block's output (the residual stream) is always stored, and
  the knapsack chooses, for every compute op (matmul, attention) backward needs, whether
  to store its output, a tensor after it that backward reads instead (post-RoPE q and k,
  ``log_softmax``'s output rather than the logits: same bytes, no recompute at all), or
  nothing (:meth:`OpCosts.choices`); values are measured times. The LM head is one such
  group, so low budgets can recompute the head, as the compiler's own
  ``activation_memory_budget`` does.

Plans are applied by :func:`apply_plan` and removed by :func:`remove_plan`, from outside:
blocks are wrapped by :class:`RegionWrapper` (a :class:`CheckpointWrapper`: it shares the
block's parameter and module dicts, so parameter names and ``state_dict`` keys never
change), and a compiled budget plan sets ``model.forward`` on the instance to a function
that runs the class's forward inside one SAC region. Compile the model after applying a
plan (``model.compile()``).

Learnable gates over the same op-level choices (:func:`gate_plan`): :meth:`OpCosts.items`
lists the choices a plan makes (site, bytes, value) for either mode; one
:class:`~raydrat.core.techniques.recompute.gates.RecomputeGates` gate per item, with the measured bytes and
recompute time as its costs, gives store/recompute decisions that :func:`plan_from_stored`
turns into a plan. Re-applying a plan eagerly costs a few module swaps; a compiled model
recompiles for each distinct plan, so under compile the gates should settle (their
warm-up does that) before the plan is compiled.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import math
import statistics
import time
import weakref
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.checkpoint import SAC_IGNORED_OPS, CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from raydrat.config.recompute import GatesConfig
from raydrat.core.techniques.recompute.gates import RecomputeGates
from raydrat.core.techniques.recompute.knapsack import (
    BucketKnapsack,
    BudgetBelowMinimum,
    bucket_resolution,
    solve_groups,
    to_buckets,
)
from raydrat.core.techniques.recompute.wrapper import CheckpointWrapper, iter_branches

PRE, POST = "pre", "post"
"""Regions outside the blocks: before the first block (embedding), after the last (head, loss)."""
Region = int | str
Key = tuple[Region, str, tuple[int, ...], int]
"""(region, op, output shape, call index among the region's calls of that op with that shape)."""
PlanMode = Literal["none", "full", "budget"]


def _resolve_ops(names: Iterable[str]) -> frozenset:
    out = set()
    for name in names:
        packet, _, overload = name.partition(".")
        op = getattr(torch.ops.aten, packet, None)
        if op is not None and hasattr(op, overload or "default"):
            out.add(str(getattr(op, overload or "default")))
    return frozenset(out)


COMPUTE_OPS = _resolve_ops(
    [
        "mm.default",
        "addmm.default",
        "bmm.default",
        "baddbmm.default",
        "convolution.default",
        "_scaled_mm.default",
        "_scaled_dot_product_flash_attention.default",
        "_scaled_dot_product_flash_attention_for_cpu.default",
        "_scaled_dot_product_efficient_attention.default",
        "_scaled_dot_product_cudnn_attention.default",
        "_flash_attention_forward.default",
        "_efficient_attention_forward.default",
    ]
)
"""Ops a compiler does not fuse (matmuls, attention kernels): recomputing them costs their
full time even under ``torch.compile``. Everything else (pointwise, norms, reductions,
views, indexing) fuses into the backward kernels."""


# --------------------------------------------------------------------------------------
# measured costs
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class OpSite:
    """One op call of the measured forward."""

    region: Region
    """Block index, or ``PRE`` / ``POST``."""
    op: str
    """The op overload, e.g. ``aten.mm.default``."""
    index: int
    """Call index among the region's calls of this op with this output shape. (Keying by
    shape too keeps keys stable when a compiler adds calls of the same op elsewhere, e.g.
    the clones a p=0 dropout becomes under ``torch.compile``.)"""
    nbytes: int
    """Bytes of the new storage(s) it outputs (0 for views and in-place ops)."""
    time_s: float
    """Measured time of the call on this device (median over repeats; mean over blocks)."""
    shape: tuple[int, ...]
    """Shape of its first output."""
    compute: bool
    """A matmul or attention kernel (:data:`COMPUTE_OPS`)."""
    eager_value_s: float
    """Eager recompute time saved by storing its output: ``time_s`` up to the region's
    last op that saves anything for backward, 0 after (checkpoint never re-runs those)."""
    needed: bool
    """Its output is needed in backward (directly or to recompute something that is)
    when only the blocks' outputs are stored."""

    @property
    def key(self) -> Key:
        return (self.region, self.op, self.shape, self.index)

    @property
    def name(self) -> str:
        where = f"L{self.region}" if isinstance(self.region, int) else self.region
        return f"{where}:{self.op.removeprefix('aten.').removesuffix('.default')}{list(self.shape)}#{self.index}"


@dataclass
class OpCosts:
    """Everything a plan needs, measured on one micro-batch shape and device."""

    sites: list[OpSite]
    n_layer: int
    none_bytes: int
    """Saved bytes of a plain forward (no recomputation)."""
    outside_bytes: int
    """Of those, the bytes created outside the blocks (embedding output, head, loss)."""
    block_bytes: list[int]
    """Per block: bytes it creates that a plain forward keeps (its output included)."""
    anchor_bytes: list[int]
    """Per block: bytes of its output (kept under every plan: the next block's input)."""
    anchors: list[Key]
    """Per block: the op call that produces its output."""
    counts: dict[tuple, tuple[int, int, int]]
    """Per (op, output shape): calls before the blocks, per block, after the blocks
    (compiled plans map a call index over the whole forward to its region with this)."""
    uniform: bool
    """Every block runs the same op sequence (so compiled plans can locate ops)."""
    device: str
    region_bytes: int = 0
    """Bytes each checkpoint region keeps besides its input: the CPU RNG state it saves to
    replay random ops (``preserve_rng_state``), on the CPU allocator; 0 on CUDA."""
    loss_bytes: int = 0
    """Bytes of the loss the forward returns (alive until backward under every plan)."""
    sac_op_overhead_s: float = 0.0
    """Eager SAC's own time per op call of a region (its Python dispatch modes see every op
    in forward and again in recompute), measured on this machine."""
    sac_save_overhead_s: float = 0.0
    """Eager SAC's own time per op call whose output it stores (caching a detached copy in
    forward, handing it back in recompute), instead of ``sac_op_overhead_s``."""

    def sac_region_s(self, layer: int, n_saved: int) -> float:
        """Eager SAC's own time for block ``layer`` as a region storing ``n_saved`` outputs."""
        return self.block_calls(layer) * self.sac_op_overhead_s + n_saved * (
            self.sac_save_overhead_s - self.sac_op_overhead_s
        )

    def block_calls(self, layer: int) -> int:
        return sum(1 for s in self.sites if s.region == layer)

    def region_keep(self, layer: int) -> int:
        """Bytes block ``layer`` keeps as a region storing nothing inside: output + RNG state."""
        return self.anchor_bytes[layer] + self.region_bytes

    inputs: list[tuple[int, ...]] = field(default_factory=list)
    """Per site: the sites that produced its input activations (views resolve to their base)."""
    packed: frozenset = frozenset()
    """Sites whose outputs backward reads directly (autograd saved them in a plain forward)."""

    def items(self, compiled: bool) -> list[OpSite]:
        """Binary store/recompute choices, in forward order: for eager plans every non-view
        op of a block before its last saving op (not the block's output); for compiled
        plans, per :meth:`choices` group, the option that saves the most time."""
        if compiled:
            return [
                self.site(max(c.options[1:], key=lambda o: (c.options[0][2] - o[2], -o[1]))[0]) for c in self.choices()
            ]
        anchors = set(self.anchors)
        return [
            s
            for s in self.sites
            if isinstance(s.region, int) and s.nbytes > 0 and s.eager_value_s > 0 and s.key not in anchors
        ]

    def item_value(self, site: OpSite, compiled: bool) -> float:
        """Recompute time saved by storing ``site`` (one of :meth:`items`)."""
        if not compiled:
            return site.eager_value_s
        for c in self.choices():
            for key, _, cost in c.options[1:]:
                if key == site.key:
                    return c.options[0][2] - cost
        raise KeyError(site.key)

    def choices(self) -> list[Choice]:
        """Compiled plans: one group per compute op backward needs (a matmul or attention
        call whose output is needed with only the blocks' outputs stored). The group is the
        op's *pocket*: the op and the fusible ops after it whose activation inputs all come
        from the pocket (block outputs and parameters are free). Its options: store nothing
        (recompute the op and the pocket), or store one tensor of the pocket that every
        path to the pocket's exits (tensors backward reads, or that leave the pocket) runs
        through, then recompute only the pocket after it. E.g. the LM head's pocket is the
        matmul and ``log_softmax``: storing ``log_softmax``'s output (the logits' size)
        recomputes nothing; storing the logits recomputes ``log_softmax``. Fusible ops cost
        their measured eager time here (an upper bound of the fused recompute)."""
        return self._choices

    @functools.cached_property
    def _choices(self) -> list[Choice]:
        n = len(self.sites)
        consumers: list[list[int]] = [[] for _ in range(n)]
        for j, ins in enumerate(self.inputs):
            for i in ins:
                consumers[i].append(j)
        index = {s.key: j for j, s in enumerate(self.sites)}
        free = {index[a] for a in self.anchors}
        out = []
        for c, site in enumerate(self.sites):
            if not (site.compute and site.needed and site.nbytes > 0):
                continue
            pocket = [c]
            members = {c}
            for j in range(c + 1, n):
                s = self.sites[j]
                if s.compute or not s.needed or j in free:
                    continue
                ins = [i for i in self.inputs[j] if i not in free]
                if ins and all(i in members for i in ins):
                    pocket.append(j)
                    members.add(j)
            exits = {  # read by backward, or by a needed op outside the pocket (views are not ops here)
                j
                for j in pocket
                if j in self.packed or any(k not in members and self.sites[k].needed for k in consumers[j])
            }

            def reach(start: int, avoid: int | None, members: set[int] = members) -> set[int]:
                seen, stack = set(), [start]
                while stack:
                    j = stack.pop()
                    if j in seen or j == avoid:
                        continue
                    seen.add(j)
                    stack.extend(k for k in consumers[j] if k in members)
                return seen

            nothing = sum(self.sites[j].time_s for j in pocket)
            options: list[tuple[Key | None, int, float]] = [(None, 0, nothing)]
            for d in pocket:
                if self.sites[d].nbytes == 0 or (d != c and reach(c, d) & exits):
                    continue  # a view, or not on every path to the exits
                after = reach(d, None) - {d}
                options.append((self.sites[d].key, self.sites[d].nbytes, sum(self.sites[j].time_s for j in after)))
            out.append(Choice(site.key, tuple(options)))
        return out

    def site(self, key: Key) -> OpSite:
        return self._by_key[key]

    @functools.cached_property
    def _by_key(self) -> dict[Key, OpSite]:
        return {s.key: s for s in self.sites}


@dataclass(frozen=True)
class Choice:
    """One group of a compiled plan: ``options`` are ``(key stored or None, bytes, recompute
    seconds)``, the first stores nothing."""

    root: Key
    """The compute op the group is about."""
    options: tuple


@dataclass
class _Call:
    region: Region
    op: str
    index: int
    time_s: float
    nbytes: int
    shape: tuple[int, ...]
    inputs: list[int]
    """Producer call numbers of the input storages (views resolve to their base's producer)."""


def op_clock(device: torch.device):
    """The clock op costs are timed with: this thread's CPU time on a CPU running one
    intra-op thread (every op then runs on the calling thread, and other processes
    competing for the cores do not inflate it), wall-clock time otherwise."""
    if device.type == "cpu" and torch.get_num_threads() == 1:
        return time.thread_time
    return time.perf_counter


class _OpRecorder(TorchDispatchMode):
    """Records every op call: region, SAC key, time, new output storages and, by storage,
    which earlier call produced each input."""

    def __init__(self, exclude: set[int], sync: bool, clock=time.perf_counter):
        super().__init__()
        self.exclude = exclude
        self.sync = sync
        self.clock = clock
        self.region: Region = PRE
        self.calls: list[_Call] = []
        self.counters: dict[tuple[Region, str], int] = defaultdict(int)
        self.producer: dict[int, tuple[int, weakref.ref]] = {}  # storage ptr -> (call, storage)

    def _producer_of(self, t: torch.Tensor) -> int | None:
        storage = t.untyped_storage()
        entry = self.producer.get(storage.data_ptr())
        if entry is None or entry[1]() is None:
            return None
        return entry[0]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in SAC_IGNORED_OPS:
            return func(*args, **kwargs)
        ins = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        in_ptrs = {t.untyped_storage().data_ptr() for t in ins}
        inputs = sorted({p for p in (self._producer_of(t) for t in ins) if p is not None})
        if self.sync:
            torch.cuda.synchronize()
        t0 = self.clock()
        out = func(*args, **kwargs)
        if self.sync:
            torch.cuda.synchronize()
        elapsed = self.clock() - t0
        n = len(self.calls)
        nbytes = 0
        shape: tuple[int, ...] = ()
        for i, t in enumerate(x for x in tree_flatten(out)[0] if isinstance(x, torch.Tensor)):
            if i == 0:
                shape = tuple(t.shape)
            storage = t.untyped_storage()
            ptr = storage.data_ptr()
            if ptr and ptr not in in_ptrs and ptr not in self.exclude:
                self.producer[ptr] = (n, weakref.ref(storage))
                nbytes += storage.nbytes()
        key = (self.region, str(func), shape)
        self.calls.append(_Call(self.region, str(func), self.counters[key], elapsed, nbytes, shape, inputs))
        self.counters[key] += 1
        return out

    def alive(self) -> dict[int, int]:
        """Bytes still alive per producing call."""
        out: dict[int, int] = defaultdict(int)
        for call, ref in self.producer.values():
            s = ref()
            if s is not None:
                out[call] += s.nbytes()
        return out


@contextlib.contextmanager
def _plain_forward(model: nn.Module):
    """The model without any op plan or enabled branch wrapper, restored afterwards."""
    plan = current_plan(model)
    remove_plan(model)
    wrappers = [b for *_, b in iter_branches(model) if isinstance(b, CheckpointWrapper)]
    flags = [w.enabled for w in wrappers]
    for w in wrappers:
        w.enabled = False
    try:
        yield
    finally:
        for w, f in zip(wrappers, flags):
            w.enabled = f
        if plan is not None:
            apply_plan(model, plan)


def _record_forward(model, idx, targets, context, exclude, sync, saved_hook: bool):
    recorder = _OpRecorder(exclude, sync, op_clock(idx.device))
    packed_calls: list[int] = []
    last_pack: dict[Region, int] = {}
    block_out: dict[int, int] = {}

    def pack(t: torch.Tensor):
        call = recorder._producer_of(t)
        if call is not None:
            packed_calls.append(call)
        if recorder.calls:
            last_pack[recorder.region] = len(recorder.calls) - 1
        return t

    def pre(i):
        def hook(_m, _args):
            recorder.region = i

        return hook

    def post(i):
        def hook(_m, _args, out):
            block_out[i] = recorder._producer_of(out)
            recorder.region = POST

        return hook

    handles = []
    for key, block in model.layers.items():
        handles += [block.register_forward_pre_hook(pre(int(key))), block.register_forward_hook(post(int(key)))]
    hooks = torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t) if saved_hook else contextlib.nullcontext()
    try:
        with hooks, recorder, context if context is not None else contextlib.nullcontext():
            logits, loss = model(idx, targets)
        del logits
        alive = recorder.alive()
        loss_bytes = loss.untyped_storage().nbytes()
        del loss
    finally:
        for h in handles:
            h.remove()
    return recorder.calls, alive, packed_calls, last_pack, block_out, loss_bytes


def _sac_overheads(block: nn.Module, layer: int, x: torch.Tensor, clock, reps: int = 8, rounds: int = 3):
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

    recorder = _OpRecorder(set(), False)
    with torch.no_grad(), recorder:
        block(x)
    calls = recorder.calls
    # every op output but the block's own (the last call) stored
    saved = frozenset((layer, c.op, c.shape, c.index) for c in calls[:-1] if c.nbytes > 0)
    full = timed(None)
    recompute_all = timed(functools.partial(_block_contexts, layer, _Hits(frozenset())))
    save_all = timed(functools.partial(_block_contexts, layer, _Hits(saved)))
    per_recomputed = max(0.0, (recompute_all - full) / len(calls))
    per_saved = max(0.0, (save_all - full - (len(calls) - len(saved)) * per_recomputed) / max(1, len(saved)))
    return per_recomputed, per_saved


def measure_op_costs(
    model: nn.Module, idx: torch.Tensor, targets: torch.Tensor, context: Any = None, repeats: int = 3
) -> OpCosts:
    """Measure every op call of a training forward of ``model`` on this batch: its time
    (median of ``repeats`` timed forwards after one warm-up, by :func:`op_clock`; on CUDA
    each op is synchronised), the bytes of the storage it outputs, what a plain forward keeps per
    block and outside the blocks, and which outputs backward needs. Any applied plan or
    branch wrapper is lifted for the measurement and restored. ``context``: e.g. autocast."""
    if repeats < 1:
        raise ValueError("repeats must be >= 1")
    n_layer = len(model.layers)
    exclude = {
        t.untyped_storage().data_ptr() for t in itertools.chain(model.parameters(), model.buffers(), (idx, targets))
    }
    sync = idx.device.type == "cuda"
    was_training = model.training
    model.train()
    with _plain_forward(model):
        calls, alive, packed, last_pack, block_out, loss_bytes = _record_forward(
            model, idx, targets, context, exclude, sync, True
        )
        runs = []
        for _ in range(repeats):
            again = _record_forward(model, idx, targets, context, exclude, sync, False)[0]
            if [(c.region, c.op) for c in again] != [(c.region, c.op) for c in calls]:
                raise RuntimeError(
                    "the forward ran different ops on a repeat: op costs need a deterministic op sequence"
                )
            runs.append([c.time_s for c in again])
    model.train(was_training)
    model.zero_grad(set_to_none=True)
    times = [statistics.median(ts) for ts in zip(*runs)]

    # blocks run the same ops: average each position's time over the blocks
    per_block = [[i for i, c in enumerate(calls) if c.region == layer] for layer in range(n_layer)]
    signature = [[(calls[i].op, calls[i].index, calls[i].shape) for i in ids] for ids in per_block]
    uniform = n_layer > 0 and all(s == signature[0] for s in signature)
    if uniform:
        for position in zip(*per_block):
            mean = sum(times[i] for i in position) / len(position)
            for i in position:
                times[i] = mean

    anchors = [block_out.get(layer) for layer in range(n_layer)]
    if any(a is None for a in anchors):
        raise RuntimeError("a block's output was not produced by an op of that block")
    anchor_set = set(anchors)
    # what backward needs with only the block outputs stored: walk back from every saved
    # tensor through the ops that produced it, stopping at block outputs
    needed: set[int] = set()
    stack = list(set(packed))
    while stack:
        j = stack.pop()
        if j in needed or j in anchor_set:
            continue
        needed.add(j)
        stack.extend(calls[j].inputs)

    region_bytes: dict[Region, int] = defaultdict(int)
    for j, nbytes in alive.items():
        region_bytes[calls[j].region] += nbytes
    counts: dict[tuple, list[int]] = defaultdict(lambda: [0, 0, 0])
    for c in calls:
        slot = 0 if c.region == PRE else 2 if c.region == POST else 1
        if slot != 1 or c.region == 0:
            counts[(c.op, c.shape)][slot] += 1
    sites = []
    for j, c in enumerate(calls):
        value = times[j] if j <= last_pack.get(c.region, -1) else 0.0
        sites.append(
            OpSite(c.region, c.op, c.index, c.nbytes, times[j], c.shape, c.op in COMPUTE_OPS, value, j in needed)
        )
    block_bytes = [region_bytes[layer] for layer in range(n_layer)]
    costs = OpCosts(
        sites=sites,
        n_layer=n_layer,
        none_bytes=sum(alive.values()),
        outside_bytes=region_bytes[PRE] + region_bytes[POST],
        block_bytes=block_bytes,
        anchor_bytes=[calls[a].nbytes for a in anchors],
        anchors=[(calls[a].region, calls[a].op, calls[a].shape, calls[a].index) for a in anchors],
        counts={op: tuple(v) for op, v in counts.items()},
        uniform=uniform,
        device=idx.device.type,
        region_bytes=torch.get_rng_state().untyped_storage().nbytes() if idx.device.type == "cpu" else 0,
        loss_bytes=loss_bytes,
        inputs=[tuple(c.inputs) for c in calls],
        packed=frozenset(packed),
    )
    if n_layer:
        tiny = torch.randn(1, min(4, idx.shape[1]), model.cfg.d_model, device=idx.device, requires_grad=True)
        with _plain_forward(model):
            block = model.layers["0"]
            costs.sac_op_overhead_s, costs.sac_save_overhead_s = _sac_overheads(block, 0, tiny, op_clock(idx.device))
        model.zero_grad(set_to_none=True)
    return costs


# --------------------------------------------------------------------------------------
# plans
# --------------------------------------------------------------------------------------


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

    def describe(self) -> str:
        if self.mode != "budget":
            return self.mode
        kind = "compiled" if self.compiled else "eager"
        return (
            f"budget ({kind}): {len(self.saved)} op outputs stored, {len(self.plain_blocks)} plain blocks, "
            f"{len(self.full_blocks)} fully recomputed blocks, "
            f"{(self.predicted_bytes or 0) / 2**20:.2f} MiB predicted, recompute {1e3 * (self.recompute_s or 0):.1f} ms"
        )


def plan_none() -> OpPlan:
    return OpPlan("none")


def plan_full(costs: OpCosts | None = None, compiled: bool = False) -> OpPlan:
    """Every block one checkpointed region (``torch.utils.checkpoint``, nothing stored inside)."""
    predicted = None
    recompute = None
    if costs is not None and not compiled:  # compiled: the head is left to the partitioner
        predicted = costs.outside_bytes + sum(costs.region_keep(i) for i in range(costs.n_layer))
        recompute = sum(s.eager_value_s for s in costs.items(False))
    return OpPlan("full", compiled, predicted_bytes=predicted, recompute_s=recompute)


def minimum_bytes(costs: OpCosts, compiled: bool) -> int:
    """The least saved bytes a budget plan can reach (eager: the bytes outside the blocks
    plus, per block, its output or its plain bytes if smaller; compiled: the blocks' outputs
    and the loss)."""
    if compiled:
        return sum(costs.anchor_bytes) + costs.loss_bytes
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
    fixed = sum(costs.anchor_bytes) + costs.loss_bytes
    choices = costs.choices()
    plan = solve_groups([[(b, t) for _, b, t in c.options] for c in choices], budget - fixed, resolution)
    stored = [costs.site(c.options[k][0]) for c, k in zip(choices, plan.choices) if k > 0]
    return _make_budget_plan(costs, True, stored, frozenset(), fixed + plan.nbytes, plan.cost, budget, plan.resolution)


def _plan_eager(costs: OpCosts, budget: int, resolution: int | None) -> OpPlan:
    """Per block one of: plain (stores what autograd stores, no recompute), a plain
    checkpoint region (keeps its input, re-runs every op), or a SAC region storing a subset
    of op outputs (re-runs the rest, plus SAC's per-op overhead); an exact
    multiple-choice knapsack over the blocks, each block's SAC subsets from an inner one."""
    items = costs.items(False)
    by_block: dict[int, list[OpSite]] = defaultdict(list)
    for s in items:
        by_block[s.region].append(s)
    bases = [min(b, costs.region_keep(i)) for i, b in enumerate(costs.block_bytes)]
    excess = budget - costs.outside_bytes - sum(bases)
    res = resolution or bucket_resolution(excess)
    cap = excess // res
    outer = BucketKnapsack(cap)
    inner_tables: list[tuple[BucketKnapsack, list[OpSite]]] = []
    meanings: list[list[int | str]] = []  # per block and option: "plain", "full" or the inner capacity
    for layer in range(costs.n_layer):
        ops = by_block.get(layer, [])
        inner = BucketKnapsack(cap)
        save_cost = costs.sac_save_overhead_s - costs.sac_op_overhead_s
        for s in ops:
            inner.add_group([(0, s.eager_value_s), (to_buckets(s.nbytes, res), save_cost)])
        inner_tables.append((inner, ops))
        base = bases[layer]
        region_w = to_buckets(costs.region_keep(layer) - base, res)
        full_cost = sum(s.eager_value_s for s in ops)
        options = [(to_buckets(costs.block_bytes[layer] - base, res), 0.0), (region_w, full_cost)]
        meaning: list[int | str] = ["plain", "full"]
        overhead = costs.sac_region_s(layer, 0)
        best = inner.best.tolist()
        for c in range(1, cap + 1 - region_w):
            if best[c] < best[c - 1] and overhead + best[c] < full_cost:
                options.append((region_w + c, overhead + best[c]))
                meaning.append(c)
        outer.add_group(options)
        meanings.append(meaning)
    stored: list[OpSite] = []
    plain: set[int] = set()
    full: set[int] = set()
    recompute = 0.0
    nbytes = costs.outside_bytes
    for layer, k in enumerate(outer.choices()):
        choice = meanings[layer][k]
        inner, ops = inner_tables[layer]
        if choice == "plain":
            plain.add(layer)
            nbytes += costs.block_bytes[layer]
            continue
        nbytes += costs.region_keep(layer)
        if choice == "full":
            full.add(layer)
            recompute += sum(s.eager_value_s for s in ops)
            continue
        picks = inner.choices(choice)
        keep = [s for s, p in zip(ops, picks) if p == 1]
        stored += keep
        nbytes += sum(s.nbytes for s in keep)
        recompute += costs.sac_region_s(layer, len(keep))
        recompute += sum(s.eager_value_s for s, p in zip(ops, picks) if p == 0)
    return _make_budget_plan(costs, False, stored, frozenset(plain), nbytes, recompute, budget, res, frozenset(full))


def _make_budget_plan(costs, compiled, stored, plain, nbytes, recompute, budget, res, full=frozenset()) -> OpPlan:
    saved = [s.key for s in stored]
    if compiled:
        saved += costs.anchors
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
    )


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
    if compiled:  # what every group costs with nothing stored, less what the stored options save
        recompute = sum(c.options[0][2] for c in costs.choices()) - sum(costs.item_value(s, True) for s in keep)
    else:
        recompute = sum(s.eager_value_s for s, k in zip(items, stored) if not k)
    if not compiled:  # every block a SAC region: its own per-op time too
        recompute += sum(costs.sac_region_s(i, sum(1 for s in keep if s.region == i)) for i in range(costs.n_layer))
    fixed = (
        sum(costs.anchor_bytes) + costs.loss_bytes
        if compiled
        else costs.outside_bytes + sum(costs.region_keep(i) for i in range(costs.n_layer))
    )
    nbytes = fixed + sum(s.nbytes for s in keep)
    return _make_budget_plan(costs, compiled, keep, frozenset(), nbytes, recompute, budget_bytes, None)


def _gated_minimum(costs: OpCosts, compiled: bool) -> int:
    """Saved bytes with every choice recomputed and every block a region."""
    if compiled:
        return minimum_bytes(costs, True)
    return costs.outside_bytes + sum(costs.region_keep(i) for i in range(costs.n_layer))


def gate_plan(costs: OpCosts, budget_bytes: int, compiled: bool = False, cfg: GatesConfig | None = None):
    """Learnable recomputation gates over the op-level choices (:meth:`OpCosts.items`), in
    their memory-budget form: one gate per op, its stored bytes and recompute time (eager
    or compiled value) as measured costs, ``warmup_steps`` gate-only updates, then the
    hard decision (which never exceeds the budget). Returns ``(plan, gates)``; training
    would keep updating the gates and re-plan from :meth:`RecomputeGates.decide`."""
    minimum = _gated_minimum(costs, compiled)
    if budget_bytes < minimum:
        raise _below_minimum(budget_bytes, minimum, compiled)
    items = costs.items(compiled)
    cfg = (cfg or GatesConfig()).model_copy(update={"cost_model": "activation_size"})
    gates = RecomputeGates([(s.region, s.name) for s in items], cfg, costs.n_layer, budget_mb=budget_bytes / 2**20)
    values = [costs.item_value(s, compiled) for s in items]
    gates.set_measured([s.nbytes for s in items], [round(v * 1e9) for v in values], outside_bytes=minimum)
    gates.pretrain(torch.optim.Adam(gates.parameters(), lr=cfg.lr), cfg.warmup_steps)
    hard, _ = gates.decide()
    return plan_from_stored(costs, hard.tolist(), compiled, budget_bytes), gates


# --------------------------------------------------------------------------------------
# applying a plan
# --------------------------------------------------------------------------------------


class _Hits:
    """The stored keys of one region and those its policy met (a plan measured for another
    model or batch shape meets fewer: checked after each eager region call, and by
    :func:`verify_plan` after a compiled model's first step)."""

    def __init__(self, saved: frozenset, counts: dict | None = None):
        self.saved = saved
        self.counts = counts or {}
        """Compiled plans: calls per (op, shape) before, per and after the blocks."""
        self.seen: set = set()

    def check(self) -> None:
        missing = self.saved - self.seen
        if missing:
            region, op, shape, index = sorted(missing, key=str)[0]
            raise RuntimeError(
                f"op plan does not match this forward: {len(missing)} stored op calls did not occur (e.g. call {index} of "
                f"{op} with output {list(shape)} in region {region}): measure the costs again for this model and batch shape"
            )


def _first_shape(out: Any) -> tuple[int, ...]:
    tensors = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
    return tuple(int(d) for d in tensors[0].shape) if tensors else ()


def _policy(hits: _Hits, locate):
    counters: dict[Any, int] = defaultdict(int)

    def policy(ctx, func, *args, **kwargs):
        op, shape = str(func), _first_shape(ctx.op_output)
        k = counters[(op, shape)]
        counters[(op, shape)] += 1
        key = locate(op, shape, k)
        if key in hits.saved:
            hits.seen.add(key)
            return CheckpointPolicy.MUST_SAVE
        return CheckpointPolicy.PREFER_RECOMPUTE

    return policy


def _block_contexts(layer: int, hits: _Hits):
    return create_selective_checkpoint_contexts(_policy(hits, lambda op, shape, k: (layer, op, shape, k)))


def _model_contexts(hits: _Hits, active: tuple[int, ...]):
    def locate(op: str, shape: tuple, k: int) -> Key:
        pre, per, _post = hits.counts.get((op, shape), (0, 0, 0))
        if k < pre:
            return (PRE, op, shape, k)
        k -= pre
        if k < per * len(active):
            return (active[k // per], op, shape, k % per)
        return (POST, op, shape, k - per * len(active))

    return create_selective_checkpoint_contexts(_policy(hits, locate))


class RegionWrapper(CheckpointWrapper):
    """A block run as one non-reentrant checkpoint region, with an optional SAC
    ``context_fn``. Transparent to names like :class:`CheckpointWrapper`."""

    def __init__(self, inner: nn.Module, context_fn=None, hits: _Hits | None = None):
        super().__init__(inner, enabled=True)
        self.context_fn = context_fn
        self.hits = hits

    def forward(self, x: torch.Tensor, *args) -> torch.Tensor:
        if not (self.enabled and self.training and torch.is_grad_enabled()):
            return self.inner(x, *args)
        if self.context_fn is None:
            return checkpoint(self.inner, x, *args, use_reentrant=False, preserve_rng_state=True)
        eager = not torch.compiler.is_compiling()
        if eager and self.hits is not None:
            self.hits.seen.clear()
        out = checkpoint(self.inner, x, *args, use_reentrant=False, preserve_rng_state=True, context_fn=self.context_fn)
        if eager and self.hits is not None:
            self.hits.check()
        return out

    def extra_repr(self) -> str:
        return "selective" if self.context_fn is not None else "full"


_PLAN_ATTR = "_raydrat_op_plan"
_HITS_ATTR = "_raydrat_op_plan_hits"


def _planned_forward(model: nn.Module, hits: _Hits, idx, targets=None, active_slots=None):
    cls_forward = type(model).forward
    if not (model.training and torch.is_grad_enabled()):
        return cls_forward(model, idx, targets, active_slots)
    active = tuple(model._slot_order(active_slots))
    # only objects dynamo can hold by identity in the partial (a dict argument breaks the
    # graph under dynamic shapes, and the whole region would then run eagerly)
    context_fn = functools.partial(_model_contexts, hits, active)
    eager = not torch.compiler.is_compiling()
    if eager:
        hits.seen.clear()
    out = checkpoint(
        cls_forward,
        model,
        idx,
        targets,
        active_slots,
        use_reentrant=False,
        preserve_rng_state=True,
        context_fn=context_fn,
    )
    if eager:
        hits.check()
    return out


def verify_plan(model: nn.Module) -> None:
    """Raise if a stored op of the applied plan did not occur in the forwards traced or run
    since it was applied (call after a compiled model's first training step)."""
    hits = [getattr(model, _HITS_ATTR, None)] + [getattr(b, "hits", None) for b in model.layers.values()]
    for h in hits:
        if h is not None:
            h.check()


def current_plan(model: nn.Module) -> OpPlan | None:
    return getattr(model, _PLAN_ATTR, None)


def remove_plan(model: nn.Module) -> nn.Module:
    """Undo :func:`apply_plan` (no-op without a plan)."""
    for key, block in list(model.layers.items()):
        if isinstance(block, RegionWrapper):
            model.layers[key] = block.inner
    if "forward" in model.__dict__:
        del model.forward
    for attr in (_PLAN_ATTR, _HITS_ATTR):
        if attr in model.__dict__:
            delattr(model, attr)
    return model


def apply_plan(model: nn.Module, plan: OpPlan) -> nn.Module:
    """Apply ``plan`` to a GPT in place (replacing any earlier plan) and return it.
    Parameter names and ``state_dict`` keys are unchanged. Compile after applying."""
    remove_plan(model)
    if any(isinstance(b, CheckpointWrapper) and b.enabled for *_, b in iter_branches(model)):
        raise ValueError(
            "the model's branches are wrapped for per-branch recomputation (apply_recompute): "
            "call apply_recompute(model, 'none') before applying an op-level plan"
        )
    if plan.mode == "full":
        for key, block in list(model.layers.items()):
            model.layers[key] = RegionWrapper(block)
    elif plan.mode == "budget" and plan.compiled:
        hits = _Hits(plan.saved, plan.counts)
        object.__setattr__(model, _HITS_ATTR, hits)
        model.forward = functools.partial(_planned_forward, model, hits)
    elif plan.mode == "budget":
        for key, block in list(model.layers.items()):
            layer = int(key)
            if layer in plan.plain_blocks:
                continue
            if layer in plan.full_blocks:
                model.layers[key] = RegionWrapper(block)
                continue
            hits = _Hits(frozenset(k for k in plan.saved if k[0] == layer))
            model.layers[key] = RegionWrapper(block, functools.partial(_block_contexts, layer, hits), hits)
    elif plan.mode != "none":
        raise ValueError(f"unknown plan mode {plan.mode!r}: use none, full or budget")
    object.__setattr__(model, _PLAN_ATTR, plan)
    return model
