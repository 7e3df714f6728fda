"""The one op recorder every recomputation cost is measured with: per-branch costs
(:mod:`.branch_costs`), per-op costs (:mod:`.op_measure`) and a forward's saved bytes
(:func:`raydrat.core.techniques.recompute.measure.saved_activation_bytes`).

:class:`OpRecorder` is a dispatch mode that sees every op call of a forward and records,
per call (:class:`Call`): the region it ran in (set by forward hooks on the modules being
measured, :func:`tag_regions`), the op and its call index among the region's calls of that
op with that output shape (the key PyTorch's selective checkpointing uses), its time, the
bytes of the new storages it outputs, the call that produced each input storage, and the
FLOPs an outer ``FlopCounterMode`` counted so far. :func:`record_forward` runs one training
forward under it and returns a :class:`Recording`.

Liveness is tracked at the storage level, by weak references: what is still alive after
the forward is what the autograd graph (and the loss) holds, whatever mechanism holds it.
Saved-tensor hooks alone cannot tell: non-reentrant checkpointing is itself built on them
(inside a checkpointed region its hooks are the innermost ones and receive the packs, and
the region's inputs are kept by its recompute closure, not by a pack), and packs report the
same storage many times (views, a tensor saved by several ops) and include parameters saved
by matmuls. The recording does use them, to learn which outputs backward reads directly.
"""

from __future__ import annotations

import contextlib
import gc
import itertools
import time
import weakref
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.checkpoint import SAC_IGNORED_OPS

Region = int | str | None
"""Where an op ran: a measured module's tag (a branch or block index), or what the caller
names the rest (``None``, or ``"pre"`` / ``"post"`` around the blocks)."""
Clock = Callable[[], float]


@dataclass
class Call:
    """One op call of the recorded forward."""

    region: Region
    op: str
    index: int
    """Call index among the region's calls of this op with this output shape."""
    time_s: float
    nbytes: int
    """Bytes of the new storages it outputs (0 for views and in-place ops)."""
    shape: tuple[int, ...]
    """Shape of its first output."""
    inputs: list[int]
    """Calls that produced its input storages (a view resolves to its base's producer)."""
    flops: int = 0
    """FLOPs counted so far by the outer counter, this call included (0 without one)."""
    outputs: list[weakref.ref] = field(default_factory=list, repr=False)
    """Every output storage that is not a parameter, buffer or input (views included)."""

    def kept(self) -> bool:
        """Whether any of its outputs is still alive."""
        return any(ref() is not None for ref in self.outputs)


@dataclass
class Visit:
    """What a tagged module did in the recorded forward."""

    first_call: int
    flops: int
    """FLOPs counted before it ran."""
    input_bytes: int
    """Bytes of its first argument."""
    output_call: int | None = None
    """The call that produced its output (``None``: not produced by a recorded op)."""


def _tensors(tree: Any) -> list[torch.Tensor]:
    return [t for t in tree_flatten(tree)[0] if isinstance(t, torch.Tensor)]


def op_clock(device: torch.device) -> Clock:
    """The clock op costs are timed with: this thread's CPU time on a CPU running one
    intra-op thread (every op then runs on the calling thread, and other processes
    competing for the cores do not inflate it), wall-clock time otherwise."""
    if device.type == "cpu" and torch.get_num_threads() == 1:
        return time.thread_time
    return time.perf_counter


def excluded_storages(model: nn.Module, *tensors: torch.Tensor) -> set[int]:
    """Storage addresses that are not activations: parameters, buffers, the inputs."""
    found = itertools.chain(model.parameters(), model.buffers(), tensors)
    return {t.untyped_storage().data_ptr() for t in found}


