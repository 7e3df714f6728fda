"""The two granularities a recompute planner chooses over (``recompute.granularity``),
behind one interface, so the planners (:mod:`.planners`) read the same for both:

* :class:`BranchGranularity` (``branch``): store or recompute each attention and MLP
  branch; a :class:`~.wrapper.CheckpointWrapper` per branch, switched per step; costs in
  bytes and FLOPs (:mod:`.branch_costs`); a plan is one flag per branch.
* :class:`OpGranularity` (``op``): store or recompute each op call's output; the blocks
  (or, compiled, the whole model) wrapped once by :class:`~.op_apply.PlanRegions`; costs in
  bytes and measured time (:mod:`.op_measure`); a plan is an :class:`~.op_plan.OpPlan`.

The interface is :class:`Granularity`: wrap the model, measure the costs when due, make
plans, apply them, report them, fit the learnable gates to the choices, checkpoint.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from raydrat.config.base import ConfigError
from raydrat.config.recompute import GatesConfig
from raydrat.core.techniques.recompute.branch_costs import BranchCost, measure_branch_costs
from raydrat.core.techniques.recompute.gates import RecomputeGates
from raydrat.core.techniques.recompute.knapsack import BudgetBelowMinimum, solve_budget
from raydrat.core.techniques.recompute.op_apply import PlanRegions
from raydrat.core.techniques.recompute.op_costs import OpCosts
from raydrat.core.techniques.recompute.op_measure import measure_op_costs
from raydrat.core.techniques.recompute.op_plan import OpPlan, op_gates, plan_budget, plan_from_stored
from raydrat.core.techniques.recompute.plan_cache import ENV as PLAN_CACHE_ENV
from raydrat.core.techniques.recompute.plan_cache import PlanCache, autocast_dtype, plan_key
from raydrat.core.techniques.recompute.wrapper import apply_recompute, iter_branches

Autocast = Callable[[], AbstractContextManager]
log = logging.getLogger("raydrat")


class Granularity(Protocol):
    """What a planner asks of a granularity. A plan is whatever the granularity makes."""

    name: str
    """``branch`` or ``op`` (``recompute.granularity``)."""
    branches: list[tuple[int, str]]
    """``(layer, "attn" | "mlp")`` per branch of the model."""
    costs: Any
    """The measured costs, ``None`` until measured."""
    replans: bool
    """Whether the gates' plan follows them every step (else the first plan stays)."""
    gate_labels: list[tuple[int, str]] | None
    """Per gate, the branch its figures are reported under (``None``: not one by one)."""

    def wrap(self, model: nn.Module) -> nn.Module:
        """Put the wrappers plans switch on ``model`` (once); returns the module to train."""

    def measure_due(self, step: int, tokens: torch.Tensor | None) -> bool: ...

    def measure(self, step: int, tokens: torch.Tensor | None) -> None:
        """Measure the costs on ``tokens``, a ``(B, T+1)`` micro-batch."""

    def stored(self, plan: Any) -> list[bool]:
        """Per branch, whether ``plan`` stores it (empty where plans are not per branch)."""

    def recall_plan(self, budget_mb: float, tokens: torch.Tensor | None) -> Any:
        """A plan kept from an earlier run for this budget and micro-batch (``None``: none;
        then the costs are measured and :meth:`budget_plan` plans)."""

    def budget_plan(self, budget_mb: float) -> Any:
        """The exact optimum within ``budget_mb``; a budget below the minimum is refused."""

    def from_stored(self, stored: list[bool], budget_bytes: int | None) -> Any:
        """The plan of the gates' decisions, one per gate."""

    def install(self, plan: Any) -> None:
        """Make ``plan`` the one the model runs."""

    def after_step(self) -> None: ...

    def plan_bytes(self, plan: Any, active: list[int] | None) -> int | None:
        """Predicted saved activation bytes in a step running the layers ``active``."""

    def plan_recompute_flops(self, plan: Any, active: list[int] | None) -> int | None: ...

    def stored_fraction(self, plan: Any) -> float: ...

    def new_gates(self, cfg: GatesConfig, n_layer: int, budget_mb: float | None) -> RecomputeGates | None:
        """The gates, where they are known before the costs."""

    def fit_gates(
        self, gates: RecomputeGates | None, optimizer: Any, cfg: GatesConfig, budget_mb: float | None
    ) -> RecomputeGates:
        """Gates fitted to the measured costs and warmed up (the same or new ones)."""

    def gate_mask(self, active: list[int] | None, device: Any = None) -> torch.Tensor | None:
        """1/0 per gate: does it take part in the step (``None``: all)."""

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...

    def save_plan(self, plan: Any) -> dict:
        """What a budget planner checkpoints of its plan."""

    def load_plan(self, state: dict) -> Any: ...


