"""One optimizer step in plain PyTorch: what :func:`raydrat.core.fit.fit` calls, usable from
any loop (the evaluation is :func:`raydrat.core.evaluate.evaluate`)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable

import torch
from torch.autograd.profiler import record_function

from raydrat.core.memory.peak import BACKWARD, FORWARD, OPTIMIZER, ZERO_GRAD
from raydrat.core.techniques.bundle import Techniques


def split_block(tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A ``(B, seq_len + 1)`` block → inputs and next-token targets, each ``(B, seq_len)``."""
    return tokens[:, :-1], tokens[:, 1:]


def train_step(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    micro_batches: Iterable[torch.Tensor],
    grad_clip: float,
    techniques: Techniques | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Forward/backward over the micro-batches (gradient accumulation), clip, step.

    ``techniques`` (default: fp32, every layer, one worker) supply the forward's active
    slots (the slot schedule's plan), the autocast context, the (scaled) backward and the
    optimizer step (precision), and ``no_sync`` for every micro-batch but the last (the
    sync strategy: DDP all-reduces once per step). Recomputation is already set on the
    model's wrappers by the planner. The phases run in ``record_function`` regions
    (:data:`raydrat.core.memory.peak.PHASES`) that :class:`~raydrat.core.memory.peak.PeakMemory`
    reads on a profiled step. Returns the mean loss (a 0-d tensor, not synchronised
    to the host) and the global gradient norm before clipping (``None`` when clipping is off).
    """
    micro_batches = list(micro_batches)
    n = len(micro_batches)
    forward_kwargs = techniques.slots.forward_kwargs() if techniques else {}
    precision = techniques.precision if techniques else None
    total = torch.zeros((), device=micro_batches[0].device)
    for i, tokens in enumerate(micro_batches):
        idx, targets = split_block(tokens)
        quiet = techniques is not None and i < n - 1
        with techniques.sync.no_sync() if quiet else contextlib.nullcontext():
            with record_function(FORWARD), precision.autocast() if precision else contextlib.nullcontext():
                loss = model(idx, targets, **forward_kwargs)[1]  # the logits are not kept: backward needs none of them
            with record_function(BACKWARD):
                if precision:
                    precision.backward(loss / n)
                else:
                    (loss / n).backward()
        total += loss.detach().float()
    with record_function(OPTIMIZER):
        if precision:
            precision.unscale_(optimizer)
        grad_norm = None
        if grad_clip > 0:
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        if precision:
            precision.optimizer_step(optimizer)
        else:
            optimizer.step()
    with record_function(ZERO_GRAD):
        optimizer.zero_grad(set_to_none=True)
    return total / n, grad_norm
