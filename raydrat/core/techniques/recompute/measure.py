"""Memory measured from real tensors, and the per-branch costs of recomputation.

``saved_activation_bytes`` measures what a forward pass leaves alive for backward;
``param_bytes``, ``grad_bytes`` and ``optimizer_state_bytes`` sum the other training-state
tensors; ``measure_branch_costs`` attributes the saved bytes and recompute FLOPs to each
attention and MLP branch (the training step's peak is :mod:`raydrat.core.memory.peak`'s). All
results are in bytes.
"""

from __future__ import annotations

import contextlib
import gc
import itertools
import weakref
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import FlopCounterMode, flop_registry

from raydrat.core.techniques.recompute.wrapper import CheckpointWrapper, iter_branches


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


class _StorageRecorder(TorchDispatchMode):
    """Keeps a weak reference to the storage of every op output, by storage address.

    A later storage at the same address replaces an earlier one: if both were alive they
    would be the same storage (in-place ops, views), so the latest reference is enough.
    """

    def __init__(self, exclude: set[int]):
        super().__init__()
        self.exclude = exclude
        self.storages: dict[int, weakref.ref] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                ptr = storage.data_ptr()
                if ptr and ptr not in self.exclude:
                    self.storages[ptr] = weakref.ref(storage)
        return out

    def alive_bytes(self) -> int:
        gc.collect()
        alive = (ref() for ref in self.storages.values())
        return sum(s.nbytes() for s in alive if s is not None)


def saved_activation_bytes(
    model: nn.Module, idx: torch.Tensor, targets: torch.Tensor, context: Any = None, **forward_kwargs: Any
) -> int:
    """Bytes of activation storage a forward pass keeps alive until backward.

    Runs ``model(idx, targets)`` in the model's current mode (call ``model.train()`` to
    measure training), drops the logits, and sums the storages created during forward
    that are still alive: exactly what the autograd graph (and the loss) holds, whatever
    mechanism holds it. Parameters, buffers and the inputs are excluded.

    Why not ``torch.autograd.graph.saved_tensors_hooks`` alone: non-reentrant
    checkpointing is itself built on saved-tensor hooks. Inside a checkpointed region its
    hooks are the innermost ones and receive the packs, so an outer measuring hook sees
    neither what the region would have saved nor what it keeps instead; and the region's
    inputs are kept alive by checkpoint's recompute closure, not by a pack, so no hook ever
    sees them. Pack hooks also report the same storage many times (views, a tensor saved
    by several ops) and include parameters saved by matmuls. Tracking the liveness of op
    outputs at the storage level avoids all of this.

    ``context`` (e.g. an autocast context manager) wraps the forward; ``forward_kwargs``
    (e.g. ``active_slots``) are passed to the model.
    """
    exclude = {
        t.untyped_storage().data_ptr() for t in itertools.chain(model.parameters(), model.buffers(), (idx, targets))
    }
    recorder = _StorageRecorder(exclude)
    with recorder, context if context is not None else contextlib.nullcontext():
        logits, loss = model(idx, targets, **forward_kwargs)
    del logits
    nbytes = recorder.alive_bytes()
    del loss
    return nbytes


def _tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def param_bytes(model: nn.Module) -> int:
    """Bytes of the model's parameters (tied weights counted once)."""
    return _tensor_bytes(model.parameters())


