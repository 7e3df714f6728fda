"""Recomputation planners (``recompute.mode``): which activations each step keeps for
backward and which it recomputes, decided from outside the model. One planner per mode,
each over a granularity (``recompute.granularity``, :mod:`.granularity`: per branch or
per op call) that measures the costs, makes the plans and applies them:

* :class:`NoRecompute` (``none``): no wrappers, everything stored.
* :class:`FullRecompute` (``full``): every transformer block one checkpoint region (it
  keeps only the block's input, like ``torch.utils.checkpoint`` per block).
* :class:`BudgetRecompute` (``budget``): the exact optimum (a knapsack over the measured
  costs) that fits ``recompute.budget_mb``, planned once (op-level: or recalled from the
  plan cache, :mod:`.plan_cache`, with no measurement).
* :class:`GatedRecompute` (``gated``): learnable gates decide each step; after the
  optimizer step they take their own update from the resource loss (:meth:`after_step`),
  which depends on nothing but the gates and the measured costs.

Every planner follows the technique protocol: :meth:`~RecomputePlanner.apply` wraps the
model once, :meth:`~RecomputePlanner.plan` (before each step) measures the costs when they
are due (the first planned micro-batch; the branch gates every ``gates.refresh_every``
steps) and sets the plan, :meth:`~RecomputePlanner.after_step` follows the optimizer step.
Use :func:`build_recompute` to get the planner a
:class:`~raydrat.config.recompute.RecomputeConfig` asks for.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import nn

from raydrat.config.recompute import GatesConfig, RecomputeConfig
from raydrat.core import metrics as M
from raydrat.core.techniques.base import Technique
from raydrat.core.techniques.recompute.branch_costs import BranchCost
from raydrat.core.techniques.recompute.gates import RecomputeGates
from raydrat.core.techniques.recompute.granularity import (
    Autocast,
    BranchGranularity,
    Granularity,
    OpGranularity,
    branch_mask,
)
from raydrat.core.techniques.recompute.plan_cache import plan_cache
from raydrat.core.techniques.recompute.wrapper import apply_recompute, wrap_blocks


class RecomputePlanner(Technique):
    """Base of the planners: the step protocol, over a granularity (``level``)."""

    name = "recompute"
    mode = "none"

    def __init__(self, n_layer: int, level: Granularity | None = None):
        self.n_layer = n_layer
        self.level = level or BranchGranularity()
        self.current: Any = None
        """The plan in force (branch: a flag per branch; op: an :class:`~.op_plan.OpPlan`)."""
        self.active: list[int] | None = None
        """The layers the planned step runs (``None``: all)."""

    @property
    def granularity(self) -> str:
        """``branch``: :attr:`stored` is one flag per attention / MLP branch; ``op``: per op
        call (:attr:`stored` is then empty)."""
        return self.level.name

    @property
    def branches(self) -> list[tuple[int, str]]:
        return self.level.branches

    @property
    def stored(self) -> list[bool]:
        """Per branch of every layer, whether the current plan stores its activations."""
        return self.level.stored(self.current)

    @property
    def costs(self) -> Any:
        """The measured costs (``None`` until measured)."""
        return self.level.costs

    @costs.setter
    def costs(self, costs: Any) -> None:
        self.level.costs = costs

    def apply(self, model: nn.Module) -> nn.Module:
        return self.level.wrap(model)

    def plan(self, step: int, tokens: torch.Tensor | None = None, active_slots: list[int] | None = None) -> list[bool]:
        """Set the plan for ``step`` (``tokens``: a ``(B, T+1)`` micro-batch, used to
        measure costs when they are due; ``active_slots``: the layers that run). Returns
        which branches store their activations."""
        self.active = active_slots
        return self.stored

    def after_step(self) -> None:
        """Called after the optimizer step."""

    def plan_bytes(self) -> int | None:
        """Saved activation bytes of the current plan, from measured costs (``None``: not measured)."""
        return None if self.current is None else self.level.plan_bytes(self.current, self.active)

    def plan_recompute_flops(self) -> int | None:
        """Forward FLOPs backward repeats under the current plan (``None``: not measured, or op-level)."""
        return None if self.current is None else self.level.plan_recompute_flops(self.current, self.active)

    def _figures(self) -> dict[str, float]:
        out: dict[str, float] = {}
        nbytes, flops = self.plan_bytes(), self.plan_recompute_flops()
        if nbytes is not None:
            out[M.ACTIVATION_BYTES] = float(nbytes)
        if flops is not None:
            out[M.RECOMPUTE_FLOPS] = float(flops)
        return out


class NoRecompute(RecomputePlanner):
    """Store everything, measure nothing."""

    mode = "none"

    def apply(self, model: nn.Module) -> nn.Module:
        return self.level.track(apply_recompute(model, "none"))


class FullRecompute(RecomputePlanner):
    """Every block one checkpoint region: it keeps only its input and recomputes the rest
    (per-branch costs measured once, for the metrics)."""

    mode = "full"

    def __init__(self, n_layer: int, autocast: Autocast = contextlib.nullcontext):
        super().__init__(n_layer, BranchGranularity(autocast))

    @property
    def stored(self) -> list[bool]:
        return [False] * len(self.branches)

    def apply(self, model: nn.Module) -> nn.Module:
        self.level.track(apply_recompute(model, "none"))
        wrap_blocks(model)
        return model

    def plan(self, step: int, tokens: torch.Tensor | None = None, active_slots: list[int] | None = None) -> list[bool]:
        self.active = active_slots
        if self.level.measure_due(step, tokens):
            self.level.measure(step, tokens)
        return self.stored

    def plan_bytes(self) -> int | None:
        """Outside the branches every block input stays (the attention branch's input);
        the MLP branch's input (the stream after attention) is recomputed with the block."""
        if self.costs is None:
            return None
        active = branch_mask(self.branches, self.active).tolist()
        return self.level.measured.outside_bytes - sum(
            c.input_bytes if c.kind == "mlp" or not a else 0 for c, a in zip(self.costs, active)
        )

    def plan_recompute_flops(self) -> int | None:
        """The block's forward up to its last op that saves for backward (the MLP's down
        projection's input): both branches' recompute FLOPs plus the attention output
        projection between them."""
        if self.costs is None:
            return None
        active = branch_mask(self.branches, self.active).tolist()
        return sum(self._block_flops(c) for c, a in zip(self.costs, active) if a)

    def _block_flops(self, c: BranchCost) -> int:
        if c.kind != "attn":
            return c.recompute_flops
        w = self.level.model.layers[str(c.layer)].attn_branch.layer.out_proj.weight
        tokens = c.input_bytes // (4 * w.shape[0])
        return c.recompute_flops + 2 * tokens * w.shape[0] * w.shape[1]

    def metrics(self) -> dict[str, float]:
        return self._figures()

    def state_dict(self) -> dict:
        return self.level.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.level.load_state_dict(state)


class BudgetRecompute(RecomputePlanner):
    """The exact optimum under ``budget_mb`` of saved activations (embedding and logits
    included): the knapsack over the measured costs, solved once."""

    mode = "budget"

    def __init__(self, n_layer: int, level: Granularity, budget_mb: float):
        super().__init__(n_layer, level)
        self.budget_mb = budget_mb

    def plan(self, step: int, tokens: torch.Tensor | None = None, active_slots: list[int] | None = None) -> list[bool]:
        self.active = active_slots
        if self.current is None:
            self.current = self.level.recall_plan(self.budget_mb, tokens)
        if self.level.measure_due(step, tokens):
            self.level.measure(step, tokens)
            self.current = None
        if self.current is None:
            self.current = self.level.budget_plan(self.budget_mb)
        self.level.install(self.current)
        return self.stored

    def after_step(self) -> None:
        self.level.after_step()

    def metrics(self) -> dict[str, float]:
        out = self._figures()
        if out:
            out[M.STORED_FRACTION] = self.level.stored_fraction(self.current)
        return out

    def state_dict(self) -> dict:
        return {**self.level.state_dict(), **self.level.save_plan(self.current)}

    def load_state_dict(self, state: dict) -> None:
        self.level.load_state_dict(state)
        self.current = self.level.load_plan(state)


class GatedRecompute(RecomputePlanner):
    """Learnable gates decide each step; they learn from the resource loss only (the task
    loss does not depend on them: recomputation is exact), through their own Adam. Each
    step's decision is turned into a plan by the granularity; with ``budget_mb`` the plan
    never exceeds it."""

    mode = "gated"

    def __init__(self, n_layer: int, level: Granularity, cfg: RecomputeConfig, device: torch.device):
        super().__init__(n_layer, level)
        self.cfg: GatesConfig = cfg.gates
        self.budget_mb = cfg.budget_mb
        self.device = device
        self.gates: RecomputeGates | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.store_ste: torch.Tensor | None = None
        self.last_resource_loss: float | None = None
        self.history: list[tuple[int, list[float]]] = []
        """``(step, gate probabilities)`` after each update (for the heat-map; branch gates)."""
        self._step = 0
        self._pending: dict | None = None

    def apply(self, model: nn.Module) -> nn.Module:
        model = super().apply(model)
        self._adopt(self.level.new_gates(self.cfg, self.n_layer, self.budget_mb))
        return model

    def _adopt(self, gates: RecomputeGates | None) -> None:
        """Train ``gates`` from now on, with a new Adam (and a pending checkpointed state)."""
        if gates is None or gates is self.gates:
            return
        self.gates = gates.to(self.device)
        self.optimizer = torch.optim.Adam(self.gates.parameters(), lr=self.cfg.lr)
        if self._pending is not None:  # resumed: the gates continue where they were
            self._load_gates(self._pending)
            self._pending = None

    def _load_gates(self, state: dict) -> None:
        self.gates.load_state_dict(state["gates"])
        self.optimizer.load_state_dict(state["optimizer"])

    def plan(self, step: int, tokens: torch.Tensor | None = None, active_slots: list[int] | None = None) -> list[bool]:
        self.active = active_slots
        measured = self.level.measure_due(step, tokens)
        if measured:
            self.level.measure(step, tokens)
        if measured or (self.gates is None and self.level.costs is not None):
            self._adopt(self.level.fit_gates(self.gates, self.optimizer, self.cfg, self.budget_mb))
        if self.gates is None:
            raise RuntimeError("recompute.mode=gated: pass a micro-batch to the first plan() to measure costs")
        if self.current is None or self.level.replans:
            self._decide(step)
        return self.stored

    def _decide(self, step: int) -> None:
        self._step = step
        hard, self.store_ste = self.gates.decide(self.level.gate_mask(self.active, self.device))
        budget = None if self.budget_mb is None else int(self.budget_mb * 2**20)
        self.current = self.level.from_stored(hard.tolist(), budget)
        self.level.install(self.current)

    def after_step(self) -> None:
        """One gate update: the resource loss of this step's decisions, backward into the
        gates alone, their Adam step, and (budget form) the multiplier's dual ascent."""
        self.level.after_step()
        if self.store_ste is None or not self.level.replans:
            return
        mask = self.level.gate_mask(self.active, self.device)
        loss = self.gates.resource_loss(self.store_ste, mask)
        self.last_resource_loss = float(loss.detach())
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.gates.update_multiplier(mask)
        self.store_ste = None
        if self.level.gate_labels:
            self.history.append((self._step + 1, self.gates.probs().detach().cpu().tolist()))

    def metrics(self) -> dict[str, float]:
        if self.current is None:
            return {}
        out = {**self._figures(), M.STORED_FRACTION: self.level.stored_fraction(self.current)}
        for (layer, kind), p in zip(self.level.gate_labels or (), self.gates.probs().detach().cpu().tolist()):
            out[M.gate_prob_name(layer, kind)] = p
        if self.last_resource_loss is not None:
            out[M.RESOURCE_LOSS] = self.last_resource_loss
        if self.gates.budgeted:
            out[M.GATE_MULTIPLIER] = float(self.gates.multiplier)
        return out

    def state_dict(self) -> dict:
        """Gate logits, multiplier and costs, and the gates' optimizer state: a fresh
        planner for the same config continues exactly (branch: no re-measurement, no
        warm-up; op: the gates wait for the costs measured again on the first plan)."""
        if self.gates is None:
            return dict(self._pending or {})
        return {**self.level.state_dict(), "gates": self.gates.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.level.load_state_dict(state)
        if self.gates is None:
            self._pending = dict(state) if state else None
        else:
            self._load_gates(state)


def build_recompute(
    cfg: RecomputeConfig,
    n_layer: int,
    device: torch.device,
    autocast: Autocast = contextlib.nullcontext,
    compiled: bool = False,
) -> RecomputePlanner:
    """The planner ``cfg.mode`` names, over ``cfg.granularity``. ``autocast`` wraps the cost
    measurement's forward (the run's precision), so measured bytes are those training will
    keep; ``compiled`` (``compile.mode`` not ``off``) makes op-level plans for the compiled graph."""
    if cfg.mode == "none":
        return NoRecompute(n_layer)
    if cfg.mode == "full":
        return FullRecompute(n_layer, autocast)
    if cfg.granularity == "op":
        level = OpGranularity(compiled, autocast, plans=plan_cache(cfg.plan_cache) if cfg.mode == "budget" else None)
    else:
        level = BranchGranularity(autocast, cfg.gates.refresh_every if cfg.mode == "gated" else None)
    if cfg.mode == "budget":
        return BudgetRecompute(n_layer, level, cfg.budget_mb)
    return GatedRecompute(n_layer, level, cfg, device)