def branch_mask(branches: list[tuple[int, str]], active: list[int] | None, device=None) -> torch.Tensor:
    """1/0 per branch: does its layer run in the planned step (``active``: the layers that
    run, ``None``: all)."""
    keep = None if active is None else set(active)
    return torch.tensor([1.0 if keep is None or layer in keep else 0.0 for layer, _ in branches], device=device)


class MeasuredBranches:
    """Per-branch costs (:func:`~.branch_costs.measure_branch_costs`) measured on a planned
    micro-batch, the first time and then every ``refresh_every`` steps; checkpointed."""

    def __init__(self, autocast: Autocast = contextlib.nullcontext, refresh_every: int | None = None):
        self.autocast = autocast
        self.refresh_every = refresh_every
        self.costs: list[BranchCost] | None = None
        self.outside_bytes = 0
        """Bytes alive after forward with every branch recomputed (embedding, block inputs, logits)."""
        self.measured_at: int | None = None

    def due(self, step: int, tokens: torch.Tensor | None) -> bool:
        if tokens is None:
            return False
        if self.measured_at is None:
            return True
        return self.refresh_every is not None and step - self.measured_at >= self.refresh_every

    def measure(self, model: nn.Module, step: int, tokens: torch.Tensor) -> None:
        """Measure on ``tokens`` (a ``(B, T+1)`` micro-batch) with every branch stored."""
        was_training = model.training
        model.train()
        self.costs, self.outside_bytes = measure_branch_costs(model, tokens[:, :-1], tokens[:, 1:], self.autocast())
        model.train(was_training)
        model.zero_grad(set_to_none=True)
        self.measured_at = step

    def state_dict(self) -> dict:
        costs = None if self.costs is None else [dataclasses.asdict(c) for c in self.costs]
        return {"measured_at": self.measured_at, "costs": costs, "outside_bytes": self.outside_bytes}

    def load_state_dict(self, state: dict) -> None:
        self.measured_at = state["measured_at"]
        self.costs = None if state["costs"] is None else [BranchCost(**c) for c in state["costs"]]
        self.outside_bytes = state["outside_bytes"]


