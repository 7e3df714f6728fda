"""Whole-pass figures measured on real tensors: the activation bytes a forward leaves for
backward (through the op recorder, :mod:`.record`), the FLOPs of a backward, and the bytes
of the parameters, gradients and optimizer states. All byte results are in bytes.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, flop_registry

from raydrat.core.techniques.recompute.record import record_forward


def saved_activation_bytes(
    model: nn.Module, idx: torch.Tensor, targets: torch.Tensor, context: Any = None, **forward_kwargs: Any
) -> int:
    """Bytes of activation storage a forward pass keeps alive until backward.

    Runs ``model(idx, targets)`` in the model's current mode (call ``model.train()`` to
    measure training), drops the logits, and sums the storages created during forward
    that are still alive: exactly what the autograd graph (and the loss) holds, whatever
    mechanism holds it (:mod:`.record` says why not saved-tensor hooks). Parameters,
    buffers and the inputs are excluded.

    ``context`` (e.g. an autocast context manager) wraps the forward; ``forward_kwargs``
    (e.g. ``active_slots``) are passed to the model.
    """
    return sum(record_forward(model, idx, targets, context, **forward_kwargs).alive.values())


def flop_counter() -> FlopCounterMode:
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


def backward_flops(model: nn.Module, idx: torch.Tensor, targets: torch.Tensor, **forward_kwargs: Any) -> int:
    """FLOPs of one backward pass (device independent), recomputation included."""
    _, loss = model(idx, targets, **forward_kwargs)
    counter = flop_counter()
    with counter:
        loss.backward()
    return counter.get_total_flops()


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
