"""Op-level costs (``recompute.granularity: op``): every op call of a GPT's training
forward, named the way PyTorch's selective activation checkpointing names it, with what
storing its output costs in bytes and saves in recompute time.

An op call is an :class:`OpSite`, keyed by its region (block index, or ``PRE`` / ``POST``
around the blocks), its op, its output shape and its call index among the region's calls of
that op with that shape: the first two blocks' third ``aten.mm`` of one shape are
``(0, "aten.mm.default", shape, 2)`` and ``(1, "aten.mm.default", shape, 2)``.
:class:`OpCosts` holds every site of one measured forward (:mod:`.op_measure` measures them)
and lists the store/recompute choices a plan makes (:meth:`OpCosts.items`), eagerly one per
op output, compiled one group per matmul or attention call (:meth:`OpCosts.choices`).
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch

PRE, POST = "pre", "post"
"""Regions outside the blocks: before the first block (embedding), after the last (head, loss)."""
Region = int | str
Key = tuple[Region, str, tuple[int, ...], int]
"""(region, op, output shape, call index among the region's calls of that op with that shape)."""
Option = tuple[Key | None, int, float]
"""One option of a compiled choice: the key stored (``None``: nothing), bytes, recompute seconds."""


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


@dataclass(frozen=True)
class Choice:
    """One group of a compiled plan: ``options`` are ``(key stored or None, bytes, recompute
    seconds)``, the first stores nothing."""

    root: Key
    """The compute op the group is about."""
    options: tuple[Option, ...]


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
    inputs: list[tuple[int, ...]] = field(default_factory=list)
    """Per site: the sites that produced its input activations (views resolve to their base)."""
    packed: frozenset = frozenset()
    """Sites whose outputs backward reads directly (autograd saved them in a plain forward)."""

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

    def regions_keep(self) -> int:
        """Bytes kept with every block a region storing nothing inside, the rest plain."""
        return self.outside_bytes + sum(self.region_keep(i) for i in range(self.n_layer))

    def compiled_floor(self) -> int:
        """Bytes a compiled plan always keeps: the blocks' outputs and the loss."""
        return sum(self.anchor_bytes) + self.loss_bytes

    def items(self, compiled: bool) -> list[OpSite]:
        """Binary store/recompute choices, in forward order: for eager plans every non-view
        op of a block before its last saving op (not the block's output); for compiled
        plans, per :meth:`choices` group, the option that saves the most time."""
        if compiled:
            return [self.site(_best_option(c)[0]) for c in self.choices()]
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
        graph = _Pockets(self)
        return [graph.choice(c) for c, s in enumerate(self.sites) if s.compute and s.needed and s.nbytes > 0]

    def site(self, key: Key) -> OpSite:
        return self._by_key[key]

    @functools.cached_property
    def _by_key(self) -> dict[Key, OpSite]:
        return {s.key: s for s in self.sites}


def _best_option(c: Choice) -> Option:
    """The option of ``c`` that saves the most recompute time (ties: the fewer bytes)."""
    nothing = c.options[0][2]
    return max(c.options[1:], key=lambda o: (nothing - o[2], -o[1]))


class _Pockets:
    """The data-flow graph of the measured sites, for :meth:`OpCosts.choices`."""

    def __init__(self, costs: OpCosts):
        self.sites, self.inputs, self.packed = costs.sites, costs.inputs, costs.packed
        self.consumers: list[list[int]] = [[] for _ in self.sites]
        for j, ins in enumerate(self.inputs):
            for i in ins:
                self.consumers[i].append(j)
        index = {s.key: j for j, s in enumerate(self.sites)}
        self.free = {index[a] for a in costs.anchors}
        """Block outputs: always stored, so free inputs of a pocket."""

    def pocket(self, c: int) -> list[int]:
        """Compute op ``c`` and the fusible needed ops after it fed only from the pocket."""
        pocket, members = [c], {c}
        for j in range(c + 1, len(self.sites)):
            s = self.sites[j]
            if s.compute or not s.needed or j in self.free:
                continue
            ins = [i for i in self.inputs[j] if i not in self.free]
            if ins and all(i in members for i in ins):
                pocket.append(j)
                members.add(j)
        return pocket

    def exits(self, pocket: list[int]) -> set[int]:
        """Members read by backward, or by a needed op outside the pocket (views are not ops here)."""
        inside = set(pocket)
        return {
            j
            for j in pocket
            if j in self.packed or any(k not in inside and self.sites[k].needed for k in self.consumers[j])
        }

    def reach(self, start: int, avoid: int | None, members: set[int]) -> set[int]:
        """Members reachable from ``start`` along the data flow without passing ``avoid``."""
        seen, stack = set(), [start]
        while stack:
            j = stack.pop()
            if j in seen or j == avoid:
                continue
            seen.add(j)
            stack.extend(k for k in self.consumers[j] if k in members)
        return seen

    def choice(self, c: int) -> Choice:
        pocket = self.pocket(c)
        members, exits = set(pocket), self.exits(pocket)
        options: list[Option] = [(None, 0, self._seconds(pocket))]
        for d in pocket:
            if self.sites[d].nbytes == 0 or (d != c and self.reach(c, d, members) & exits):
                continue  # a view, or not on every path to the exits
            after = self.reach(d, None, members) - {d}
            options.append((self.sites[d].key, self.sites[d].nbytes, self._seconds(after)))
        return Choice(self.sites[c].key, tuple(options))

    def _seconds(self, calls: Iterable[int]) -> float:
        return sum(self.sites[j].time_s for j in calls)
