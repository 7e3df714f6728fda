"""What the model keeps alive for backward, per branch and outside the layer stack: the
per-op accounting of :mod:`raydrat.core.model.transformer` under a precision, an attention
kernel, a recompute plan and the active layers (checked op by op against
:func:`raydrat.core.techniques.recompute.measure.saved_activation_bytes`).

Units: bytes. B micro-batch, T seq_len, C d_model, H heads, K kv heads, F MLP width, V vocab,
e bytes of the compute dtype (4 fp32, 2 bf16/fp16). The residual stream, norm statistics and
the loss's log-softmax stay fp32 under autocast."""

from __future__ import annotations

import dataclasses

import torch

from raydrat.config.model import ModelConfig
from raydrat.config.run import RaydratConfig
from raydrat.core.model.transformer import GQA_BACKENDS, SDPA_ENABLE_GQA, sdpa_grouped_heads
from raydrat.core.techniques.recompute.branch_costs import BranchCost
from raydrat.core.techniques.recompute.knapsack import solve_budget


def compute_bytes(precision: str) -> int:
    return 4 if precision == "fp32" else 2


def attention_keeps_matrix(mcfg, device: str) -> bool:
    """Whether SDPA stores the (B, H, T, T) attention matrix (math kernel)."""
    if mcfg.attention_backend == "math":
        return True
    return mcfg.attention_backend == "auto" and device == "cpu" and mcfg.dropout > 0


def branch_costs(cfg: RaydratConfig, device: str, precision: str, batch_size: int | None = None) -> list[BranchCost]:
    """Analytic per-branch costs for every layer (the budget solver's input)."""
    mc = cfg.model
    e = compute_bytes(precision)
    mixed = e != 4
    B, T, C, H, K, F, D = (
        batch_size or cfg.train.batch_size,
        mc.seq_len,
        mc.d_model,
        mc.n_head,
        mc.kv_heads,
        mc.ff_dim,
        mc.head_dim,
    )
    BT, KD = B * T, K * D
    drop = mc.dropout > 0

    # norm: its own saved tensors; in fp32 the norm's output is kept by the projections,
    # under autocast each projection keeps its own cast of it.
    def norm_and_proj_inputs(n_proj: int) -> int:
        return norm_bytes(mc, BT) + (n_proj * BT * C * e if mixed else BT * C * 4)

    attn = norm_and_proj_inputs(3)
    # k, v: at K heads into a fused kernel that takes grouped heads; else repeated to H heads
    grouped = sdpa_takes_grouped_heads(mc, device, torch.bfloat16 if mixed else torch.float32)
    kv_width = KD if grouped and not attention_keeps_matrix(mc, device) else C
    attn += BT * C * e + 2 * BT * kv_width * e  # q, k, v as SDPA keeps them
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


def sdpa_takes_grouped_heads(mc, device: str, dtype: torch.dtype) -> bool:
    """Whether the model hands SDPA its ``n_kv_head`` key/value heads unrepeated."""
    return (
        mc.kv_heads != mc.n_head
        and SDPA_ENABLE_GQA
        and mc.attention_backend in GQA_BACKENDS
        and sdpa_grouped_heads(device, dtype)
    )


def norm_bytes(mc, BT: int) -> int:
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


def outside_layers_bytes(cfg: RaydratConfig, precision: str, batch_size: int | None = None) -> tuple[int, int]:
    """(embedding + final norm + head input, log-softmax) bytes kept alive after forward."""
    mc = cfg.model
    e = compute_bytes(precision)
    B, T, C, V = batch_size or cfg.train.batch_size, mc.seq_len, mc.d_model, mc.vocab_size
    BT = B * T
    outside = BT * C * 4  # the last layer's output, kept by the final norm
    outside += norm_bytes(mc, BT) + BT * C * e  # the norm's saved tensors, head input (cast under autocast)
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
        base = sum(c.input_bytes for c in costs[:n]) + sum(outside_layers_bytes(cfg, precision))
        chosen = costs[:n]
        if rc.mode == "gated":  # the fullest plan that fits: knapsack with value = bytes
            chosen = [dataclasses.replace(c, recompute_flops=c.stored_bytes) for c in chosen]
        room = int(rc.budget_mb * 2**20) - base
        if rc.granularity == "op":  # op plans reach below every-branch-recomputed: bounded by it
            room = max(0, room)
        return solve_budget(chosen, room).stored
    return [True] * n


def activation_plan_bounds(cfg: RaydratConfig, device: str, precision: str) -> tuple[int, int]:
    """(least achievable, every branch stored) saved bytes after forward. The least:
    every branch recomputed (per-branch plans keep both branch inputs of a layer); for
    ``recompute.granularity: op`` every block recomputed (one input per block; compiled:
    only the blocks' outputs)."""
    costs = branch_costs(cfg, device, precision)[: 2 * active_layers(cfg)]
    outside = sum(outside_layers_bytes(cfg, precision))
    base = sum(c.input_bytes for c in costs) + outside
    top = base + sum(c.stored_bytes for c in costs)
    if cfg.recompute.granularity == "op" and cfg.compile.enabled:
        # one SAC region over the compiled forward: every block's output stored, the rest
        # (embedding, head, the loss's log-softmax) may be recomputed
        base = sum(c.input_bytes for c in costs if c.kind == "attn")
    elif cfg.recompute.granularity == "op":
        base = sum(c.input_bytes for c in costs if c.kind == "attn") + outside
    return base, top


def branch_backward_bytes(mc: ModelConfig, kind: str, BT: int, e: int) -> int:
    """The working set of one branch's backward above what it keeps (measured on the
    allocator): the weight gradient of its output projection (fp32; under autocast also
    its compute-dtype original) and the activation gradients alive at once: for attention
    the gradient of SDPA's output and of q, k, v at every query head; for the MLP the
    gradient of its hidden state and, gated, of both factors."""
    C, F, HD = mc.d_model, mc.ff_dim, mc.n_head * mc.head_dim
    w = 4 if e == 4 else 4 + e
    if kind == "attn":
        return HD * C * w + 4 * BT * HD * e
    return C * F * w + (2 if mc.gated_mlp else 1) * BT * F * e
