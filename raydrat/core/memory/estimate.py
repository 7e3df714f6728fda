"""The analytic estimate of a config's peak training memory per worker, by component.

Per-op accounting of what the model in :mod:`raydrat.core.model.transformer` keeps alive for
backward (checked op by op against :func:`raydrat.core.techniques.recompute.measure.saved_activation_bytes`;
see docs/efficiency.md). Units: bytes. B micro-batch, T seq_len, C d_model, H heads, K kv
heads, F MLP width, V vocab, e bytes of the compute dtype (4 fp32, 2 bf16/fp16). The residual
stream, norm statistics and the loss's log-softmax stay fp32 under autocast.

Every function takes the device type (``cpu`` | ``cuda``) and the resolved precision
(``fp32`` | ``bf16`` | ``fp16``): deciding them is :func:`raydrat.core.runtime.resolve`'s job.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass, field
from typing import Any

import torch

from raydrat.config.model import ModelConfig
from raydrat.config.run import RaydratConfig
from raydrat.core.model.transformer import GPT, GQA_BACKENDS, SDPA_ENABLE_GQA, sdpa_grouped_heads
from raydrat.core.techniques.base import StepPlan
from raydrat.core.techniques.recompute.branch_costs import BranchCost
from raydrat.core.techniques.recompute.knapsack import solve_budget

COMPONENTS = ("params", "optimizer", "grads", "activations", "transient")
"""The estimate's components: what is alive at the predicted peak of a training step
(``params``: the fp32 parameters and the model's buffers)."""
MIN_8BIT_NUMEL = 4096
"""bitsandbytes keeps 32-bit states for tensors with fewer elements than this."""
BNB_BLOCK = 256
"""bitsandbytes block size: one fp32 absmax per state per block; two 256-entry fp32 maps
shared by all tensors."""


@dataclass
class MemoryEstimate:
    """Predicted peak training memory of one worker (bytes): what PyTorch's allocator holds
    at the highest point of a steady training step, by component (:data:`COMPONENTS`:
    parameters, optimizer states, the gradients alive at that moment, the saved
    activations alive then, and the step's transient bytes there: the loss's
    temporaries, the backward or recompute working set, or the optimizer step's).

    ``detail["phases"]``: the predicted peak of each phase (``forward``, ``loss_backward``,
    ``layers_backward``, ``optimizer``), each a total; ``detail["peak_phase"]`` names the
    highest (with the branch, for the layer stack); ``detail["transient"]`` splits the
    transient bytes at the peak."""

    total_bytes: int
    components: dict[str, int]
    detail: dict[str, Any] = field(default_factory=dict)

    @property
    def saved_bytes(self) -> int:
        """Activation bytes alive after forward, as ``saved_activation_bytes`` measures
        them (layer activations plus the loss's saved log-softmax)."""
        return int(self.detail["saved_bytes"])

    @property
    def phases(self) -> dict[str, int]:
        return dict(self.detail["phases"])

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
    if name == "sgd":
        return 0  # no momentum: no state
    if name in ("adamw", "adamw_fused"):
        return sum(2 * 4 * n + 4 for n in shapes)  # exp_avg, exp_avg_sq (fp32), step (fp32 scalar)
    total = 0
    for n in shapes:  # bitsandbytes 8-bit: uint8 moments + block absmax
        if n < MIN_8BIT_NUMEL:
            total += 2 * 4 * n
        else:
            total += 2 * n + 2 * 4 * math.ceil(n / BNB_BLOCK)
    if any(n >= MIN_8BIT_NUMEL for n in shapes):
        total += 2 * 4 * 256  # the two 256-entry fp32 quantisation maps, shared by every tensor
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
        return _norm_bytes(mc, BT) + (n_proj * BT * C * e if mixed else BT * C * 4)

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
    outside = sum(_outside_layers_bytes(cfg, precision))
    base = sum(c.input_bytes for c in costs) + outside
    top = base + sum(c.stored_bytes for c in costs)
    if cfg.recompute.granularity == "op" and cfg.compile.enabled:
        # one SAC region over the compiled forward: every block's output stored, the rest
        # (embedding, head, the loss's log-softmax) may be recomputed
        base = sum(c.input_bytes for c in costs if c.kind == "attn")
    elif cfg.recompute.granularity == "op":
        base = sum(c.input_bytes for c in costs if c.kind == "attn") + outside
    return base, top


@dataclass(frozen=True)
class _Layout:
    """What the estimate needs of the model's tensors (from one meta-device build)."""

    shapes: tuple[int, ...]
    """Element count of every parameter (a tied weight once)."""
    layer_shapes: tuple[tuple[int, ...], ...]
    """Element counts of each layer's parameters."""
    attn_bytes: int
    """fp32 bytes of one attention branch's parameters (its norm included)."""
    mlp_bytes: int
    buffer_bytes: int
    """The model's buffers (RoPE's cos/sin tables, fp32)."""
    groups: tuple[int, int]
    """fp32 bytes of the two optimizer groups: matrices (decayed), vectors (not)."""


@functools.lru_cache(maxsize=64)
def _layout_of(model_json: str) -> _Layout:
    meta = _meta_model(ModelConfig.model_validate_json(model_json))
    params = list(meta.parameters())  # a tied weight once
    block = meta.layers["0"]
    mats = sum(4 * p.numel() for p in params if p.dim() >= 2)
    return _Layout(
        shapes=tuple(p.numel() for p in params),
        layer_shapes=tuple(tuple(p.numel() for p in b.parameters()) for b in meta.layers.values()),
        attn_bytes=4 * sum(p.numel() for p in block.attn_branch.parameters()),
        mlp_bytes=4 * sum(p.numel() for p in block.mlp_branch.parameters()),
        buffer_bytes=sum(4 * b.numel() for b in meta.buffers()),
        groups=(mats, 4 * sum(p.numel() for p in params) - mats),
    )


def _layout(mc: ModelConfig) -> _Layout:
    """The model's tensor layout, built once per model config (a meta-device GPT)."""
    return _layout_of(mc.model_dump_json())


def _trained_shapes(cfg: RaydratConfig, layout: _Layout) -> list[int]:
    """The parameters that ever get a gradient, hence optimizer state (states are created
    at a parameter's first gradient): with ``slots.mode: fixed`` the layers not listed never run."""
    sc = cfg.slots
    if sc.mode != "fixed" or not sc.fixed:
        return list(layout.shapes)
    shapes = list(layout.shapes)
    for i, layer in enumerate(layout.layer_shapes):
        if i not in set(sc.fixed):
            for n in layer:
                shapes.remove(n)
    return shapes


def _optimizer_step_bytes(shapes: list[int], name: str, device: str, groups: tuple[int, int]) -> int:
    """Temporaries of one optimizer step (bytes, beyond the gradients and states).

    CPU: torch's AdamW runs tensor by tensor (``foreach`` is for CUDA tensors): ``sqrt``
    and the division of the second moment, two tensors of the largest parameter;
    ``fused`` none. bitsandbytes' CPU 8-bit step dequantises both moments and works in
    fp32: five fp32 tensors of the largest parameter (measured). CUDA: the foreach step
    keeps ``sqrt(exp_avg_sq)`` for the larger of the two parameter groups (weight decay /
    none); fused and bitsandbytes kernels work in place. SGD with weight decay: one tensor
    (CPU) or the larger group (CUDA) for ``grad + wd * param``."""
    largest = 4 * max(shapes)
    if name == "adamw_fused":
        return 0
    if name in ("adamw8bit", "paged_adamw8bit"):
        big = [n for n in shapes if n >= MIN_8BIT_NUMEL]
        return 5 * 4 * max(big) if device == "cpu" and big else (2 * largest if device == "cpu" else 0)
    if name == "adamw":
        return 2 * largest if device == "cpu" else max(groups)
    return largest if device == "cpu" else max(groups)  # sgd


def _branch_backward_bytes(mc: ModelConfig, kind: str, BT: int, e: int) -> int:
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


def estimate_memory(
    cfg: RaydratConfig, device: str = "cpu", precision: str = "fp32", plan: StepPlan | None = None
) -> MemoryEstimate:
    """Predicted peak bytes PyTorch's allocator holds in a steady training step of ``cfg``
    (a :class:`RaydratConfig`), per worker: the highest point over the phases of the step
    as :func:`raydrat.core.step.train_step` runs them, each micro-batch of the accumulation.

    * persistent: fp32 parameters and the optimizer states (all optimizers; 8-bit included);
    * forward: the saved activations (per-op accounting of this model, for the precision,
      recompute plan, active layers, batch, sequence length and attention kernel; a
      recomputed branch runs its forward without keeping it), then the logits with, under
      autocast, their fp32 copy while the log-softmax is taken (the logits are not kept);
    * loss backward: every saved activation (the cross-entropy's gradient is written into
      its saved log-probabilities in place) and, under autocast, its cast to the logits' dtype;
    * layers backward, branch by branch from the last: the gradients allocated so far, the
      residual-stream gradient, the activations still saved, the branch's recomputed
      activations (a recomputed branch) and its backward working set;
    * optimizer: every gradient and the step's temporaries.

    With ``train.grad_accum > 1`` every micro-batch after the first runs with all
    gradients allocated. ``device`` (``cpu`` | ``cuda``) and ``precision`` (resolved: never
    ``auto``) are the run's, from :func:`raydrat.core.runtime.resolve`. ``plan``: the
    step's active layers and stored branches (default: the worst case the config allows:
    every layer a random schedule may keep; every gate storing unless a budget caps it).
    """
    mc = cfg.model
    e = _compute_bytes(precision)
    mixed = e != 4
    B, T, C, V = cfg.train.batch_size, mc.seq_len, mc.d_model, mc.vocab_size
    BT = B * T
    layout = _layout(mc)
    shapes, attn_params, mlp_params, buffers = (
        list(layout.shapes),
        layout.attn_bytes,
        layout.mlp_bytes,
        layout.buffer_bytes,
    )
    params = 4 * sum(shapes)
    optimizer = _optimizer_state_bytes_for(_trained_shapes(cfg, layout), cfg.optim.name)

    plan = plan or StepPlan()
    layers = len(plan.active) if plan.active is not None else active_layers(cfg)
    costs = branch_costs(cfg, device, precision)[: 2 * layers]
    stored = list(plan.stored) if plan.stored is not None else stored_plan(cfg, costs, layers, precision)
    if len(stored) != len(costs):
        raise ValueError(f"plan.stored has {len(stored)} entries for {len(costs)} branches of {layers} layers")
    outside, log_softmax = _outside_layers_bytes(cfg, precision)
    # full: one region per block keeps the block's input (the attention branch's) only
    per_block = cfg.recompute.mode == "full" and not any(stored)
    kept = [
        (0 if per_block and c.kind == "mlp" else c.input_bytes) + (c.stored_bytes if s else 0)
        for c, s in zip(costs, stored)
    ]
    # what a recomputed branch brings back in backward: per block, the MLP's backward runs
    # with the whole block recomputed (attention's saved tensors, the MLP's input and its own)
    recomputed_bytes = []
    for i, c in enumerate(costs):
        if per_block and c.kind == "mlp":
            recomputed_bytes.append(costs[i - 1].stored_bytes + c.input_bytes + c.stored_bytes)
        else:
            recomputed_bytes.append(c.stored_bytes)
    saved = sum(kept) + outside + log_softmax  # after forward
    branch_params = [attn_params if c.kind == "attn" else mlp_params for c in costs]
    grads_all = params - (mc.n_layer - layers) * (attn_params + mlp_params)  # inactive layers get none
    head_grads = grads_all - sum(branch_params)  # embedding (tied head), final norm, untied head
    accumulating = cfg.train.grad_accum > 1  # the later micro-batches run with every gradient
    g0 = grads_all if accumulating else 0
    residual = BT * C * 4  # the residual stream's gradient, alive through the layer stack
    logits = BT * V * e + (BT * V * 4 if mixed else 0)  # the logits (+ fp32 copy) during the loss
    # cross-entropy backward (the model's CrossEntropy): the gradient is written into the
    # saved log-probabilities in place; under autocast it is cast to the logits' dtype
    loss_grads = BT * V * e if mixed else 0

    at: dict[str, dict[str, int]] = {}  # per phase: grads, activations, transient at its peak

    # forward: a recomputed branch holds its activations only while it runs
    prefix, fwd_best = 0, (0, 0)
    for c, s, k in zip(costs, stored, kept):
        # a region's forward holds the branch's activations while it runs (per block: the
        # block input is kept, the MLP's input is not)
        held = k if s else (c.input_bytes if not per_block or c.kind == "attn" else 0)
        transient = c.stored_bytes + (c.input_bytes if per_block and c.kind == "mlp" else 0)
        if not s and prefix + held + transient > sum(fwd_best):
            fwd_best = (prefix + held, transient)
        prefix += k
    end = (saved, logits)
    fwd = max(fwd_best, end, key=sum)
    at["forward"] = {"grads": g0, "activations": fwd[0], "transient": fwd[1]}
    at["loss_backward"] = {"grads": g0, "activations": saved, "transient": loss_grads}

    # the layer stack's backward, last branch first
    remaining = sum(kept)
    grads = g0 or head_grads
    best = None
    for i in reversed(range(len(costs))):
        c, s = costs[i], stored[i]
        work = _branch_backward_bytes(mc, c.kind, BT, e) + residual
        recompute = 0 if s else recomputed_bytes[i]
        total = grads + remaining + recompute + work
        if best is None or total > best[0]:
            best = (total, i, grads, remaining, recompute, work)
        remaining -= kept[i]
        grads = g0 or grads + branch_params[i]
    if best is not None:
        total, i, g, rem, recomputed, work = best
        at["layers_backward"] = {"grads": g, "activations": rem, "transient": recomputed + work}
        branch = f"layer {costs[i].layer} {costs[i].kind}{'' if stored[i] else ' (recomputed)'}"
    else:
        branch, recomputed, work = None, 0, 0
    opt_tmp = _optimizer_step_bytes(shapes, cfg.optim.name, device, layout.groups)
    at["optimizer"] = {"grads": grads_all, "activations": 0, "transient": opt_tmp}

    persistent = {"params": params + buffers, "optimizer": optimizer}
    per_phase = {k: {**persistent, **v} for k, v in at.items()}
    fsdp = None
    if cfg.sync.mode == "fsdp" and cfg.scaling.num_workers > 1:
        per_phase, fsdp = _fsdp_phases(cfg, layout, params, buffers, optimizer, grads_all, at, accumulating)

    if cfg.recompute.mode != "none":
        # the planner measures its costs with a forward of every layer, every branch stored
        # (first step; gated: every gates.refresh_every steps): outside the training step
        all_costs = branch_costs(cfg, device, precision)
        every = sum(c.input_bytes + c.stored_bytes for c in all_costs) + outside + log_softmax
        planning = params + buffers + optimizer + every + logits
    else:
        planning = None
    totals = {k: sum(v.values()) for k, v in per_phase.items()}
    peak_phase = max(totals, key=totals.get)
    components = dict(per_phase[peak_phase])
    transient_parts = {
        "forward": {"logits": fwd[1]} if fwd is end else {"recompute": fwd[1]},
        "loss_backward": {"loss_grads": loss_grads},
        "layers_backward": {"recompute_working_set": recomputed, "backward_working_set": work},
        "optimizer": {"optimizer_step": opt_tmp},
    }[peak_phase]
    detail = {
        "saved_bytes": saved,
        "device": device,
        "precision": precision,
        "active_layers": layers,
        "stored_branches": sum(stored),
        "branches": len(stored),
        "attention_matrix": attention_keeps_matrix(mc, device),
        "phases": totals,
        "peak_phase": peak_phase.replace("_", " ") + (f" ({branch})" if peak_phase == "layers_backward" else ""),
        "transient": transient_parts,
        "grad_accumulation": accumulating,
        "grads_bytes": grads_all,
        "logits_bytes": BT * V * e,
        "planning_peak_bytes": planning,
    }
    if fsdp is not None:
        detail["fsdp"] = fsdp
    return MemoryEstimate(total_bytes=sum(components.values()), components=components, detail=detail)


# -- FSDP: the training state divided by the workers -------------------------------------


def _fsdp_phases(
    cfg: RaydratConfig,
    layout: _Layout,
    params: int,
    buffers: int,
    optimizer: int,
    grads_all: int,
    at: dict[str, dict[str, int]],
    accumulating: bool,
) -> tuple[dict[str, dict[str, int]], dict]:
    """``sync.mode=fsdp`` (``fully_shard`` per block, then the root): each worker holds
    ``1 / W`` of the parameters, gradients and optimizer state (``W = scaling.num_workers``;
    buffers are replicated), plus, in forward and backward, the unsharded parameters of the
    root group (embedding, final norm: gathered at the first forward, held to the end of
    backward) and of two blocks (the one computing and the one prefetched); in the layer
    stack's backward also the unsharded gradients of the root and of one block before their
    reduce-scatter. With ``train.grad_accum > 1`` the micro-batches before the last
    accumulate unsharded gradients (``set_requires_gradient_sync(False)``): every gradient,
    whole, until the optimizer phase. Returns each phase's components and ``detail["fsdp"]``."""
    W = cfg.scaling.num_workers
    block = layout.attn_bytes + layout.mlp_bytes
    root = max(0, params - cfg.model.n_layer * block)
    gathered_params = min(params, root + 2 * block)
    gathered_grads = min(params, root + block)
    sharded = {
        "params": math.ceil(params / W) + buffers,
        "grads": math.ceil(grads_all / W),
        "optimizer": math.ceil(optimizer / W),
    }
    out = {}
    for phase, parts in at.items():
        g = parts["grads"]
        if phase == "optimizer" or not accumulating:
            g = math.ceil(g / W) + (min(g, gathered_grads) if phase == "layers_backward" else 0)
        out[phase] = {
            "params": sharded["params"] + (0 if phase == "optimizer" else gathered_params),
            "optimizer": sharded["optimizer"],
            **parts,
            "grads": g,
        }
    return out, {
        "workers": W,
        "sharded": sharded,
        "replicated_buffers": buffers,
        "gathered": {"params": gathered_params, "grads": gathered_grads, "optimizer": 0},
    }