class BranchGranularity:
    """One store/recompute flag per attention and MLP branch (a plan: ``list[bool]``)."""

    name = "branch"
    replans = True
    """The gates decide anew every step."""

    def __init__(self, autocast: Autocast = contextlib.nullcontext, refresh_every: int | None = None):
        self.measured = MeasuredBranches(autocast, refresh_every)
        self.model: nn.Module | None = None
        self.branches: list[tuple[int, str]] = []
        self.wrappers: list[nn.Module] = []

    @property
    def costs(self) -> list[BranchCost] | None:
        return self.measured.costs

    @property
    def gate_labels(self) -> list[tuple[int, str]]:
        """One gate per branch, reported and drawn one by one."""
        return self.branches

    def wrap(self, model: nn.Module) -> nn.Module:
        """A checkpoint wrapper per branch (switched by :meth:`install`)."""
        return self.track(apply_recompute(model, "full"))

    def track(self, model: nn.Module) -> nn.Module:
        """Measure ``model``'s branches as they are (wrapped or not)."""
        self.model = model
        self.branches = [(layer, kind) for layer, kind, _ in iter_branches(model)]
        self.wrappers = [b for *_, b in iter_branches(model)]
        return model

    def measure_due(self, step: int, tokens: torch.Tensor | None) -> bool:
        return self.measured.due(step, tokens)

    def measure(self, step: int, tokens: torch.Tensor) -> None:
        self.measured.measure(self.model, step, tokens)

    def stored(self, plan: list[bool] | None) -> list[bool]:
        return [True] * len(self.branches) if plan is None else plan

    def recall_plan(self, budget_mb: float, tokens: torch.Tensor | None) -> None:
        """Branch plans are not kept (they are planned from FLOPs, the same every run)."""
        return None

    def budget_plan(self, budget_mb: float) -> list[bool]:
        """The knapsack optimum over the measured branches within ``budget_mb``."""
        if self.costs is None:
            raise RuntimeError("recompute.mode=budget: pass a micro-batch to the first plan() to measure costs")
        room = int(budget_mb * 2**20) - self.measured.outside_bytes
        if room < 0:
            raise ValueError(
                f"recompute.budget_mb={budget_mb:g} is below the measured minimum "
                f"{self.measured.outside_bytes / 2**20:.3f} MB (every branch recomputed): raise it"
            )
        return solve_budget(self.costs, room).stored

    def from_stored(self, stored: list[bool], budget_bytes: int | None) -> list[bool]:
        return stored

    def install(self, plan: list[bool]) -> None:
        for wrapper, store in zip(self.wrappers, plan):
            wrapper.enabled = not store

    def after_step(self) -> None:
        pass

    def plan_bytes(self, plan: list[bool], active: list[int] | None) -> int | None:
        """Saved activation bytes of ``plan`` in a step running the layers ``active``."""
        if self.costs is None:
            return None
        mask = branch_mask(self.branches, active).tolist()
        return self.measured.outside_bytes + sum(
            c.stored_bytes if a and s else 0 if a else -c.input_bytes for c, s, a in zip(self.costs, plan, mask)
        )

    def plan_recompute_flops(self, plan: list[bool], active: list[int] | None) -> int | None:
        if self.costs is None:
            return None
        mask = branch_mask(self.branches, active).tolist()
        return sum(int(a) * (0 if s else c.recompute_flops) for c, s, a in zip(self.costs, plan, mask))

    def stored_fraction(self, plan: list[bool]) -> float:
        return sum(plan) / max(1, len(plan))

    def new_gates(self, cfg: GatesConfig, n_layer: int, budget_mb: float | None) -> RecomputeGates:
        """The gates, one per branch (known before any measurement)."""
        return RecomputeGates(self.branches, cfg, n_layer, budget_mb)

    def fit_gates(
        self, gates: RecomputeGates, optimizer: torch.optim.Optimizer, cfg: GatesConfig, budget_mb: float | None
    ) -> RecomputeGates:
        """The same gates, given the measured costs and warmed up with their optimizer."""
        gates.set_measured(
            [c.stored_bytes for c in self.costs], [c.recompute_flops for c in self.costs], self.measured.outside_bytes
        )
        gates.pretrain(optimizer, cfg.warmup_steps)
        return gates

    def gate_mask(self, active: list[int] | None, device=None) -> torch.Tensor:
        return branch_mask(self.branches, active, device)

    def state_dict(self) -> dict:
        return self.measured.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.measured.load_state_dict(state)

    def save_plan(self, plan: list[bool] | None) -> dict:
        return {"budget_stored": plan}

    def load_plan(self, state: dict) -> list[bool] | None:
        return state["budget_stored"]


