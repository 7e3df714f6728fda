"""Recomputation planners (``recompute.mode``): which activations each step keeps for
backward and which it recomputes, decided from outside the model.

Every planner wraps the model's branches once (:meth:`RecomputePlanner.apply`), then sets
the wrappers' flags before each step (:meth:`RecomputePlanner.plan`):

* :class:`NoRecompute` (``none``): no wrappers, everything stored.
* :class:`FullRecompute` (``full``): every transformer block one checkpoint region (it
  keeps only the block's input, like ``torch.utils.checkpoint`` per block).
* :class:`BudgetRecompute` (``budget``): the exact optimum (knapsack over measured
  per-branch bytes and recompute FLOPs) that fits ``recompute.budget_mb``.
* :class:`GatedRecompute` (``gated``): learnable gates decide each step; after the
  optimizer step they take their own update from the resource loss (:meth:`after_step`),
  which depends on nothing but the gates and the measured costs.
* :class:`OpRecompute` (``budget`` or ``gated`` with ``recompute.granularity: op``): the
  same two planners over op-level choices (:mod:`raydrat.core.techniques.recompute.selective`: a
  store/recompute decision per op call through PyTorch's selective activation
  checkpointing, costs in measured op time and saved-tensor bytes), planned for the
  compiled graph when ``compile.mode`` is not ``off``.

Costs are measured on the first planned micro-batch (and re-measured every
``gates.refresh_every`` steps for the gates). Use :func:`build_recompute` to get the planner
a :class:`~raydrat.config.recompute.RecomputeConfig` asks for.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable
from contextlib import AbstractContextManager

import torch
from torch import nn

from raydrat.config.base import ConfigError
from raydrat.config.recompute import RecomputeConfig
from raydrat.core import metrics as M
from raydrat.core.techniques.base import Technique
from raydrat.core.techniques.recompute import selective as S
from raydrat.core.techniques.recompute.gates import RecomputeGates
from raydrat.core.techniques.recompute.knapsack import BudgetBelowMinimum, solve_budget
from raydrat.core.techniques.recompute.measure import BranchCost, measure_branch_costs
from raydrat.core.techniques.recompute.wrapper import CheckpointWrapper, apply_recompute, iter_branches, wrap_blocks

Autocast = Callable[[], AbstractContextManager]


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

    granularity = "branch"
    """``branch``: :attr:`stored` is one flag per attention / MLP branch; ``op``: per op call
    (:class:`OpRecompute`; :attr:`stored` is then empty)."""

    def apply(self, model: nn.Module) -> nn.Module:
        apply_recompute(model, "full" if self.mode in ("budget", "gated") else "none")
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
    """Every block one checkpoint region: it keeps only its input and recomputes the rest
    (per-branch costs measured once, for the metrics)."""

    mode = "full"

    def apply(self, model: nn.Module) -> nn.Module:
        model = super().apply(model)
        self.blocks = wrap_blocks(model)
        return model

    def measure(self, tokens: torch.Tensor) -> None:
        for b in self.blocks:
            b.enabled = False
        try:
            super().measure(tokens)
        finally:
            for b in self.blocks:
                b.enabled = True

    def decide(self, step: int) -> list[bool]:
        return [False] * len(self.branches)

    def plan_bytes(self) -> int | None:
        """Outside the branches every block input stays (the attention branch's input);
        the MLP branch's input (the stream after attention) is recomputed with the block."""
        if self.costs is None:
            return None
        active = self.active_mask().tolist()
        return self.outside_bytes - sum(
            c.input_bytes if c.kind == "mlp" or not a else 0 for c, a in zip(self.costs, active)
        )

    def plan_recompute_flops(self) -> int | None:
        """The block's forward up to its last op that saves for backward (the MLP's down
        projection's input): both branches' recompute FLOPs plus the attention output
        projection between them."""
        if self.costs is None:
            return None
        active = self.active_mask().tolist()
        out_proj = {int(key): block.attn_branch.layer.out_proj.weight for key, block in self.model.layers.items()}
        flops = 0
        for c, a in zip(self.costs, active):
            if not a:
                continue
            flops += c.recompute_flops
            if c.kind == "attn":
                w = out_proj[c.layer]
                tokens = c.input_bytes // (4 * w.shape[0])
                flops += 2 * tokens * w.shape[0] * w.shape[1]
        return flops


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

    def __init__(
        self, n_layer: int, cfg: RecomputeConfig, device: torch.device, autocast: Autocast = contextlib.nullcontext
    ):
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


class OpRecompute(RecomputePlanner):
    """``budget`` or ``gated`` over op-level choices (``recompute.granularity: op``).

    On the first planned micro-batch it measures every op call of a training forward
    (:func:`~raydrat.core.techniques.recompute.selective.measure_op_costs`: time on this device, bytes
    of each saved tensor), plans within ``recompute.budget_mb`` (``budget``: the exact
    knapsack; ``gated``: the learnable gates over the same choices, after their warm-up)
    and applies the plan to the model from outside. ``compiled`` (``compile.mode`` not ``off``):
    the plan is made for the compiled graph (one SAC region whose tags the compiler's
    partitioner honours) and checked against the traced forward after the first step; the
    gates' plan is then kept fixed (a new plan would recompile). Eagerly the gates keep
    learning after every step and the plan follows their decisions.

    ``costs``: op costs measured beforehand (e.g. by a benchmark, away from the allocator
    profiler, which slows every op down), used instead of measuring on the first step."""

    granularity = "op"

    def __init__(
        self,
        n_layer: int,
        cfg: RecomputeConfig,
        device: torch.device,
        compiled: bool = False,
        autocast: Autocast = contextlib.nullcontext,
        costs: S.OpCosts | None = None,
    ):
        super().__init__(n_layer, autocast)
        self.mode = cfg.mode
        self.cfg = cfg
        self.budget_mb = cfg.budget_mb
        self.device = device
        self.compiled = compiled
        self.costs = costs
        self.op_plan: S.OpPlan | None = None
        self.gates: RecomputeGates | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self._verified = False
        self._pending: dict | None = None

    def apply(self, model: nn.Module) -> nn.Module:
        apply_recompute(model, "none")
        self.model = model
        self.branches = [(layer, kind) for layer, kind, _ in iter_branches(model)]
        self.stored = []
        return model

    def _below(self, err: BudgetBelowMinimum) -> ConfigError:
        kind = "compiled" if self.compiled else "eager"
        return ConfigError(
            f"recompute.budget_mb={self.budget_mb:g} is below the minimum achievable "
            f"{err.minimum_bytes / 2**20:.3f} MB for a {kind} op-level plan on this model and micro-batch "
            f"(every block recomputed, keeping its input): raise recompute.budget_mb to at least that, "
            "or lower train.batch_size or model.seq_len"
        )

    def _make_plan(self) -> None:
        budget = int(self.budget_mb * 2**20)
        try:
            if self.mode == "budget":
                plan = S.plan_budget(self.costs, budget, compiled=self.compiled)
            else:
                plan, self.gates = S.gate_plan(self.costs, budget, compiled=self.compiled, cfg=self.cfg.gates)
                self.gates.to(self.device)
                self.optimizer = torch.optim.Adam(self.gates.parameters(), lr=self.cfg.gates.lr)
                if self._pending is not None:  # resumed: the gates continue where they were
                    self.gates.load_state_dict(self._pending["gates"])
                    self.optimizer.load_state_dict(self._pending["optimizer"])
                    hard, _ = self.gates.decide()
                    plan = S.plan_from_stored(self.costs, hard.tolist(), self.compiled, budget)
        except BudgetBelowMinimum as err:
            raise self._below(err) from None
        self._install(plan)

    def _install(self, plan: S.OpPlan) -> None:
        self.op_plan = plan
        S.apply_plan(self.model, plan)

    def plan(self, step: int, tokens: torch.Tensor | None = None, active_slots: list[int] | None = None) -> list[bool]:
        self.active = active_slots
        if self.op_plan is None:
            if self.costs is None:
                if tokens is None:
                    raise RuntimeError(
                        "recompute.granularity=op: pass a micro-batch to the first plan() to measure costs"
                    )
                self.costs = S.measure_op_costs(self.model, tokens[:, :-1], tokens[:, 1:], self.autocast())
            self._make_plan()
        return self.stored

    def after_step(self) -> None:
        if self.op_plan is not None and not self._verified:
            S.verify_plan(self.model)  # every stored op call occurred (compiled: while tracing)
            self._verified = True
        if self.gates is None or self.compiled:
            return
        # one gate update on the resource loss, then the plan follows the hard decision
        self.optimizer.zero_grad(set_to_none=True)
        self.gates.resource_loss(self.gates.probs()).backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.gates.update_multiplier()
        hard, _ = self.gates.decide()
        plan = S.plan_from_stored(self.costs, hard.tolist(), False, int(self.budget_mb * 2**20))
        if plan.saved != self.op_plan.saved:
            self._install(plan)

    def plan_bytes(self) -> int | None:
        return None if self.op_plan is None else self.op_plan.predicted_bytes

    def metrics(self) -> dict[str, float]:
        if self.op_plan is None:
            return {}
        n = max(1, len(self.costs.items(self.compiled)))
        return {
            M.ACTIVATION_BYTES: float(self.op_plan.predicted_bytes),
            M.STORED_FRACTION: len(set(self.op_plan.saved) - set(self.costs.anchors)) / n,
        }

    def state_dict(self) -> dict:
        """The gates and their optimizer (``gated``); costs are measured again on resume."""
        if self.gates is None:
            return {} if self._pending is None else dict(self._pending)
        return {"gates": self.gates.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        """Kept until the costs are measured again (first plan), then loaded into the gates."""
        self._pending = dict(state) if state else None


def build_recompute(
    cfg: RecomputeConfig,
    n_layer: int,
    device: torch.device,
    autocast: Autocast = contextlib.nullcontext,
    compiled: bool = False,
) -> RecomputePlanner:
    """The planner ``cfg.mode`` names. ``autocast`` wraps the cost measurement's forward
    (the run's precision), so measured bytes are those training will keep; ``compiled``
    (``compile.mode`` not ``off``) makes op-level plans for the compiled graph."""
    if cfg.mode == "none":
        return NoRecompute(n_layer, autocast)
    if cfg.mode == "full":
        return FullRecompute(n_layer, autocast)
    if cfg.granularity == "op":
        return OpRecompute(n_layer, cfg, device, compiled, autocast)
    if cfg.mode == "budget":
        return BudgetRecompute(n_layer, cfg.budget_mb, autocast)
    return GatedRecompute(n_layer, cfg, device, autocast)
