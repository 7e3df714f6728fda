"""Applying op-level plans (:mod:`.op_plan`) to a GPT from outside, through PyTorch's
selective activation checkpointing (SAC: ``create_selective_checkpoint_contexts`` with a
policy that answers ``MUST_SAVE`` for the stored op calls and ``PREFER_RECOMPUTE`` for the
rest).

:class:`PlanRegions` wraps the model once: every block in a
:class:`~raydrat.core.techniques.recompute.wrapper.CheckpointWrapper`, and for compiled plans
the whole model in a :class:`ModelRegion`. Applying a plan only sets the wrappers' switches
and policies, so plans change without touching the model's modules again; parameter names
and ``state_dict`` keys never change. Compile the module to train
(:attr:`PlanRegions.module`) after wrapping; a compiled plan may be applied after compiling
(the compiler traces it at the first call).

A plan meets exactly the op calls it was measured on; a plan measured for another model or
batch shape meets fewer, and is refused (:class:`Hits`: after each eager region call, and by
:meth:`PlanRegions.verify` after a compiled model's first step).
"""

from __future__ import annotations

import functools
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_flatten
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

from raydrat.core.model.transformer import GPT
from raydrat.core.techniques.recompute.op_costs import POST, PRE, Key
from raydrat.core.techniques.recompute.op_plan import OpPlan
from raydrat.core.techniques.recompute.wrapper import (
    CheckpointWrapper,
    branch_wrappers_enabled,
    unwrap_blocks,
    wrap_blocks,
)

Locate = Callable[[str, tuple, int], Key]


class Hits:
    """The stored keys of one region and those its policy met."""

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


def _policy(hits: Hits, locate: Locate):
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


def block_contexts(layer: int, hits: Hits):
    """SAC contexts for block ``layer`` as a region of its own."""
    return create_selective_checkpoint_contexts(_policy(hits, lambda op, shape, k: (layer, op, shape, k)))


def model_contexts(hits: Hits, active: tuple[int, ...]):
    """SAC contexts for the whole forward as one region, running the blocks ``active``:
    an op's call index over the forward is mapped to its region by ``hits.counts``."""

    def locate(op: str, shape: tuple, k: int) -> Key:
        pre, per, _post = hits.counts.get((op, shape), (0, 0, 0))
        if k < pre:
            return (PRE, op, shape, k)
        k -= pre
        if k < per * len(active):
            return (active[k // per], op, shape, k % per)
        return (POST, op, shape, k - per * len(active))

    return create_selective_checkpoint_contexts(_policy(hits, locate))


class ModelRegion(CheckpointWrapper):
    """A GPT whose training forward runs as one SAC region (compiled op-level plans),
    while ``hits`` holds a plan; otherwise the GPT's own forward. Transparent to names and
    attributes like every :class:`CheckpointWrapper`."""

    def forward(self, idx: torch.Tensor, targets=None, active_slots=None, **kwargs: Any):
        if self.hits is None or not self.active():
            return self.inner.forward(idx, targets, active_slots, **kwargs)
        active = tuple(self.inner._slot_order(active_slots))
        # only objects dynamo can hold by identity in the partial (a dict argument breaks the
        # graph under dynamic shapes, and the whole region would then run eagerly)
        return self.region(functools.partial(model_contexts, self.hits, active), idx, targets, active_slots)


class PlanRegions:
    """Where op-level plans take effect on one GPT: a :class:`CheckpointWrapper` per block
    (off until a plan switches it on) and, with ``compiled``, a :class:`ModelRegion` around
    the model. The model's branches must not be wrapped for per-branch recomputation."""

    def __init__(self, model: GPT, compiled: bool = False):
        if branch_wrappers_enabled(model):
            raise ValueError(
                "the model's branches are wrapped for per-branch recomputation (apply_recompute): "
                "call apply_recompute(model, 'none') before applying an op-level plan"
            )
        self.model = model
        self.blocks = wrap_blocks(model, enabled=False)
        self.whole = ModelRegion(model, enabled=False) if compiled else None
        self.plan: OpPlan | None = None

    @property
    def module(self) -> nn.Module:
        """The module to train (and compile): the model region, or the model."""
        return self.model if self.whole is None else self.whole

    def apply(self, plan: OpPlan) -> None:
        """Switch the regions to ``plan`` (replacing the one applied)."""
        if plan.mode not in ("none", "full", "budget"):
            raise ValueError(f"unknown plan mode {plan.mode!r}: use none, full or budget")
        if plan.mode == "budget" and plan.compiled and self.whole is None:
            raise ValueError("a compiled plan runs in a model region: build PlanRegions(model, compiled=True)")
        self._clear()
        if plan.mode == "full":
            for block in self.blocks:
                block.enabled = True
        elif plan.mode == "budget" and plan.compiled:
            self._select(self.whole, None, Hits(plan.saved, plan.counts))
        elif plan.mode == "budget":
            self._apply_eager(plan)
        self.plan = plan

    def _apply_eager(self, plan: OpPlan) -> None:
        for layer, block in enumerate(self.blocks):
            if layer in plan.plain_blocks:
                continue
            block.enabled = True
            if layer not in plan.full_blocks:
                hits = Hits(frozenset(k for k in plan.saved if k[0] == layer))
                self._select(block, functools.partial(block_contexts, layer, hits), hits)

    @staticmethod
    def _select(wrapper: CheckpointWrapper, context_fn, hits: Hits) -> None:
        wrapper.enabled, wrapper.context_fn, wrapper.hits = True, context_fn, hits

    def _clear(self) -> None:
        for wrapper in self._wrappers():
            wrapper.enabled, wrapper.context_fn, wrapper.hits = False, None, None

    def _wrappers(self) -> list[CheckpointWrapper]:
        return self.blocks + ([] if self.whole is None else [self.whole])

    def verify(self) -> None:
        """Raise if a stored op of the applied plan did not occur in the forwards traced or
        run since it was applied (call after a compiled model's first training step)."""
        for wrapper in self._wrappers():
            if wrapper.hits is not None:
                wrapper.hits.check()

    def remove(self) -> GPT:
        """Unwrap the blocks; returns the bare model (the model region is dropped)."""
        self._clear()
        self.plan = None
        return unwrap_blocks(self.model)