def grad_bytes(model: nn.Module) -> int:
    """Bytes of the gradients currently allocated (parameters without a grad count 0)."""
    return _tensor_bytes(p.grad for p in model.parameters() if p.grad is not None)


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of the optimizer's state tensors (e.g. AdamW's moments and step counters), a
    storage shared by several states (bitsandbytes' quantisation maps) counted once."""
    storages = {}
    for state in optimizer.state.values():
        for v in state.values():
            if isinstance(v, torch.Tensor):
                storages[v.untyped_storage().data_ptr()] = v.untyped_storage().nbytes()
    return sum(storages.values())


# --------------------------------------------------------------------------------------
# measured per-branch costs and recompute FLOPs
# --------------------------------------------------------------------------------------


class _TaggedRecorder(_StorageRecorder):
    """A storage recorder that remembers which region (branch) created each storage, and
    the running FLOP count (from an outer ``FlopCounterMode``) after each op."""

    def __init__(self, exclude: set[int], counter=None):
        super().__init__(exclude)
        self.current: int | None = None
        self.tags: dict[int, int | None] = {}
        self.counter = counter
        self.ops: list[tuple[int | None, int, list]] = []  # (tag, flops so far, output storage refs)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = super().__torch_dispatch__(func, types, args, kwargs)
        refs = []
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                ptr = t.untyped_storage().data_ptr()
                if ptr in self.storages:
                    self.tags[ptr] = self.current
                    refs.append(self.storages[ptr])
        if self.counter is not None:
            self.ops.append((self.current, self.counter.get_total_flops(), refs))
        return out

    def alive_ptrs(self) -> dict[int, int]:
        gc.collect()
        out = {}
        for ptr, ref in self.storages.items():
            s = ref()
            if s is not None:
                out[ptr] = s.nbytes()
        return out


def flop_counter():
    """``FlopCounterMode`` that also counts PyTorch's CPU flash-attention kernels (same
    formula as the CUDA flash kernel; FlopCounterMode leaves them out)."""
    aten = torch.ops.aten

    def same_as(op):
        counted = flop_registry[op]  # already takes (args, out_val=...): mark it so

        def count(*args, **kwargs):
            return counted(*args, **kwargs)

        count._get_raw = True
        return count

    mapping = {
        aten._scaled_dot_product_flash_attention_for_cpu: same_as(aten._scaled_dot_product_flash_attention),
        aten._scaled_dot_product_flash_attention_for_cpu_backward: same_as(
            aten._scaled_dot_product_flash_attention_backward
        ),
    }
    return FlopCounterMode(display=False, custom_mapping=mapping)


def measure_branch_costs(
    model: nn.Module, idx: torch.Tensor, targets: torch.Tensor, context: Any = None
) -> tuple[list[BranchCost], int]:
    """Measured :class:`BranchCost` per branch and the bytes alive after forward with every
    branch recomputed (the minimum), from one forward pass with every branch stored.

    ``stored_bytes``: the storages a branch creates that are still alive after forward.
    ``recompute_flops``: the FLOPs backward repeats when the branch is recomputed: its
    forward ops up to the last one whose output is kept (non-reentrant checkpointing
    stops recomputing there). Wrapper flags are restored."""
    branches = list(iter_branches(model))
    flags = [b.enabled if isinstance(b, CheckpointWrapper) else None for *_, b in branches]
    exclude = {
        t.untyped_storage().data_ptr() for t in itertools.chain(model.parameters(), model.buffers(), (idx, targets))
    }
    counter = flop_counter()
    recorder = _TaggedRecorder(exclude, counter)
    start_flops = [0] * len(branches)
    inputs = [0] * len(branches)
    handles = []

    def pre(i):
        def hook(_module, args):
            recorder.current = i
            inputs[i] = args[0].numel() * args[0].element_size()
            start_flops[i] = counter.get_total_flops()

        return hook

    def post(_module, _args, _out):
        recorder.current = None

    try:
        for i, (*_, b) in enumerate(branches):
            if isinstance(b, CheckpointWrapper):
                b.enabled = False
            handles += [b.register_forward_pre_hook(pre(i)), b.register_forward_hook(post)]
        with counter, recorder, context if context is not None else contextlib.nullcontext():
            logits, loss = model(idx, targets)
        del logits
        alive = recorder.alive_ptrs()
        kept_ops = [(tag, n) for tag, n, refs in recorder.ops if tag is not None and any(r() is not None for r in refs)]
        del loss
    finally:
        for h in handles:
            h.remove()
        for (*_, b), flag in zip(branches, flags):
            if flag is not None:
                b.enabled = flag
    stored = [0] * len(branches)
    outside = 0
    for ptr, nbytes in alive.items():
        tag = recorder.tags.get(ptr)
        if tag is None:
            outside += nbytes
        else:
            stored[tag] += nbytes
    end_flops = list(start_flops)
    for tag, flops_so_far in kept_ops:
        end_flops[tag] = flops_so_far
    costs = [
        BranchCost(layer, kind, inputs[i], stored[i], end_flops[i] - start_flops[i])
        for i, (layer, kind, _) in enumerate(branches)
    ]
    return costs, outside


def backward_flops(model: nn.Module, idx: torch.Tensor, targets: torch.Tensor, **forward_kwargs: Any) -> int:
    """FLOPs of one backward pass (device independent), recomputation included."""
    _, loss = model(idx, targets, **forward_kwargs)
    counter = flop_counter()
    with counter:
        loss.backward()
    return counter.get_total_flops()
