"""Activation recomputation, planned from outside the model (section ``recompute:``).

One section holds every recomputation setting: the planner (``mode``), the activation
budget it must fit, and the learnable gates' settings (``recompute.gates``).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from raydrat.config.base import Section, changed_fields


class GatesConfig(Section):
    """Learnable recomputation gates (``recompute.mode: gated``): one gate per attention
    branch and per MLP branch, trained by a resource loss, applied from outside the model."""

    temperature: float = Field(1.0, gt=0)
    """Gate probability ``p = sigmoid(logit / temperature)``."""
    init_logit: float = 0.0
    """Initial logit of every gate (0: p = 0.5)."""
    decision: Literal["threshold", "sample"] = "threshold"
    """Hard store/recompute decision: ``threshold`` stores when ``p >= 0.5``; ``sample``
    draws Bernoulli(p) each step. The gradient reaches p by the straight-through estimator."""
    memory_weight: float = Field(1e-2, ge=0)
    """lambda, the weight of the memory term ``sum(p_i * c_i)`` (c_i: normalised cost of
    storing branch i). With ``recompute.budget_mb`` it is the starting value of the budget
    constraint's Lagrange multiplier instead. Must be >= 0."""
    recompute_weight: float = Field(1e-2, ge=0)
    """mu, the weight of the recompute term ``sum((1 - p_i) * r_i)`` (r_i: normalised cost
    of recomputing branch i). Not used with ``recompute.budget_mb``. Must be >= 0."""
    cost_model: Literal["uniform", "layer_weighted", "activation_size"] = "activation_size"
    """Costs c_i, r_i: ``uniform`` (all 1), ``layer_weighted`` (grow with depth), or
    ``activation_size`` (measured saved bytes and recompute FLOPs per branch)."""
    lr: float = Field(0.05, gt=0)
    """Learning rate of the gates' own Adam optimizer (separate from ``optim.lr``)."""
    dual_lr: float = Field(0.05, gt=0)
    """Budget form: step of the Lagrange multiplier's dual ascent, per gate update, per unit
    of relative excess ``expected bytes / budget - 1``."""
    warmup_steps: int = Field(300, ge=0)
    """Gate-only updates run after each cost measurement (a few tiny tensor ops each, no
    model pass: the resource loss depends only on the gates and the measured costs), so the
    gates start near their fixed point instead of spending the first training steps getting
    there. 0: none."""
    refresh_every: int = Field(100, ge=1)
    """Re-measure the activation_size costs every this many steps."""


class RecomputeConfig(Section):
    """Which activations are kept for backward and which are recomputed. Recomputation is
    exact: the loss is unchanged, memory is traded for step time."""

    mode: Literal["none", "full", "budget", "gated"] = "none"
    """``none``: store everything. ``full``: recompute every transformer block (one
    ``torch.utils.checkpoint`` region per block: it keeps only the block's input).
    ``budget``: the exact optimum (knapsack) that fits ``budget_mb`` of saved activations
    with the least recomputed FLOPs. ``gated``: learnable per-branch gates (``gates``)
    decide each step; with ``budget_mb`` they minimise recomputation under that budget."""
    budget_mb: float | None = Field(None, gt=0)
    """Activation-memory budget: MB of saved activations per micro-batch, the embedding and
    logits terms included. Required by ``budget``; optional for ``gated`` (the budget form:
    the gates then minimise the recompute cost under it, a Lagrange multiplier started at
    ``gates.memory_weight`` penalises expected bytes above it, and each step's plan stores
    branches in order of p while they fit, so it never exceeds the budget)."""
    gates: GatesConfig = Field(default_factory=GatesConfig)
    """The learnable gates (``mode: gated`` only)."""
    granularity: Literal["branch", "op"] = "branch"
    """What ``budget`` and ``gated`` choose over: ``branch`` (store or recompute each
    attention and MLP branch, costs in FLOPs) or ``op`` (store or recompute each op call's
    output through PyTorch's selective activation checkpointing, costs in measured op time
    on this device and the bytes of each saved tensor; planned for the compiled graph when
    ``compile.mode`` is not ``off``). ``op`` with ``gated`` needs ``budget_mb``."""
    plan_cache: bool = True
    """``granularity: op`` with ``budget``: keep each plan on disk, keyed by the model config,
    micro-batch shape, budget, device, dtype and torch and raydrat code, and use it again
    instead of measuring and planning (the console says so): the same plan again is the same
    compiled graph, so ``torch.compile`` is served from its own caches. ``$RAYDRAT_PLAN_CACHE``
    names the folder (default ``~/.cache/raydrat/plans``) or turns it off (``off``)."""

    @model_validator(mode="after")
    def _check_mode(self) -> RecomputeConfig:
        if self.mode == "budget" and self.budget_mb is None:
            raise ValueError("recompute.mode=budget needs recompute.budget_mb (MB of saved activations)")
        if self.budget_mb is not None and self.mode in ("none", "full"):
            raise ValueError(
                f"recompute.budget_mb={self.budget_mb:g} has no effect with recompute.mode={self.mode}: "
                "set recompute.mode=budget (or gated), or remove recompute.budget_mb"
            )
        if self.granularity == "op" and self.mode not in ("budget", "gated"):
            raise ValueError(
                f"recompute.granularity=op has no effect with recompute.mode={self.mode}: "
                "set recompute.mode=budget (or gated), or remove recompute.granularity"
            )
        if not self.plan_cache and (self.granularity != "op" or self.mode != "budget"):
            raise ValueError(
                f"recompute.plan_cache=false has no effect with recompute.mode={self.mode}, "
                f"recompute.granularity={self.granularity}: plans are kept for granularity=op with mode=budget; "
                "remove recompute.plan_cache"
            )
        if self.granularity == "op" and self.mode == "gated" and self.budget_mb is None:
            raise ValueError(
                "recompute.granularity=op with recompute.mode=gated needs recompute.budget_mb "
                "(the op-level gates learn in their memory-budget form)"
            )
        if self.mode != "gated":
            gates = changed_fields(self.gates, tuple(GatesConfig.model_fields))
            if gates:
                raise ValueError(
                    f"recompute.gates.{', recompute.gates.'.join(gates)} only apply to recompute.mode=gated: "
                    "set recompute.mode=gated or remove them"
                )
        return self
