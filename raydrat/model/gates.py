"""Learnable recomputation gates, applied to a :class:`GPT` from outside.

One gate per attention branch and per MLP branch. Gate ``i`` has a logit; its probability
is ``p_i = sigmoid(logit_i / temperature)``. Each step a hard decision ``h_i`` (store the
branch's activations, or recompute them in backward) is drawn — ``p_i >= 0.5``
(``threshold``) or Bernoulli(p_i) (``sample``) — and set on the branch's
:class:`~raydrat.model.recompute.CheckpointWrapper` (``enabled = not h_i``). Recomputation
is exact, so the task loss does not depend on the gates; they learn only from the
resource loss, through the straight-through estimator ``h + p - p.detach()``:

    L_res = lambda * sum_i h_i c_i + mu * sum_i (1 - h_i) r_i        (plain form)
    L_res = lambda * relu(sum_i h_i b_i - budget) / budget + mu * ...  (memory_budget form)

``c_i`` and ``r_i`` are the branch's storing and recomputing costs, normalised to sum to
1 over the branches (so lambda and mu are comparable across model sizes); ``b_i`` are
its stored bytes. Cost models: ``uniform``; ``layer_weighted`` (storing costs weighted by
how long the activation is held: early layers are held through the whole backward);
``activation_size`` (measured stored bytes and recompute FLOPs per branch).
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from raydrat.config import GatesConfig


def _normalised(values: Sequence[float]) -> torch.Tensor:
    t = torch.tensor([float(v) for v in values], dtype=torch.float32)
    total = t.sum()
    return t / total if total > 0 else torch.full_like(t, 1.0 / max(1, len(t)))


class RecomputeGates(nn.Module):
    """The gate logits and their costs; knows nothing of the model's internals."""

    def __init__(self, branches: Sequence[tuple[int, str]], cfg: GatesConfig, n_layer: int):
        super().__init__()
        self.cfg = cfg
        self.branches = list(branches)
        self.n_layer = n_layer
        n = len(self.branches)
        self.logits = nn.Parameter(torch.full((n,), float(cfg.init_logit)))
        self.register_buffer("store_cost", torch.full((n,), 1.0 / n))
        self.register_buffer("recompute_cost", torch.full((n,), 1.0 / n))
        self.register_buffer("stored_bytes", torch.zeros(n))
        if cfg.cost_model == "layer_weighted":
            self.store_cost.copy_(_normalised([n_layer - layer for layer, _ in self.branches]))

    def set_measured(self, stored_bytes: Sequence[int], recompute_flops: Sequence[int]) -> None:
        """Install measured per-branch costs (``activation_size``; bytes also feed the
        memory_budget form under every cost model)."""
        self.stored_bytes.copy_(torch.tensor([float(b) for b in stored_bytes]))
        if self.cfg.cost_model == "activation_size":
            self.store_cost.copy_(_normalised(stored_bytes))
            self.recompute_cost.copy_(_normalised(recompute_flops))

    def probs(self) -> torch.Tensor:
        return torch.sigmoid(self.logits / self.cfg.temperature)

    def decide(self, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(hard decisions as bools, straight-through store indicator with p's gradient)."""
        p = self.probs()
        if self.cfg.decision == "sample":
            hard = torch.bernoulli(p.detach(), generator=generator).bool()
        else:
            hard = p.detach() >= 0.5
        return hard, hard.float() + p - p.detach()

    def resource_loss(self, store: torch.Tensor) -> torch.Tensor:
        """The resource-aware loss for a straight-through store indicator."""
        cfg = self.cfg
        recompute = cfg.mu * ((1.0 - store) * self.recompute_cost).sum()
        if cfg.memory_budget_mb is not None:
            budget = cfg.memory_budget_mb * 2**20
            over = torch.relu((store * self.stored_bytes).sum() - budget) / budget
            return cfg.lam * over + recompute
        return cfg.lam * (store * self.store_cost).sum() + recompute
