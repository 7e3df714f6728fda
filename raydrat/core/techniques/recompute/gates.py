"""Learnable recomputation gates (``recompute.mode: gated``), applied to a GPT from outside.

One gate per choice of the planner's granularity: per attention branch and per MLP branch,
or per op-level choice (:func:`raydrat.core.techniques.recompute.op_plan.op_gates`). Gate
``i`` has a logit; its probability is ``p_i = sigmoid(logit_i / temperature)``. Each step a
hard decision ``h_i`` (store the activations, or recompute them in backward) is taken and
becomes the step's plan (per branch: the branch's
:class:`~raydrat.core.techniques.recompute.wrapper.CheckpointWrapper` is ``enabled = not h_i``).
Recomputation is exact, so the task loss does not depend on the gates; they learn only from
the resource loss, through the straight-through estimator ``s = h + p - p.detach()``.

Plain form (``recompute.budget_mb`` unset): ``h_i = p_i >= 0.5`` (``threshold``) or
Bernoulli(p_i) (``sample``), and

    L_res = lambda * sum_i s_i c_i + mu * sum_i (1 - s_i) r_i

``c_i`` and ``r_i`` are the branch's storing and recomputing costs, normalised to sum to
1 over the branches (so lambda and mu are comparable across model sizes). A gate stores
when ``mu r_i > lambda c_i``: lambda and mu set a fixed exchange rate between bytes and
recompute work.

Memory-budget form (``recompute.budget_mb``: saved activations per micro-batch, embedding and
logits included): the goal is the budget optimum,
least recompute work with the stored bytes within the budget. It is a constrained
problem, solved as one: the branches' share of the budget is ``B = budget - bytes outside
the branches`` (measured), and

    L_res = sum_i (1 - s_i) r_i + nu * (sum_i p_i b_i / B - 1)

with ``b_i`` the measured stored bytes and ``nu >= 0`` a Lagrange multiplier that starts
at ``lambda`` (``gates.memory_weight``) and follows dual ascent, ``nu <- max(0, nu + dual_lr * (sum p_i b_i / B - 1))``
(rises while the expected bytes exceed the budget, falls to 0 while they are below, so only
memory above the budget is penalised at the fixed point). A gate's gradient is
``nu b_i / B - r_i``: gates are ordered by their recompute work per stored byte, the
multiplier settles where the expected bytes meet the budget, and the hard decision fills
the budget in order of ``p`` (highest first; ties by branch order), storing each branch
that still fits: the stored bytes never exceed the budget, at any step. ``mu`` is not used
in this form (the budget replaces the exchange rate). With ``sample``, only the branches
drawn by Bernoulli(p) are candidates for the fill.

Because the resource loss depends only on the gates and the measured costs, the policy
also runs ``gates.warmup_steps`` gate-only updates after each cost measurement
(:meth:`RecomputeGates.pretrain`), so the gates start training near their fixed point
instead of spending the first hundreds of training steps getting there.

Cost models: ``uniform``; ``layer_weighted`` (storing costs weighted by how long the
activation is held: early layers are held through the whole backward);
``activation_size`` (measured stored bytes and recompute FLOPs per branch).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from raydrat.config.recompute import GatesConfig


def _normalised(values: Sequence[float]) -> torch.Tensor:
    t = torch.tensor([float(v) for v in values], dtype=torch.float32)
    total = t.sum()
    return t / total if total > 0 else torch.full_like(t, 1.0 / max(1, len(t)))


class RecomputeGates(nn.Module):
    """The gate logits, their costs and (budget form) the Lagrange multiplier; knows
    nothing of the model's internals. Everything that evolves is in ``state_dict``."""

    def __init__(
        self, branches: Sequence[tuple[int, str]], cfg: GatesConfig, n_layer: int, budget_mb: float | None = None
    ):
        super().__init__()
        self.cfg = cfg
        self.budget_mb = budget_mb
        self.branches = list(branches)
        self.n_layer = n_layer
        n = len(self.branches)
        self.logits = nn.Parameter(torch.full((n,), float(cfg.init_logit)))
        self.register_buffer("store_cost", torch.full((n,), 1.0 / n))
        self.register_buffer("recompute_cost", torch.full((n,), 1.0 / n))
        # bytes in float64: exact integers, so the budget fill never rounds past the budget
        self.register_buffer("stored_bytes", torch.zeros(n, dtype=torch.float64))
        self.register_buffer("budget_bytes", torch.zeros((), dtype=torch.float64))
        self.register_buffer("multiplier", torch.tensor(float(cfg.memory_weight)))
        if cfg.cost_model == "layer_weighted":
            self.store_cost.copy_(_normalised([n_layer - layer for layer, _ in self.branches]))

    @property
    def budgeted(self) -> bool:
        return self.budget_mb is not None

    def set_measured(self, stored_bytes: Sequence[int], recompute_flops: Sequence[int], outside_bytes: int = 0) -> None:
        """Install measured per-branch costs (``activation_size``; bytes also feed the
        memory_budget form under every cost model). ``outside_bytes``: saved bytes that no
        branch owns (embeddings, block inputs, logits), taken off the budget first."""
        self.stored_bytes.copy_(torch.tensor([float(b) for b in stored_bytes], dtype=torch.float64))
        if self.cfg.cost_model == "activation_size":
            self.store_cost.copy_(_normalised(stored_bytes))
            self.recompute_cost.copy_(_normalised(recompute_flops))
        if self.budgeted:
            budget = self.budget_mb * 2**20
            if budget < outside_bytes:
                raise ValueError(
                    f"recompute.budget_mb={self.budget_mb:g} is below the measured minimum "
                    f"{outside_bytes / 2**20:.3f} MB (every branch recomputed): raise it"
                )
            self.budget_bytes.fill_(budget - outside_bytes)

    def probs(self) -> torch.Tensor:
        return torch.sigmoid(self.logits / self.cfg.temperature)

    def decide(
        self, active: torch.Tensor | None = None, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(hard decisions as bools, straight-through store indicator with p's gradient).
        ``active``: 1/0 per branch (layer dropping); inactive branches store nothing."""
        p = self.probs()
        pd = p.detach()
        if self.cfg.decision == "sample":
            hard = torch.bernoulli(pd, generator=generator).bool()
        else:
            hard = pd >= 0.5
        if self.budgeted:
            hard = self._fill(pd, hard if self.cfg.decision == "sample" else torch.ones_like(hard), active)
        return hard, hard.to(p.dtype) + p - pd

    def _fill(self, p: torch.Tensor, candidates: torch.Tensor, active: torch.Tensor | None) -> torch.Tensor:
        """Store candidates in order of p (ties: branch order) while they fit the budget."""
        n = len(self.branches)
        on = [True] * n if active is None else [bool(a) for a in active.tolist()]
        probs, sizes, room = p.tolist(), self.stored_bytes.tolist(), float(self.budget_bytes)
        hard = [not a for a in on]  # an inactive branch runs nothing, stores nothing
        for i in sorted(range(n), key=lambda i: (-probs[i], i)):
            if on[i] and bool(candidates[i]) and sizes[i] <= room:
                hard[i] = True
                room -= sizes[i]
        return torch.tensor(hard, device=p.device)

    def expected_share(self, active: torch.Tensor | None = None) -> torch.Tensor:
        """Budget form: expected stored bytes ``sum p_i b_i`` over the branch budget."""
        p = self.probs()
        if active is not None:
            p = p * active
        return (p * (self.stored_bytes / self.budget_bytes.clamp_min(1.0)).to(p.dtype)).sum()

    def resource_loss(self, store: torch.Tensor, active: torch.Tensor | None = None) -> torch.Tensor:
        """The resource-aware loss for a straight-through store indicator ``store``;
        ``active`` (1/0 per branch) leaves dropped layers' branches out."""
        cfg = self.cfg
        stored = store if active is None else store * active
        recomputed = (1.0 - store) if active is None else (1.0 - store) * active
        recompute = (recomputed * self.recompute_cost).sum()
        if self.budgeted:
            return recompute + self.multiplier * (self.expected_share(active) - 1.0)
        return cfg.memory_weight * (stored * self.store_cost).sum() + cfg.recompute_weight * recompute

    @torch.no_grad()
    def update_multiplier(self, active: torch.Tensor | None = None) -> None:
        """Budget form: one dual-ascent step of the Lagrange multiplier (no-op otherwise)."""
        if self.budgeted:
            over = float(self.expected_share(active)) - 1.0
            self.multiplier.fill_(max(0.0, float(self.multiplier) + self.cfg.dual_lr * over))

    def pretrain(self, optimizer: torch.optim.Optimizer, steps: int) -> None:
        """``steps`` gate-only updates on the resource loss (every branch active): the loss
        depends on nothing but the gates and the costs, so this is the training signal the
        gates would get over ``steps`` training steps, without running the model."""
        for _ in range(steps):
            # the straight-through indicator's gradient is p's, whatever the hard decision:
            # p itself gives the same update without computing the decision
            optimizer.zero_grad(set_to_none=True)
            self.resource_loss(self.probs()).backward()
            optimizer.step()
            self.update_multiplier()
        optimizer.zero_grad(set_to_none=True)