class OpRecorder(TorchDispatchMode):
    """Records every op call (:class:`Call`) and, by storage address, which call produced
    each storage still alive. Ops selective checkpointing ignores (metadata queries,
    ``detach``) are not recorded: they create no storage."""

    def __init__(
        self,
        exclude: set[int],
        clock: Clock = time.perf_counter,
        sync: bool = False,
        counter: Any = None,
        region: Region = None,
        after: Region = None,
    ):
        super().__init__()
        self.exclude = exclude
        self.clock = clock
        self.sync = sync
        self.counter = counter
        """An outer ``FlopCounterMode`` whose running total each call records."""
        self.region = region
        """The region of the next op: the starting one, a tagged module's while it runs."""
        self.after = after
        """The region once a tagged module returns."""
        self.calls: list[Call] = []
        self.visits: dict[Region, Visit] = {}
        self.packed: list[int] = []
        """Calls whose outputs a saved-tensor hook saw packed (backward reads them)."""
        self.last_pack: dict[Region, int] = {}
        """Per region: the last call before which something was packed."""
        self._counters: dict[tuple, int] = defaultdict(int)
        self._producer: dict[int, tuple[int, weakref.ref]] = {}

    def producer_of(self, t: torch.Tensor) -> int | None:
        """The call that produced ``t``'s storage, if it is alive and was recorded."""
        entry = self._producer.get(t.untyped_storage().data_ptr())
        if entry is None or entry[1]() is None:
            return None
        return entry[0]

    def flops(self) -> int:
        return 0 if self.counter is None else self.counter.get_total_flops()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in SAC_IGNORED_OPS:
            return func(*args, **kwargs)
        ins = _tensors((args, kwargs))
        in_ptrs = {t.untyped_storage().data_ptr() for t in ins}
        inputs = sorted({p for p in map(self.producer_of, ins) if p is not None})
        out, elapsed = self._timed(func, args, kwargs)
        self._record(str(func), _tensors(out), in_ptrs, inputs, elapsed)
        return out

    def _timed(self, func, args, kwargs) -> tuple[Any, float]:
        if self.sync:
            torch.cuda.synchronize()
        t0 = self.clock()
        out = func(*args, **kwargs)
        if self.sync:
            torch.cuda.synchronize()
        return out, self.clock() - t0

    def _record(self, op: str, outs: list[torch.Tensor], in_ptrs: set[int], inputs: list[int], elapsed: float):
        n, nbytes, refs = len(self.calls), 0, []
        for t in outs:
            storage = t.untyped_storage()
            ptr = storage.data_ptr()
            if not ptr or ptr in self.exclude:
                continue
            refs.append(weakref.ref(storage))
            if ptr not in in_ptrs:
                self._producer[ptr] = (n, refs[-1])
                nbytes += storage.nbytes()
        shape = tuple(outs[0].shape) if outs else ()
        key = (self.region, op, shape)
        call = Call(self.region, op, self._counters[key], elapsed, nbytes, shape, inputs, self.flops(), refs)
        self.calls.append(call)
        self._counters[key] += 1

    def alive(self) -> dict[int, int]:
        """Bytes still alive per producing call (after a garbage collection)."""
        gc.collect()
        out: dict[int, int] = defaultdict(int)
        for call, ref in self._producer.values():
            storage = ref()
            if storage is not None:
                out[call] += storage.nbytes()
        return dict(out)

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        """A saved-tensor pack hook: note which call produced what backward will read."""
        call = self.producer_of(t)
        if call is not None:
            self.packed.append(call)
        if self.calls:
            self.last_pack[self.region] = len(self.calls) - 1
        return t

    def saved_tensors(self) -> contextlib.AbstractContextManager:
        """Saved-tensor hooks that report to :meth:`pack`."""
        return torch.autograd.graph.saved_tensors_hooks(self.pack, lambda t: t)


@contextlib.contextmanager
def tag_regions(recorder: OpRecorder, modules: Sequence[tuple[Region, nn.Module]]) -> Iterator[None]:
    """While each module runs, the recorder's region is its tag; once it returns, the
    recorder's ``after``. Each module's :class:`Visit` is recorded."""

    def enter(tag: Region):
        def hook(_module, args):
            recorder.region = tag
            x = args[0]
            recorder.visits[tag] = Visit(len(recorder.calls), recorder.flops(), x.numel() * x.element_size())

        return hook

    def leave(tag: Region):
        def hook(_module, _args, out):
            recorder.visits[tag].output_call = recorder.producer_of(out)
            recorder.region = recorder.after

        return hook

    handles = []
    try:
        for tag, module in modules:
            handles += [module.register_forward_pre_hook(enter(tag)), module.register_forward_hook(leave(tag))]
        yield
    finally:
        for h in handles:
            h.remove()


@dataclass
class Recording:
    """One recorded training forward."""

    calls: list[Call]
    alive: dict[int, int]
    """Bytes alive after the forward (the logits dropped), per producing call."""
    kept: frozenset[int]
    """Calls with an output still alive then (views of a live storage included)."""
    visits: dict[Region, Visit]
    packed: list[int]
    last_pack: dict[Region, int]
    loss_bytes: int

    def alive_by_region(self) -> dict[Region, int]:
        out: dict[Region, int] = defaultdict(int)
        for call, nbytes in self.alive.items():
            out[self.calls[call].region] += nbytes
        return out


def record_forward(
    model: nn.Module,
    idx: torch.Tensor,
    targets: torch.Tensor,
    context: Any = None,
    regions: Sequence[tuple[Region, nn.Module]] = (),
    recorder: OpRecorder | None = None,
    saved: bool = False,
    **forward_kwargs: Any,
) -> Recording:
    """Run ``model(idx, targets, **forward_kwargs)`` under ``recorder`` (default: one that
    excludes the model's parameters and buffers and the inputs) and return what it saw.
    ``regions``: ``(tag, module)`` pairs whose ops are tagged (the others take the
    recorder's ``region`` and ``after``, :func:`tag_regions`); ``saved``: also note what backward reads (saved-tensor
    hooks); ``context``: e.g. autocast. Runs in the model's current mode."""
    recorder = recorder or OpRecorder(excluded_storages(model, idx, targets))
    hooks = recorder.saved_tensors() if saved else contextlib.nullcontext()
    counter = recorder.counter if recorder.counter is not None else contextlib.nullcontext()
    with tag_regions(recorder, regions), hooks, counter, recorder, context or contextlib.nullcontext():
        logits, loss = model(idx, targets, **forward_kwargs)
    del logits
    alive = recorder.alive()
    kept = frozenset(i for i, c in enumerate(recorder.calls) if c.kept())
    loss_bytes = loss.untyped_storage().nbytes()
    del loss  # frees the graph: everything above is read before
    return Recording(recorder.calls, alive, kept, recorder.visits, recorder.packed, recorder.last_pack, loss_bytes)
