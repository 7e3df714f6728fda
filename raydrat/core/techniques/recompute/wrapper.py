"""The recomputation wrapper, applied to a GPT's branches from outside (torchtitan style).

``apply_recompute(model, "full")`` wraps the attention branch and the MLP branch of every
block in a :class:`CheckpointWrapper`: the branch keeps only its input for backward and
recomputes the rest. Each wrapper has a mutable ``enabled`` flag, so a per-step planner
(the gates, the budget plan: :mod:`raydrat.core.techniques.recompute.planners`) can toggle branches
one by one; :func:`iter_branches` finds them.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Literal

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from raydrat.core.model.transformer import GPT

RecomputePolicy = Literal["none", "full"]
BRANCHES = {"attn": "attn_branch", "mlp": "mlp_branch"}
"""Branch kind → attribute of :class:`~raydrat.core.model.transformer.Block`."""


class CheckpointWrapper(nn.Module):
    """Runs ``inner`` under non-reentrant activation checkpointing while ``enabled`` (and
    the module is training with grad enabled); otherwise calls it directly.

    The wrapper is transparent to names: it adopts ``inner``'s parameter, buffer and
    submodule dicts (shared, not copied) instead of registering ``inner`` as a child. So
    ``named_parameters()`` and ``state_dict()`` keys are exactly those of the unwrapped
    model, and checkpoints load across policies without any key rewriting. ``inner`` is
    kept as a plain attribute; ``train()``/``eval()`` are forwarded to it.
    """

    def __init__(self, inner: nn.Module, enabled: bool = True):
        super().__init__()
        if isinstance(inner, CheckpointWrapper):
            raise ValueError("inner module is already a CheckpointWrapper")
        for attr in ("_parameters", "_buffers", "_non_persistent_buffers_set", "_modules"):
            object.__setattr__(self, attr, getattr(inner, attr))
        object.__setattr__(self, "inner", inner)  # not a submodule: no "inner." key prefix
        self.enabled = enabled
        self.train(inner.training)

    def train(self, mode: bool = True) -> CheckpointWrapper:
        self.inner.train(mode)
        return super().train(mode)

    def forward(self, x: torch.Tensor, *args) -> torch.Tensor:
        """``args``: what the wrapped module takes beside its input (a block's KV cache)."""
        if self.enabled and self.training and torch.is_grad_enabled():
            return checkpoint(self.inner, x, *args, use_reentrant=False, preserve_rng_state=True)
        return self.inner(x, *args)

    def extra_repr(self) -> str:
        return f"enabled={self.enabled}"


def iter_branches(model: GPT) -> Iterator[tuple[int, str, nn.Module]]:
    """``(layer_idx, "attn" | "mlp", branch)`` for every branch, where ``branch`` is the
    :class:`CheckpointWrapper` if one is applied, else the plain branch module."""
    for key, block in model.layers.items():
        for kind, attr in BRANCHES.items():
            yield int(key), kind, getattr(block, attr)


def wrap_blocks(model: GPT, enabled: bool = True) -> list[CheckpointWrapper]:
    """Wrap every transformer block in a :class:`CheckpointWrapper` (``recompute.mode:
    full``: one region per block, which keeps only the block's input); idempotent. Returns
    the block wrappers."""
    out = []
    for key, block in list(model.layers.items()):
        if not isinstance(block, CheckpointWrapper):
            block = model.layers[key] = CheckpointWrapper(block, enabled)
        block.enabled = enabled
        out.append(block)
    return out


def unwrap_blocks(model: GPT) -> GPT:
    """Undo :func:`wrap_blocks` (block-level wrappers of any kind are removed)."""
    for key, block in list(model.layers.items()):
        if isinstance(block, CheckpointWrapper):
            model.layers[key] = block.inner
    return model


def apply_recompute(model: GPT, policy: RecomputePolicy) -> GPT:
    """Apply a recomputation policy in place and return the model. Idempotent.

    ``full``: every branch is wrapped in an enabled :class:`CheckpointWrapper` (existing
    wrappers are re-enabled, never nested). ``none``: wrappers are removed again.
    Parameter names and state_dict keys are the same under either policy.
    """
    if policy not in ("none", "full"):
        raise ValueError(f"recomputation policy must be 'none' or 'full', got {policy!r}")
    for layer_idx, kind, branch in list(iter_branches(model)):
        block, attr = model.layers[str(layer_idx)], BRANCHES[kind]
        wrapped = isinstance(branch, CheckpointWrapper)
        if policy == "full" and wrapped:
            branch.enabled = True
        elif policy == "full":
            setattr(block, attr, CheckpointWrapper(branch))
        elif wrapped:
            setattr(block, attr, branch.inner)
    return model
