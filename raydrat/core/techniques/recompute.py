"""Recomputation planners (``recompute.mode``): which activations each step keeps for
backward and which it recomputes, decided from outside the model.

Every planner wraps the model's branches once (:meth:`RecomputePlanner.apply`), then sets
the wrappers' flags before each step (:meth:`RecomputePlanner.plan`):

* :class:`NoRecompute` (``none``): no wrappers, everything stored.
* :class:`FullRecompute` (``full``): every attention and MLP branch recomputed.
* :class:`BudgetRecompute` (``budget``): the exact optimum (knapsack over measured
  per-branch bytes and recompute FLOPs) that fits ``recompute.budget_mb``.
* :class:`GatedRecompute` (``gated``): learnable gates decide each step; after the
  optimizer step they take their own update from the resource loss (:meth:`after_step`),
  which depends on nothing but the gates and the measured costs.

Costs are measured on the first planned micro-batch (and re-measured every
``gates.refresh_every`` steps for the gates). Use :func:`build_recompute` to get the planner
a :class:`~raydrat.config.recompute.RecomputeConfig` asks for.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Callable, ContextManager

import torch
from torch import nn

from raydrat.config.recompute import RecomputeConfig
from raydrat.core import metrics as M
from raydrat.core.memory.measure import BranchCost, measure_branch_costs
from raydrat.core.techniques.base import Technique
from raydrat.core.techniques.gates import RecomputeGates
from raydrat.core.techniques.knapsack import solve_budget
from raydrat.core.techniques.wrapper import CheckpointWrapper, apply_recompute, iter_branches

Autocast = Callable[[], ContextManager]


class RecomputePlanner(Technique):
    """Base: store everything, measure nothing."""

    name = "recompute"
    mode = "none"

    def __init__(self, n_layer: int, autocast: Autocast = contextlib.nullcontext):
        self.n_layer = n_layer
        self.autocast = autocast
        self.model: nn.Module | None = None
        self.branches: list[tuple[int, str]] = []
        self.wrappers: list[nn.Module] = []
        self.stored: list[bool] = []
        self.active: list[int] | None = None

    def apply(self, model: nn.Module) -> nn.Module:
        apply_recompute(model, "none" if self.mode == "none" else "full")
        self.model = model
        self.branches = [(layer, kind) for layer, kind, _ in iter_branches(model)]
        self.wrappers = [b for *_, b in iter_branches(model)]
        self.stored = [True] * len(self.branches)
        return model

    def plan(self, step: int, tokens: torch.Tensor | None = None, active_slots: list[int] | None = None) -> list[bool]:
        """Set the wrappers for ``step`` (``tokens``: a ``(B, T+1)`` micro-batch, used to
        measure costs when they are due; ``active_slots``: the layers that run). Returns
        which branches store their activations."""
        self.active = active_slots
        return self.stored

    def after_step(self) -> None:
        """Called after the optimizer step."""

    def plan_bytes(self) -> int | None:
        """Saved activation bytes of the current plan, from measured costs (``None``: not measured)."""
        return None

    def active_mask(self, device: torch.device | None = None) -> torch.Tensor:
        """1/0 per branch: does its layer run in the planned step."""
        active = set(range(self.n_layer)) if self.active is None else set(self.active)
        return torch.tensor([1.0 if layer in active else 0.0 for layer, _ in self.branches], device=device)


class NoRecompute(RecomputePlanner):
    mode = "none"


class MeasuredPlanner(RecomputePlanner):
    """A planner that measures per-branch stored bytes and recompute FLOPs on a real
    micro-batch and chooses, each step, which wrappers run."""

    refresh_every: int | None = None

    def __init__(self, n_layer: int, autocast: Autocast = contextlib.nullcontext):
        super().__init__(n_layer, autocast)
        self.costs: list[BranchCost] | None = None
        self.outside_bytes = 0
        self.measured_at: int | None = None

    def measure(self, tokens: torch.Tensor) -> None:
        """Measure per-branch costs on ``tokens`` with every branch stored."""
        model = self.model
        idx, targets = tokens[:, :-1], tokens[:, 1:]
        was_training = model.training
        model.train()
        self.costs, self.outside_bytes = measure_branch_costs(model, idx, targets, self.autocast())
        model.train(was_training)
        model.zero_grad(set_to_none=True)
        self.on_measured()

    def on_measured(self) -> None:
        """Hook: the costs were just (re)measured."""

    def decide(self, step: int) -> list[bool]:
        raise NotImplementedError

    def plan(self, step: int, tokens: torch.Tensor | None = None, active_slots: list[int] | None = None) -> list[bool]:
        self.active = active_slots
        if tokens is not None and (
            self.measured_at is None
            or (self.refresh_every is not None and step - self.measured_at >= self.refresh_every)
        ):
            self.measure(tokens)
            self.measured_at = step
        self.stored = self.decide(step)
        for wrapper, store in zip(self.wrappers, self.stored):
            if isinstance(wrapper, CheckpointWrapper):
                wrapper.enabled = not store
        return self.stored

    def plan_bytes(self) -> int | None:
        if self.costs is None:
            return None
        active = self.active_mask().tolist()
        return self.outside_bytes + sum(
            c.stored_bytes if a and s else 0 if a else -c.input_bytes
            for c, s, a in zip(self.costs, self.stored, active)
        )

    def plan_recompute_flops(self) -> int | None:
        if self.costs is None:
            return None
        active = self.active_mask().tolist()
        return sum(int(a) * (0 if s else c.recompute_flops) for c, s, a in zip(self.costs, self.stored, active))

    def metrics(self) -> dict[str, float]:
        if self.costs is None:
            return {}
        return {M.ACTIVATION_BYTES: float(self.plan_bytes()), M.RECOMPUTE_FLOPS: float(self.plan_recompute_flops())}

    def state_dict(self) -> dict:
        return {
            "measured_at": self.measured_at,
            "costs": None if self.costs is None else [dataclasses.asdict(c) for c in self.costs],
            "outside_bytes": self.outside_bytes,
        }

    def load_state_dict(self, state: dict) -> None:
        self.measured_at = state["measured_at"]
        self.costs = None if state["costs"] is None else [BranchCost(**c) for c in state["costs"]]
        self.outside_bytes = state["outside_bytes"]


class FullRecompute(MeasuredPlanner):
    """Every branch recomputed (costs measured once, for the metrics)."""

    mode = "full"

    def decide(self, step: int) -> list[bool]:
        return [False] * len(self.branches)


class BudgetRecompute(MeasuredPlanner):
    """The exact optimum under ``budget_mb`` of saved activations (embedding and logits
    included): the knapsack over the measured per-branch costs, solved once."""

    mode = "budget"

    def __init__(self, n_layer: int, budget_mb: float, autocast: Autocast = contextlib.nullcontext):
        super().__init__(n_layer, autocast)
        self.budget_mb = budget_mb
        self.budget_stored: list[bool] | None = None

    def on_measured(self) -> None:
        room = int(self.budget_mb * 2**20) - self.outside_bytes
        if room < 0:
            raise ValueError(
                f"recompute.budget_mb={self.budget_mb:g} is below the measured minimum "
                f"{self.outside_bytes / 2**20:.3f} MB (every branch recomputed): raise it"
            )
        self.budget_stored = solve_budget(self.costs, room).stored

    def decide(self, step: int) -> list[bool]:
        if self.budget_stored is None:
            raise RuntimeError("recompute.mode=budget: pass a micro-batch to the first plan() to measure costs")
        return list(self.budget_stored)

    def metrics(self) -> dict[str, float]:
        out = super().metrics()
        if out:
            out[M.STORED_FRACTION] = sum(self.stored) / max(1, len(self.stored))
        return out

    def state_dict(self) -> dict:
        return {**super().state_dict(), "budget_stored": self.budget_stored}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.budget_stored = state["budget_stored"]


class GatedRecompute(MeasuredPlanner):
    """Learnable gates decide each step; they learn from the resource loss only (the task
    loss does not depend on them: recomputation is exact), through their own Adam."""

    mode = "gated"

    def __init__(self, n_layer: int, cfg: RecomputeConfig, device: torch.device,
                 autocast: Autocast = contextlib.nullcontext):
        super().__init__(n_layer, autocast)
        self.cfg = cfg.gates
        self.budget_mb = cfg.budget_mb
        self.refresh_every = cfg.gates.refresh_every
        self.device = device
        self.gates: RecomputeGates | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.store_ste: torch.Tensor | None = None
        self.last_resource_loss: float | None = None
        self.history: list[tuple[int, list[float]]] = []
        """``(step, gate probabilities)`` after each update (for the heat-map)."""
        self._step = 0

    def apply(self, model: nn.Module) -> nn.Module:
        model = super().apply(model)
        self.gates = RecomputeGates(self.branches, self.cfg, self.n_layer, self.budget_mb).to(self.device)
        self.optimizer = torch.optim.Adam(self.gates.parameters(), lr=self.cfg.lr)
        return model

    def on_measured(self) -> None:
        self.gates.set_measured(
            [c.stored_bytes for c in self.costs], [c.recompute_flops for c in self.costs], self.outside_bytes
        )
        self.gates.pretrain(self.optimizer, self.cfg.warmup_steps)

    def decide(self, step: int) -> list[bool]:
        self._step = step
        hard, self.store_ste = self.gates.decide(self.active_mask(self.device))
        return hard.tolist()

    def after_step(self) -> None:
        """One gate update: the resource loss of this step's decisions, backward into the
        gates alone, their Adam step, and (budget form) the multiplier's dual ascent."""
        if self.store_ste is None:
            return
        mask = self.active_mask(self.device)
        loss = self.gates.resource_loss(self.store_ste, mask)
        self.last_resource_loss = float(loss.detach())
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.gates.update_multiplier(mask)
        self.store_ste = None
        self.history.append((self._step + 1, self.gates.probs().detach().cpu().tolist()))

    def metrics(self) -> dict[str, float]:
        out = super().metrics()
        out[M.STORED_FRACTION] = sum(self.stored) / max(1, len(self.stored))
        for (layer, kind), p in zip(self.branches, self.gates.probs().detach().cpu().tolist()):
            out[M.gate_prob_name(layer, kind)] = p
        if self.last_resource_loss is not None:
            out[M.RESOURCE_LOSS] = self.last_resource_loss
        if self.gates.budgeted:
            out[M.GATE_MULTIPLIER] = float(self.gates.multiplier)
        return out

    def state_dict(self) -> dict:
        """Gate logits, multiplier and costs, and the gates' optimizer state: a fresh
        planner for the same config continues exactly (no re-measurement, no warm-up)."""
        return {**super().state_dict(), "gates": self.gates.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.gates.load_state_dict(state["gates"])
        self.optimizer.load_state_dict(state["optimizer"])


def build_recompute(cfg: RecomputeConfig, n_layer: int, device: torch.device,
                    autocast: Autocast = contextlib.nullcontext) -> RecomputePlanner:
    """The planner ``cfg.mode`` names. ``autocast`` wraps the cost measurement's forward
    (the run's precision), so measured bytes are those training will keep."""
    if cfg.mode == "none":
        return NoRecompute(n_layer, autocast)
    if cfg.mode == "full":
        return FullRecompute(n_layer, autocast)
    if cfg.mode == "budget":
        return BudgetRecompute(n_layer, cfg.budget_mb, autocast)
    return GatedRecompute(n_layer, cfg, device, autocast)
