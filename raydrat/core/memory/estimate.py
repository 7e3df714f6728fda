"""The analytic estimate of a config's peak training memory per worker, by component and by
phase of the training step.

The parts are estimated in their own modules: what the model keeps for backward
(:mod:`.activations`, per-op accounting checked op by op against
:func:`raydrat.core.techniques.recompute.measure.saved_activation_bytes`; see
docs/efficiency.md) and the parameters, optimizer states and optimizer step
(:mod:`.states`). This module walks one training step phase by phase (forward, the loss's
backward, the layer stack's backward branch by branch, the optimizer step) and reports the
highest point. Units: bytes.

Every function takes the device type (``cpu`` | ``cuda``) and the resolved precision
(``fp32`` | ``bf16`` | ``fp16``): deciding them is :func:`raydrat.core.runtime.resolve`'s job.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from raydrat.config.run import RaydratConfig
from raydrat.core.memory.activations import (
    active_layers,
    attention_keeps_matrix,
    branch_backward_bytes,
    branch_costs,
    compute_bytes,
    outside_layers_bytes,
    stored_plan,
)
from raydrat.core.memory.states import (
    Layout,
    model_layout,
    optimizer_state_bytes,
    optimizer_step_bytes,
    trained_shapes,
)
from raydrat.core.techniques.base import StepPlan
from raydrat.core.techniques.recompute.branch_costs import BranchCost

COMPONENTS = ("params", "optimizer", "grads", "activations", "transient")
"""The estimate's components: what is alive at the predicted peak of a training step
(``params``: the fp32 parameters and the model's buffers)."""


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


@dataclass
class _Branches:
    """The step's branches as the estimate walks them: their costs, which store their
    activations, and what each keeps after forward and brings back when recomputed."""

    layers: int
    costs: list[BranchCost]
    stored: list[bool]
    per_block: bool
    """``recompute.mode: full``: one region per block keeps the block's (attention's) input only."""
    kept: list[int] = field(default_factory=list)
    recomputed: list[int] = field(default_factory=list)

    @classmethod
    def of(cls, cfg: RaydratConfig, device: str, precision: str, plan: StepPlan) -> _Branches:
        layers = len(plan.active) if plan.active is not None else active_layers(cfg)
        costs = branch_costs(cfg, device, precision)[: 2 * layers]
        stored = list(plan.stored) if plan.stored is not None else stored_plan(cfg, costs, layers, precision)
        if len(stored) != len(costs):
            raise ValueError(f"plan.stored has {len(stored)} entries for {len(costs)} branches of {layers} layers")
        b = cls(layers, costs, stored, per_block=cfg.recompute.mode == "full" and not any(stored))
        b.kept = [
            (0 if b.per_block and c.kind == "mlp" else c.input_bytes) + (c.stored_bytes if s else 0)
            for c, s in zip(costs, stored)
        ]
        # per block, the MLP's backward runs with the whole block recomputed (attention's
        # saved tensors, the MLP's input and its own)
        b.recomputed = [
            costs[i - 1].stored_bytes + c.input_bytes + c.stored_bytes
            if b.per_block and c.kind == "mlp"
            else c.stored_bytes
            for i, c in enumerate(costs)
        ]
        return b

    def forward_peak(self, saved: int, logits: int) -> tuple[tuple[int, int], bool]:
        """(activations, transient) at forward's highest point, and whether that is the
        end of forward (the logits) rather than a recomputed branch running: a region's
        forward holds the branch's activations only while it runs (per block: the block
        input is kept, the MLP's input is not)."""
        prefix, best = 0, (0, 0)
        for c, s, k in zip(self.costs, self.stored, self.kept):
            held = k if s else (c.input_bytes if not self.per_block or c.kind == "attn" else 0)
            transient = c.stored_bytes + (c.input_bytes if self.per_block and c.kind == "mlp" else 0)
            if not s and prefix + held + transient > sum(best):
                best = (prefix + held, transient)
            prefix += k
        end = (saved, logits)
        peak = max(best, end, key=sum)
        return peak, peak is end

    def backward_peak(
        self, work_of: Any, grads_start: int, accumulating_grads: int, branch_params: list[int]
    ) -> tuple[int, int, int, int, int] | None:
        """The layer stack's backward, last branch first: (branch index, gradients, saved
        activations still alive, recomputed bytes, working set) at its highest point.
        ``work_of(branch)``: the branch's backward working set."""
        remaining, grads, best = sum(self.kept), grads_start, None
        for i in reversed(range(len(self.costs))):
            work = work_of(self.costs[i])
            recompute = 0 if self.stored[i] else self.recomputed[i]
            total = grads + remaining + recompute + work
            if best is None or total > best[0]:
                best = (total, i, grads, remaining, recompute, work)
            remaining -= self.kept[i]
            grads = accumulating_grads or grads + branch_params[i]
        return None if best is None else best[1:]


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
    e = compute_bytes(precision)
    mixed = e != 4
    BT, C, V = cfg.train.batch_size * mc.seq_len, mc.d_model, mc.vocab_size
    layout = model_layout(mc)
    params, buffers = 4 * sum(layout.shapes), layout.buffer_bytes
    optimizer = optimizer_state_bytes(trained_shapes(cfg, layout), cfg.optim.name)
    b = _Branches.of(cfg, device, precision, plan or StepPlan())
    outside, log_softmax = outside_layers_bytes(cfg, precision)
    saved = sum(b.kept) + outside + log_softmax  # after forward
    branch_params = [layout.attn_bytes if c.kind == "attn" else layout.mlp_bytes for c in b.costs]
    grads_all = params - (mc.n_layer - b.layers) * (layout.attn_bytes + layout.mlp_bytes)  # inactive: none
    accumulating = cfg.train.grad_accum > 1  # the later micro-batches run with every gradient
    g0 = grads_all if accumulating else 0
    logits = BT * V * e + (BT * V * 4 if mixed else 0)  # the logits (+ fp32 copy) during the loss
    # cross-entropy backward writes its gradient into the saved log-probabilities in place;
    # under autocast it is cast to the logits' dtype
    loss_grads = BT * V * e if mixed else 0

    fwd, at_end = b.forward_peak(saved, logits)
    at: dict[str, dict[str, int]] = {  # per phase: grads, activations, transient at its peak
        "forward": {"grads": g0, "activations": fwd[0], "transient": fwd[1]},
        "loss_backward": {"grads": g0, "activations": saved, "transient": loss_grads},
    }
    residual = BT * C * 4  # the residual stream's gradient, alive through the layer stack
    head_grads = grads_all - sum(branch_params)  # embedding (tied head), final norm, untied head
    best = b.backward_peak(
        lambda c: branch_backward_bytes(mc, c.kind, BT, e) + residual, g0 or head_grads, g0, branch_params
    )
    branch, recomputed, work = None, 0, 0
    if best is not None:
        i, g, rem, recomputed, work = best
        at["layers_backward"] = {"grads": g, "activations": rem, "transient": recomputed + work}
        branch = f"layer {b.costs[i].layer} {b.costs[i].kind}{'' if b.stored[i] else ' (recomputed)'}"
    opt_tmp = optimizer_step_bytes(list(layout.shapes), cfg.optim.name, device, layout.groups)
    at["optimizer"] = {"grads": grads_all, "activations": 0, "transient": opt_tmp}

    per_phase = {k: {"params": params + buffers, "optimizer": optimizer, **v} for k, v in at.items()}
    fsdp = None
    if cfg.sync.mode == "fsdp" and cfg.scaling.num_workers > 1:
        per_phase, fsdp = _fsdp_phases(cfg, layout, params, buffers, optimizer, grads_all, at, accumulating)
    totals = {k: sum(v.values()) for k, v in per_phase.items()}
    peak_phase = max(totals, key=totals.get)
    components = dict(per_phase[peak_phase])
    detail = {
        "saved_bytes": saved,
        "device": device,
        "precision": precision,
        "active_layers": b.layers,
        "stored_branches": sum(b.stored),
        "branches": len(b.stored),
        "attention_matrix": attention_keeps_matrix(mc, device),
        "phases": totals,
        "peak_phase": peak_phase.replace("_", " ") + (f" ({branch})" if peak_phase == "layers_backward" else ""),
        "transient": {
            "forward": {"logits": fwd[1]} if at_end else {"recompute": fwd[1]},
            "loss_backward": {"loss_grads": loss_grads},
            "layers_backward": {"recompute_working_set": recomputed, "backward_working_set": work},
            "optimizer": {"optimizer_step": opt_tmp},
        }[peak_phase],
        "grad_accumulation": accumulating,
        "grads_bytes": grads_all,
        "logits_bytes": BT * V * e,
        "planning_peak_bytes": _planning_peak(cfg, device, precision, params + buffers + optimizer + logits),
    }
    if fsdp is not None:
        detail["fsdp"] = fsdp
    return MemoryEstimate(total_bytes=sum(components.values()), components=components, detail=detail)


def _planning_peak(cfg: RaydratConfig, device: str, precision: str, held: int) -> int | None:
    """The recompute planner's measuring forward (every layer, every branch stored; first
    step, and every ``gates.refresh_every`` steps when gated): outside the training step.
    ``held``: parameters, buffers, optimizer states and the logits."""
    if cfg.recompute.mode == "none":
        return None
    every = sum(c.input_bytes + c.stored_bytes for c in branch_costs(cfg, device, precision))
    return held + every + sum(outside_layers_bytes(cfg, precision))


# -- FSDP: the training state divided by the workers -------------------------------------


def _fsdp_phases(
    cfg: RaydratConfig,
    layout: Layout,
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
