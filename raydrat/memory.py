"""Memory measurement from real tensors (a first version; the analytic estimate comes later).

``saved_activation_bytes`` measures what a forward pass leaves alive for backward;
``param_bytes``, ``grad_bytes`` and ``optimizer_state_bytes`` sum the other training-state
tensors. All results are in bytes.
"""

from __future__ import annotations

import gc
import itertools
import weakref

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


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


def saved_activation_bytes(model: nn.Module, idx: torch.Tensor, targets: torch.Tensor) -> int:
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
    """
    exclude = {
        t.untyped_storage().data_ptr()
        for t in itertools.chain(model.parameters(), model.buffers(), (idx, targets))
    }
    recorder = _StorageRecorder(exclude)
    with recorder:
        logits, loss = model(idx, targets)
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
    """Bytes of the optimizer's state tensors (e.g. AdamW's moments and step counters)."""
    return _tensor_bytes(
        v for state in optimizer.state.values() for v in state.values() if isinstance(v, torch.Tensor)
    )