class OpGranularity:
    """Store or recompute each op call's output (a plan: :class:`~.op_plan.OpPlan`),
    planned for the compiled graph with ``compiled`` (``compile.mode`` not ``off``).

    ``costs``: op costs measured beforehand (e.g. by a benchmark, away from the allocator
    profiler, which slows every op down), used instead of measuring on the first step.
    Costs are not checkpointed: a resumed run measures them again (or recalls its plan).

    ``plans``: where budget plans are kept between runs (:mod:`.plan_cache`); a plan found
    there for this model, micro-batch and budget is used before any costs, none are measured."""

    name = "op"
    gate_labels = None
    """Op-level gates are too many to report one by one."""

    def __init__(
        self,
        compiled: bool = False,
        autocast: Autocast = contextlib.nullcontext,
        costs: OpCosts | None = None,
        plans: PlanCache | None = None,
    ):
        self.compiled = compiled
        self.autocast = autocast
        self.costs = costs
        self.plans = plans
        self.regions: PlanRegions | None = None
        self.branches: list[tuple[int, str]] = []
        self.recalled: Path | None = None
        """The plan cache entry the plan in force came from (``None``: planned here)."""
        self._batch: torch.Tensor | None = None
        self._verified = False

    @property
    def replans(self) -> bool:
        """Eagerly the gates' plan follows them every step; a compiled plan stays (a new one
        would recompile)."""
        return not self.compiled

    def wrap(self, model: nn.Module) -> nn.Module:
        apply_recompute(model, "none")
        self.branches = [(layer, kind) for layer, kind, _ in iter_branches(model)]
        self.regions = PlanRegions(model, self.compiled)
        return self.regions.module

    def measure_due(self, step: int, tokens: torch.Tensor | None) -> bool:
        return self.costs is None and self.recalled is None

    def measure(self, step: int, tokens: torch.Tensor | None) -> None:
        if tokens is None:
            raise RuntimeError("recompute.granularity=op: pass a micro-batch to the first plan() to measure costs")
        self._batch = tokens
        self.costs = measure_op_costs(
            self.regions.model, tokens[:, :-1], tokens[:, 1:], self.autocast(), sac_overheads=not self.compiled
        )

    def _plan_key(self, budget_mb: float) -> dict:
        idx = self._batch[:, :-1]
        return plan_key(
            self.regions.model.cfg.model_dump(mode="json"),
            tuple(idx.shape),
            int(budget_mb * 2**20),
            self.compiled,
            autocast_dtype(self.autocast(), idx.device),
            idx.device,
        )

    def recall_plan(self, budget_mb: float, tokens: torch.Tensor | None) -> OpPlan | None:
        """The plan :attr:`plans` keeps for this model, micro-batch and budget, said on the
        console when there is one."""
        if tokens is not None:
            self._batch = tokens
        if self.plans is None or self._batch is None:
            return None
        key = self._plan_key(budget_mb)
        plan = self.plans.load(key)
        if plan is not None:
            self.recalled = self.plans.path(key)
            log.info(
                f"recompute: using the cached op-level plan {self.recalled} ({plan.describe()}; "
                f"{PLAN_CACHE_ENV}=off or recompute.plan_cache=false plans anew)"
            )
        return plan

    def stored(self, plan: OpPlan | None) -> list[bool]:
        return []

    def _below(self, budget_mb: float, err: BudgetBelowMinimum) -> ConfigError:
        kind = "compiled" if self.compiled else "eager"
        return ConfigError(
            f"recompute.budget_mb={budget_mb:g} is below the minimum achievable "
            f"{err.minimum_bytes / 2**20:.3f} MB for a {kind} op-level plan on this model and micro-batch "
            f"(every block recomputed, keeping its input): raise recompute.budget_mb to at least that, "
            "or lower train.batch_size or model.seq_len"
        )

    def budget_plan(self, budget_mb: float) -> OpPlan:
        """The knapsack optimum over the measured costs, kept in :attr:`plans`."""
        try:
            plan = plan_budget(self.costs, int(budget_mb * 2**20), compiled=self.compiled)
        except BudgetBelowMinimum as err:
            raise self._below(budget_mb, err) from None
        self.recalled = None
        if self.plans is not None and self._batch is not None:
            self.plans.store(self._plan_key(budget_mb), plan)
        return plan

    def from_stored(self, stored: list[bool], budget_bytes: int | None) -> OpPlan:
        return plan_from_stored(self.costs, stored, self.compiled, budget_bytes)

    def install(self, plan: OpPlan) -> None:
        """Apply ``plan`` unless it stores what the applied one stores."""
        current = self.regions.plan
        if current is None or plan.saved != current.saved:
            self.regions.apply(plan)

    def after_step(self) -> None:
        """After the first step: every stored op call occurred (compiled: while tracing)."""
        if self.regions.plan is not None and not self._verified:
            self.regions.verify()
            self._verified = True

    def plan_bytes(self, plan: OpPlan, active: list[int] | None) -> int | None:
        return plan.predicted_bytes

    def plan_recompute_flops(self, plan: OpPlan, active: list[int] | None) -> int | None:
        return None

    def stored_fraction(self, plan: OpPlan) -> float:
        return plan.stored_fraction

    def new_gates(self, cfg: GatesConfig, n_layer: int, budget_mb: float | None) -> None:
        """None yet: the gates are one per op-level choice, known once the costs are."""
        return None

    def fit_gates(
        self, gates: RecomputeGates | None, optimizer: torch.optim.Optimizer | None, cfg: GatesConfig, budget_mb: float
    ) -> RecomputeGates:
        """New gates over the measured op-level choices, warmed up with an Adam of their own."""
        try:
            return op_gates(self.costs, int(budget_mb * 2**20), self.compiled, cfg)
        except BudgetBelowMinimum as err:
            raise self._below(budget_mb, err) from None

    def gate_mask(self, active: list[int] | None, device=None) -> None:
        return None

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def save_plan(self, plan: OpPlan | None) -> dict:
        return {}

    def load_plan(self, state: dict) -> None:
        return None
