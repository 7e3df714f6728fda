"""One optimizer step and one evaluation: plain PyTorch, shared by the Ray Train loop and
the bare-loop baseline of the overhead benchmark."""

from __future__ import annotations

import contextlib
from typing import Callable, ContextManager, Iterable

import torch


def split_block(tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A ``(B, seq_len + 1)`` block → inputs and next-token targets, each ``(B, seq_len)``."""
    return tokens[:, :-1], tokens[:, 1:]


class PlainStep:
    """The default step hooks: fp32, all layers, no resource loss. A
    :class:`raydrat.policy.StepPlan` has the same methods (autocast, slots, resource
    loss, GradScaler)."""

    forward_kwargs: dict = {}

    def autocast(self):
        return contextlib.nullcontext()

    def add_resource_loss(self, loss: torch.Tensor) -> torch.Tensor:
        return loss

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def unscale_(self, optimizer: torch.optim.Optimizer) -> None:
        pass

    def optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        optimizer.step()


def train_step(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    micro_batches: Iterable[torch.Tensor],
    grad_clip: float,
    hooks=None,
    no_sync: Callable[[], ContextManager] | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Forward/backward over the micro-batches (gradient accumulation), clip, step.

    ``hooks`` (a :class:`raydrat.policy.StepPlan`; default :class:`PlainStep`) supplies the
    autocast context, the forward's ``active_slots``, the resource loss added to the task
    loss, the (scaled) backward and the optimizer step. ``no_sync`` (the sync strategy's)
    wraps every micro-batch but the last, so DDP all-reduces once per step.
    Returns the mean task loss (a 0-d tensor, not synchronised to the host) and the global
    gradient norm before clipping (``None`` when clipping is off)."""
    hooks = hooks if hooks is not None else PlainStep()
    micro_batches = list(micro_batches)
    n = len(micro_batches)
    total = torch.zeros((), device=micro_batches[0].device)
    for i, tokens in enumerate(micro_batches):
        idx, targets = split_block(tokens)
        with no_sync() if no_sync is not None and i < n - 1 else contextlib.nullcontext():
            with hooks.autocast():
                _, loss = model(idx, targets, **hooks.forward_kwargs)
            hooks.backward(hooks.add_resource_loss(loss / n))
        total += loss.detach().float()
    hooks.unscale_(optimizer)
    grad_norm = None
    if grad_clip > 0:
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    hooks.optimizer_step(optimizer)
    optimizer.zero_grad(set_to_none=True)
    return total / n, grad_norm


@torch.no_grad()
def evaluate(model: torch.nn.Module, batches: Iterable[torch.Tensor], max_batches: int) -> float:
    """Mean loss over at most ``max_batches`` validation batches, with every layer active."""
    was_training = model.training
    model.eval()
    losses = []
    for i, tokens in enumerate(batches):
        if i >= max_batches:
            break
        idx, targets = split_block(tokens)
        _, loss = model(idx, targets)
        losses.append(loss.float())
    model.train(was_training)
    if not losses:
        raise RuntimeError("the validation set yielded no batch: lower train.batch_size")
    return torch.stack(losses).mean().item()
