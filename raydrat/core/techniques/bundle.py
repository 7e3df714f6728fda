"""The techniques of one run, built from their config sections, and the one function that
applies them to a model in order (like torchtitan's ``parallelize_*``)::

    techniques = build_techniques(cfg, runtime.precision, device, world_size)
    model = apply_techniques(model, techniques)   # recompute, then compile, then sync

:class:`Techniques` only holds them: the training step calls each one's own hooks
(:func:`raydrat.core.step.train_step`), and :func:`raydrat.core.fit.fit` plans and records.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from raydrat.config.run import RaydratConfig
from raydrat.config.slots import SlotsConfig
from raydrat.config.sync import SyncConfig
from raydrat.core.techniques.base import StepPlan, Technique
from raydrat.core.techniques.compile import Compile
from raydrat.core.techniques.precision import Precision
from raydrat.core.techniques.recompute.planners import NoRecompute, RecomputePlanner, build_recompute
from raydrat.core.techniques.slots import SlotSchedule
from raydrat.core.techniques.sync.build import build_strategy
from raydrat.core.techniques.sync.strategy import SyncStrategy


@dataclass
class Techniques:
    """One object per technique; each is applied from outside and keeps its own state."""

    recompute: RecomputePlanner
    slots: SlotSchedule
    precision: Precision
    compile: Compile = field(default_factory=Compile)
    sync: SyncStrategy = field(default_factory=lambda: SyncStrategy(SyncConfig(), 1))

    @classmethod
    def plain(cls, n_layer: int, device: torch.device | str = "cpu") -> Techniques:
        """fp32, every layer, nothing recomputed, one worker."""
        device = torch.device(device)
        return cls(NoRecompute(n_layer), SlotSchedule(SlotsConfig(), n_layer, 1), Precision("fp32", device))

    def before_step(self, step: int, tokens: torch.Tensor | None = None) -> None:
        """Plan ``step``: the layers that run, then which of their activations are stored
        (``tokens``, a ``(B, T+1)`` micro-batch, lets the recompute planner measure costs)."""
        self.recompute.plan(step, tokens, self.slots.plan(step))

    def after_step(self, step: int, loss: torch.Tensor | float) -> str | None:
        """After the optimizer step: the gates' own update, the slots' feedback (adaptive),
        the precision fallback. Returns a message when the precision switched."""
        self.recompute.after_step()
        self.slots.observe(loss, self.recompute.plan_bytes())
        return self.precision.after_step(step)

    def step_plan(self) -> StepPlan:
        """The planned step: its active layers and, per branch of those, whether it stores."""
        active = tuple(range(self.recompute.n_layer)) if self.slots.active is None else tuple(self.slots.active)
        keep = set(active)
        if self.recompute.granularity == "op":  # no per-branch flags: the config's plan
            return StepPlan(active, None)
        stored = tuple(
            bool(s) for (layer, _), s in zip(self.recompute.branches, self.recompute.stored) if layer in keep
        )
        return StepPlan(active, stored)

    def all(self) -> list[Technique]:
        return [self.recompute, self.slots, self.precision, self.compile, self.sync]

    def metrics(self) -> dict[str, float]:
        """Every technique's figures for the step just taken."""
        out: dict[str, float] = {}
        for t in self.all():
            out.update(t.metrics())
        return out

    def state_dict(self) -> dict:
        return {t.name: t.state_dict() for t in self.all() if t.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        for t in self.all():
            if t.name in state:
                t.load_state_dict(state[t.name])


def build_techniques(cfg: RaydratConfig, precision: str, device: torch.device, world_size: int = 1) -> Techniques:
    """Every technique ``cfg`` switches on, each built from its own section only. ``precision``
    is the resolved mode (:attr:`raydrat.core.runtime.Runtime.precision`).

    This is the one place that reads the run config for the techniques; what one technique
    needs of another is wired here and nowhere else: the recompute planner measures under
    the precision's autocast and plans for the compiled graph when ``compile`` is on; DDP
    looks for unused parameters when ``slots`` skips layers; the slot schedule and the
    planners take the model's depth, the run's length and seed."""
    n_layer, tc = cfg.model.n_layer, cfg.train
    prec = Precision.from_config(cfg.precision, precision, device)
    return Techniques(
        recompute=build_recompute(cfg.recompute, n_layer, device, prec.autocast, compiled=cfg.compile.enabled),
        slots=SlotSchedule(cfg.slots, n_layer, tc.steps, seed=tc.seed),
        precision=prec,
        compile=Compile(cfg.compile),
        sync=build_strategy(cfg.sync, world_size, skips_layers=cfg.slots.mode != "all"),
    )


def apply_techniques(model: nn.Module, techniques: Techniques) -> nn.Module:
    """Attach the techniques in their one order: recompute, then compile, then sync (the
    DDP wrapper, local-update averaging, or FSDP's ``fully_shard`` per block). Returns the
    model to train."""
    model = techniques.recompute.apply(model)
    model = techniques.compile.apply(model)
    return techniques.sync.apply(model)


__all__ = ["Techniques", "apply_techniques", "build_techniques"]
