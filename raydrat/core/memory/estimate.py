"""The analytic estimate of a config's peak training memory per worker, by component.

Per-op accounting of what the model in :mod:`raydrat.core.model.transformer` keeps alive for
backward (checked op by op against :func:`raydrat.core.memory.measure.saved_activation_bytes`;
see docs/efficiency.md). Units: bytes. B micro-batch, T seq_len, C d_model, H heads, K kv
heads, F MLP width, V vocab, e bytes of the compute dtype (4 fp32, 2 bf16/fp16). The residual
stream, norm statistics and the loss's log-softmax stay fp32 under autocast.

Every function takes the device type (``cpu`` | ``cuda``) and the resolved precision
(``fp32`` | ``bf16`` | ``fp16``): deciding them is :func:`raydrat.core.runtime.resolve`'s job.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

import torch

from raydrat.config.run import RaydratConfig
from raydrat.core.memory.measure import BranchCost
from raydrat.core.model.config import ModelConfig
from raydrat.core.model.transformer import GPT
from raydrat.core.techniques.knapsack import solve_budget

COMPONENTS = ("params", "grads", "optimizer", "activations", "logits")
MIN_8BIT_NUMEL = 4096
"""bitsandbytes keeps 32-bit states for tensors with fewer elements than this."""
BNB_BLOCK = 256
"""bitsandbytes block size: one fp32 absmax per state per block; two 256-entry fp32 maps."""


@dataclass
class MemoryEstimate:
    """Predicted peak training memory of one worker, by component (bytes)."""

    total_bytes: int
    components: dict[str, int]
    detail: dict[str, Any] = field(default_factory=dict)

    @property
    def saved_bytes(self) -> int:
        """Activation bytes alive after forward, as ``saved_activation_bytes`` measures
        them (layer activations plus the loss's saved log-softmax)."""
        return int(self.detail["saved_bytes"])

    def table(self) -> str:
        rows = [(k, v) for k, v in self.components.items()] + [("total", self.total_bytes)]
        width = max(len(k) for k, _ in rows)
        lines = [f"{'component'.ljust(width)}  {'MiB':>10}  {'share':>6}"]
        for k, v in rows:
            share = v / self.total_bytes if self.total_bytes else 0.0
            lines.append(f"{k.ljust(width)}  {v / 2**20:10.2f}  {share:6.1%}")
        return "\n".join(lines)


def _meta_model(mcfg: ModelConfig) -> GPT:
    with torch.device("meta"):
        return GPT(mcfg)


def _optimizer_state_bytes_for(shapes: list[int], name: str) -> int:
    if name in ("adamw", "adamw_fused"):
        return sum(2 * 4 * n + 4 for n in shapes)  # exp_avg, exp_avg_sq (fp32), step (fp32 scalar)
    total = 0
    for n in shapes:  # bitsandbytes 8-bit: uint8 moments + block absmax + two quantisation maps
        if n < MIN_8BIT_NUMEL:
            total += 2 * 4 * n
        else:
            total += 2 * n + 2 * 4 * math.ceil(n / BNB_BLOCK) + 2 * 4 * 256
    return total


def _compute_bytes(precision: str) -> int:
    return 4 if precision == "fp32" else 2


def attention_keeps_matrix(mcfg, device: str) -> bool:
    """Whether SDPA stores the (B, H, T, T) attention matrix (math kernel)."""
    if mcfg.attention_backend == "math":
        return True
    return mcfg.attention_backend == "auto" and device == "cpu" and mcfg.dropout > 0


def branch_costs(cfg: RaydratConfig, device: str, precision: str, batch_size: int | None = None) -> list[BranchCost]:
    """Analytic per-branch costs for every layer (the budget solver's input)."""
    mc = cfg.model
    e = _compute_bytes(precision)
    mixed = e != 4
    B, T, C, H, K, F, D = batch_size or cfg.train.batch_size, mc.seq_len, mc.d_model, mc.n_head, mc.kv_heads, mc.ff_dim, mc.head_dim
    BT, KD = B * T, K * D
    drop = mc.dropout > 0

    # norm: its own saved tensors; in fp32 the norm's output is kept by the projections,
    # under autocast each projection keeps its own cast of it.
    def norm_and_proj_inputs(n_proj: int) -> int:
        return _norm_bytes(mc, BT) + (n_proj * BT * C * e if mixed else BT * C * 4)

    attn = norm_and_proj_inputs(3)
    attn += 3 * BT * C * e  # q, k, v as SDPA keeps them (k, v repeated to H heads)
    attn += BT * C * e  # SDPA output, kept by out_proj
    attn += B * H * T * 4  # log-sum-exp
    if attention_keeps_matrix(mc, device):
        attn += B * H * T * T * (11 if mixed else 8) // 2 - B * H * T * 4  # probabilities (and casts) instead of lse
        if drop:  # dropout mask and dropped probabilities (fitted to measurement)
            attn += int(B * H * T * T * (8 + e / 2)) - B * H * T * 8
    if drop:
        attn += BT * C  # residual dropout mask (bool)
    attn_w = C * H * D + 2 * C * KD + H * D * C
    if mixed:
        attn += attn_w * e  # autocast copies of the projection weights, kept by the matmuls
    n_mlp_in = 2 if mc.gated_mlp else 1
    mlp = norm_and_proj_inputs(n_mlp_in)
    mlp += (4 if mc.gated_mlp else 2) * BT * F * e  # up/gate outputs, activation output, product
    if drop:
        mlp += BT * C
    mlp_w = (3 if mc.gated_mlp else 2) * C * F
    if mixed:
        mlp += mlp_w * e
    # what backward repeats: the forward up to the last kept output (not out/down_proj)
    attn_flops = 2 * BT * C * (H * D + 2 * KD) + 4 * B * H * T * T * D
    mlp_flops = 2 * BT * C * F * (2 if mc.gated_mlp else 1)
    out = []
    for i in range(mc.n_layer):
        out.append(BranchCost(i, "attn", BT * C * 4, attn, attn_flops))
        out.append(BranchCost(i, "mlp", BT * C * 4, mlp, mlp_flops))
    return out


def _norm_bytes(mc, BT: int) -> int:
    """Bytes a norm saves besides its input: RMSNorm keeps the normalised x (fp32) and
    the rsqrt statistic; LayerNorm keeps mean and rstd."""
    if mc.norm == "rmsnorm":
        return BT * mc.d_model * 4 + BT * 4
    return 2 * BT * 4


def active_layers(cfg) -> int:
    """Layers that can be active in one step at most (the peak): ``fixed`` runs its list,
    ``adaptive`` at most ``max_slots``; random modes may keep every layer."""
    sc, n = cfg.slots, cfg.model.n_layer
    if sc.mode == "fixed" and sc.fixed:
        return len(sc.fixed)
    if sc.mode == "adaptive":
        return min(n, sc.max_slots or n)
    return n


def _outside_layers_bytes(cfg: RaydratConfig, precision: str, batch_size: int | None = None) -> tuple[int, int]:
    """(embedding + final norm + head input, log-softmax) bytes kept alive after forward."""
    mc = cfg.model
    e = _compute_bytes(precision)
    B, T, C, V = batch_size or cfg.train.batch_size, mc.seq_len, mc.d_model, mc.vocab_size
    BT = B * T
    outside = BT * C * 4  # the last layer's output, kept by the final norm
    outside += _norm_bytes(mc, BT) + BT * C * e  # the norm's saved tensors, head input (cast under autocast)
    if e != 4:
        outside += V * C * e  # autocast copy of the head weight
    if mc.dropout > 0:
        outside += BT * C  # embedding dropout mask
    return outside, BT * V * 4


def stored_plan(cfg: RaydratConfig, costs: list[BranchCost], layers: int, precision: str) -> list[bool]:
    """Which branches store their activations under the configured plan (for the
    estimate): ``none`` and ``gated`` (worst case, every gate may store) store all;
    ``gated`` with ``recompute.budget_mb`` never plans past the budget, so its worst case
    is the fullest set of branches that fits."""
    rc = cfg.recompute
    n = 2 * layers
    if rc.mode == "full":
        return [False] * n
    if rc.budget_mb is not None:
        base = sum(c.input_bytes for c in costs[:n]) + sum(_outside_layers_bytes(cfg, precision))
        chosen = costs[:n]
        if rc.mode == "gated":  # the fullest plan that fits: knapsack with value = bytes
            chosen = [dataclasses.replace(c, recompute_flops=c.stored_bytes) for c in chosen]
        return solve_budget(chosen, int(rc.budget_mb * 2**20) - base).stored
    return [True] * n


def activation_plan_bounds(cfg: RaydratConfig, device: str, precision: str) -> tuple[int, int]:
    """(every branch recomputed, every branch stored) saved bytes after forward."""
    costs = branch_costs(cfg, device, precision)[: 2 * active_layers(cfg)]
    base = sum(c.input_bytes for c in costs) + sum(_outside_layers_bytes(cfg, precision))
    return base, base + sum(c.stored_bytes for c in costs)


def estimate_memory(cfg: RaydratConfig, device: str = "cpu", precision: str = "fp32") -> MemoryEstimate:
    """Predicted peak training memory per worker for ``cfg`` (a :class:`RaydratConfig`).

    The total is the sum of the components, an upper bound of the peak at the start of
    backward: fp32 parameters, fp32 gradients (all allocated by the end of backward),
    optimizer states, activations kept for backward (per-op accounting of this model, for
    the precision, recomputation policy, slots, batch, sequence length and attention
    kernel), and the logits (held logits, the loss's saved log-softmax and the two
    (B, T, V) gradients of the loss's backward), which dominate small models.
    ``device`` (``cpu`` | ``cuda``) and ``precision`` (resolved: never ``auto``) are the
    run's, from :func:`raydrat.core.runtime.resolve`.
    """
    mc = cfg.model
    e = _compute_bytes(precision)
    meta = _meta_model(mc)
    shapes = [p.numel() for p in meta.parameters()]
    params = 4 * sum(shapes)
    layers = active_layers(cfg)
    costs = branch_costs(cfg, device, precision)[: 2 * layers]
    stored = stored_plan(cfg, costs, layers, precision)
    outside, log_softmax = _outside_layers_bytes(cfg, precision)
    layer_bytes = sum(c.input_bytes + (c.stored_bytes if s else 0) for c, s in zip(costs, stored))
    B, T, V = cfg.train.batch_size, mc.seq_len, mc.vocab_size
    logits = log_softmax + B * T * V * e + 2 * B * T * V * 4
    components = {
        "params": params,
        "grads": params,
        "optimizer": _optimizer_state_bytes_for(shapes, cfg.optim.name),
        "activations": layer_bytes + outside,
        "logits": logits,
    }
    detail = {
        "saved_bytes": layer_bytes + outside + log_softmax,
        "device": device,
        "precision": precision,
        "active_layers": layers,
        "stored_branches": sum(stored),
        "branches": len(stored),
        "attention_matrix": attention_keeps_matrix(mc, device),
    }
    return MemoryEstimate(total_bytes=sum(components.values()), components=components, detail=detail)


