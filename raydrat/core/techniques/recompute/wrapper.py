"""The checkpoint wrapper, applied to a GPT's branches, blocks or the whole model from
outside (torchtitan style), and the helpers that find and toggle the wrappers.

A :class:`CheckpointWrapper` is applied once and switched per step: ``enabled`` turns its
region on or off, ``context_fn`` makes the region selective (PyTorch's selective activation
checkpointing). The branch planners toggle one wrapper per attention / MLP branch
(:func:`apply_recompute`, :func:`iter_branches`); ``recompute.mode: full`` and op-level plans
use one per block (:func:`wrap_blocks`); compiled op-level plans one around the whole model
(:class:`~raydrat.core.techniques.recompute.op_apply.ModelRegion`). :func:`lifted` turns every
wrapper of a model off for a measurement that needs the plain forward.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any, Literal

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from raydrat.core.model.transformer import GPT

RecomputePolicy = Literal["none", "full"]
BRANCHES = {"attn": "attn_branch", "mlp": "mlp_branch"}
"""Branch kind → attribute of :class:`~raydrat.core.model.transformer.Block`."""
SHARED = (
    "_parameters",
    "_buffers",
    "_non_persistent_buffers_set",
    "_modules",
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
)
"""What a wrapper adopts from the module it wraps (shared, not copied)."""


class CheckpointWrapper(nn.Module):
    """Runs ``inner``'s forward as one non-reentrant checkpoint region while ``enabled``
    (and the module is training with grad enabled); otherwise runs it directly.

    ``context_fn``: a selective-checkpointing context (``torch.utils.checkpoint``'s argument
    of that name): the region then stores the op outputs its policy marks and recomputes
    the rest. ``hits``: the policy's record of the stored op calls it met, cleared before and
    checked after each eager region call (an object with ``seen`` and ``check()``).

    The wrapper stands in for ``inner``: it adopts ``inner``'s parameter, buffer and
    submodule dicts and its forward hooks (shared, not copied) instead of registering
    ``inner`` as a child, and reads any other attribute through from ``inner``. So
    ``named_parameters()`` and ``state_dict()`` keys are exactly those of the unwrapped
    model (checkpoints load across policies without any key rewriting), and forward hooks
    run once per call, outside the region, whichever of the two they were registered on.
    ``train()``/``eval()`` are forwarded to ``inner``.
    """

    def __init__(self, inner: nn.Module, enabled: bool = True):
        super().__init__()
        if isinstance(inner, CheckpointWrapper):
            raise ValueError("inner module is already a CheckpointWrapper")
        for attr in SHARED:
            object.__setattr__(self, attr, getattr(inner, attr))
        object.__setattr__(self, "inner", inner)  # not a submodule: no "inner." key prefix
        self.enabled = enabled
        self.context_fn: Callable | None = None
        self.hits: Any = None
        self.train(inner.training)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            inner = self.__dict__.get("inner")
            if inner is None:
                raise
            return getattr(inner, name)

    def train(self, mode: bool = True) -> CheckpointWrapper:
        self.inner.train(mode)
        return super().train(mode)

    def active(self) -> bool:
        """Whether a call now runs as a checkpoint region."""
        return self.enabled and self.training and torch.is_grad_enabled()

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """``args``: what the wrapped module takes (a block's KV cache beside its input)."""
        if not self.active():
            return self.inner.forward(*args, **kwargs)
        return self.region(self.context_fn, *args, **kwargs)

    def region(self, context_fn: Callable | None, *args: Any, **kwargs: Any) -> Any:
        """``inner``'s forward as one checkpoint region (selective with ``context_fn``)."""
        extra = {} if context_fn is None else {"context_fn": context_fn}
        check = self.hits is not None and context_fn is not None and not torch.compiler.is_compiling()
        if check:
            self.hits.seen.clear()
        out = checkpoint(self.inner.forward, *args, use_reentrant=False, preserve_rng_state=True, **extra, **kwargs)
        if check:
            self.hits.check()
        return out

    def extra_repr(self) -> str:
        return f"enabled={self.enabled}" + (", selective" if self.context_fn is not None else "")


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
    """Undo :func:`wrap_blocks`."""
    for key, block in list(model.layers.items()):
        if isinstance(block, CheckpointWrapper):
            model.layers[key] = block.inner
    return model


def apply_recompute(model: GPT, policy: RecomputePolicy) -> GPT:
    """Apply a per-branch recomputation policy in place and return the model. Idempotent.

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


def branch_wrappers_enabled(model: GPT) -> bool:
    """Whether any branch runs as its own checkpoint region."""
    return any(isinstance(b, CheckpointWrapper) and b.enabled for *_, b in iter_branches(model))


@contextlib.contextmanager
def lifted(model: nn.Module) -> Iterator[None]:
    """Every :class:`CheckpointWrapper` inside ``model`` switched off (the plain forward,
    what cost measurements run), their switches restored afterwards."""
    wrappers = [m for m in model.modules() if isinstance(m, CheckpointWrapper)]
    flags = [w.enabled for w in wrappers]
    for w in wrappers:
        w.enabled = False
    try:
        yield
    finally:
        for w, flag in zip(wrappers, flags):
            w.enabled = flag
