"""Memory: measurement from real tensors, and the analytic estimate of a config's peak.

``saved_activation_bytes`` measures what a forward pass leaves alive for backward;
``param_bytes``, ``grad_bytes`` and ``optimizer_state_bytes`` sum the other training-state
tensors. All results are in bytes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import itertools
import math
import weakref
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class _StorageRecorder(TorchDispatchMode):
    """Keeps a weak reference to the storage of every op output, by storage address.

    A later storage at the same address replaces an earlier one: if both were alive they
    would be the same storage (in-place ops, views), so the latest reference is enough.
    """

    def __init__(self, exclude: set[int]):
        super().__init__()
        self.exclude = exclude
        self.storages: dict[int, weakref.ref] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                ptr = storage.data_ptr()
                if ptr and ptr not in self.exclude:
                    self.storages[ptr] = weakref.ref(storage)
        return out

    def alive_bytes(self) -> int:
        gc.collect()
        alive = (ref() for ref in self.storages.values())
        return sum(s.nbytes() for s in alive if s is not None)


def saved_activation_bytes(
    model: nn.Module, idx: torch.Tensor, targets: torch.Tensor, context: Any = None, **forward_kwargs: Any
) -> int:
    """Bytes of activation storage a forward pass keeps alive until backward.

    Runs ``model(idx, targets)`` in the model's current mode (call ``model.train()`` to
    measure training), drops the logits, and sums the storages created during forward
    that are still alive: exactly what the autograd graph (and the loss) holds, whatever
    mechanism holds it. Parameters, buffers and the inputs are excluded.

    Why not ``torch.autograd.graph.saved_tensors_hooks`` alone: non-reentrant
    checkpointing is itself built on saved-tensor hooks. Inside a checkpointed region its
    hooks are the innermost ones and receive the packs, so an outer measuring hook sees
    neither what the region would have saved nor what it keeps instead; and the region's
    inputs are kept alive by checkpoint's recompute closure, not by a pack, so no hook ever
    sees them. Pack hooks also report the same storage many times (views, a tensor saved
    by several ops) and include parameters saved by matmuls. Tracking the liveness of op
    outputs at the storage level avoids all of this.

    ``context`` (e.g. an autocast context manager) wraps the forward; ``forward_kwargs``
    (e.g. ``active_slots``) are passed to the model.
    """
    exclude = {
        t.untyped_storage().data_ptr()
        for t in itertools.chain(model.parameters(), model.buffers(), (idx, targets))
    }
    recorder = _StorageRecorder(exclude)
    with recorder, (context if context is not None else contextlib.nullcontext()):
        logits, loss = model(idx, targets, **forward_kwargs)
    del logits
    nbytes = recorder.alive_bytes()
    del loss
    return nbytes


def _tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def param_bytes(model: nn.Module) -> int:
    """Bytes of the model's parameters (tied weights counted once)."""
    return _tensor_bytes(model.parameters())


def grad_bytes(model: nn.Module) -> int:
    """Bytes of the gradients currently allocated (parameters without a grad count 0)."""
    return _tensor_bytes(p.grad for p in model.parameters() if p.grad is not None)


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of the optimizer's state tensors (e.g. AdamW's moments and step counters)."""
    return _tensor_bytes(
        v for state in optimizer.state.values() for v in state.values() if isinstance(v, torch.Tensor)
    )



# --------------------------------------------------------------------------------------
# analytic estimate
# --------------------------------------------------------------------------------------
#
# Per-op accounting of what the model in raydrat/model/transformer.py keeps alive for
# backward (checked op by op against ``saved_activation_bytes``; see docs/efficiency.md).
# Units: bytes. B micro-batch, T seq_len, C d_model, H heads, K kv heads, F MLP width,
# V vocab, e bytes of the compute dtype (4 fp32, 2 bf16/fp16). The residual stream, norm
# statistics and the loss's log-softmax stay fp32 under autocast.

COMPONENTS = ("params", "grads", "optimizer", "activations", "logits")
MIN_8BIT_NUMEL = 4096
"""bitsandbytes keeps 32-bit states for tensors with fewer elements than this."""
BNB_BLOCK = 256
"""bitsandbytes block size: one fp32 absmax per state per block; two 256-entry fp32 maps."""


@dataclass(frozen=True)
class BranchCost:
    """One attention or MLP branch: bytes its input keeps alive whatever the policy,
    the extra bytes it keeps when stored (not recomputed), and the forward FLOPs that
    backward repeats when it is recomputed."""

    layer: int
    kind: str  # "attn" | "mlp"
    input_bytes: int
    stored_bytes: int
    recompute_flops: int


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


def _meta_model(mcfg):
    from raydrat.model.transformer import GPT

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
    return 4 if precision in ("fp32", "auto_cpu") else 2


def resolved_precision(cfg, device: str) -> str:
    p = cfg.train.precision
    if p == "auto":
        return "bf16" if device == "cuda" else "fp32"
    return p


def attention_keeps_matrix(mcfg, device: str) -> bool:
    """Whether SDPA stores the (B, H, T, T) attention matrix (math kernel)."""
    if mcfg.attention_backend == "math":
        return True
    return mcfg.attention_backend == "auto" and device == "cpu" and mcfg.dropout > 0


def branch_costs(cfg, batch_size: int | None = None, device: str | None = None) -> list[BranchCost]:
    """Analytic per-branch costs for every layer (the budget solver's input)."""
    mc = cfg.model
    device = device or _default_device(cfg)
    e = _compute_bytes(resolved_precision(cfg, device))
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


def _default_device(cfg) -> str:
    from raydrat.efficiency import cpu_only

    if cpu_only(cfg):
        return "cpu"
    if cfg.train.device == "cuda" or cfg.scaling.use_gpu is True:
        return "cuda"
    return "cuda" if torch.cuda.is_available() else "cpu"


def active_layers(cfg) -> int:
    """Layers that can be active in one step at most (the peak): ``fixed`` runs its list,
    ``adaptive`` at most ``max_slots``; random modes may keep every layer."""
    sc, n = cfg.slots, cfg.model.n_layer
    if sc.mode == "fixed" and sc.fixed:
        return len(sc.fixed)
    if sc.mode == "adaptive":
        return min(n, sc.max_slots or n)
    return n


def _outside_layers_bytes(cfg, device: str, batch_size: int | None = None) -> tuple[int, int]:
    """(embedding + final norm + head input, log-softmax) bytes kept alive after forward."""
    mc = cfg.model
    e = _compute_bytes(resolved_precision(cfg, device))
    B, T, C, V = batch_size or cfg.train.batch_size, mc.seq_len, mc.d_model, mc.vocab_size
    BT = B * T
    outside = BT * C * 4  # the last layer's output, kept by the final norm
    outside += _norm_bytes(mc, BT) + BT * C * e  # the norm's saved tensors, head input (cast under autocast)
    if e != 4:
        outside += V * C * e  # autocast copy of the head weight
    if mc.dropout > 0:
        outside += BT * C  # embedding dropout mask
    return outside, BT * V * 4


def stored_plan(cfg, costs: list[BranchCost], layers: int) -> list[bool]:
    """Which branches store their activations under the configured policy (for the
    estimate): ``none`` and ``gated`` (worst case, every gate may store) store all;
    ``gated`` with ``gates.memory_budget_mb`` never plans past the budget, so its worst case
    is the fullest set of branches that fits."""
    policy = cfg.train.checkpointing
    n = 2 * layers
    if policy == "full":
        return [False] * n
    budget_mb = cfg.recompute.budget_mb if policy == "budget" else cfg.gates.memory_budget_mb if policy == "gated" else None
    if budget_mb is not None:
        from raydrat.model.budget import solve_budget

        base = sum(c.input_bytes for c in costs[:n]) + sum(_outside_layers_bytes(cfg, _default_device(cfg)))
        chosen = costs[:n]
        if policy == "gated":  # the fullest plan that fits: knapsack with value = bytes
            chosen = [dataclasses.replace(c, recompute_flops=c.stored_bytes) for c in chosen]
        return solve_budget(chosen, int(budget_mb * 2**20) - base).stored
    return [True] * n


def activation_plan_bounds(cfg) -> tuple[int, int]:
    """(every branch recomputed, every branch stored) saved bytes after forward."""
    device = _default_device(cfg)
    costs = branch_costs(cfg, device=device)[: 2 * active_layers(cfg)]
    base = sum(c.input_bytes for c in costs) + sum(_outside_layers_bytes(cfg, device))
    return base, base + sum(c.stored_bytes for c in costs)


def estimate_memory(cfg, device: str | None = None) -> MemoryEstimate:
    """Predicted peak training memory per worker for ``cfg`` (a :class:`RaydratConfig`).

    The total is the sum of the components, an upper bound of the peak at the start of
    backward: fp32 parameters, fp32 gradients (all allocated by the end of backward),
    optimizer states, activations kept for backward (per-op accounting of this model, for
    the precision, recomputation policy, slots, batch, sequence length and attention
    kernel), and the logits (held logits, the loss's saved log-softmax and the two
    (B, T, V) gradients of the loss's backward), which dominate small models.
    ``device`` (``cpu`` | ``cuda``) decides ``auto`` choices; default from the config.
    """
    device = device or _default_device(cfg)
    mc = cfg.model
    e = _compute_bytes(resolved_precision(cfg, device))
    meta = _meta_model(mc)
    shapes = [p.numel() for p in meta.parameters()]
    params = 4 * sum(shapes)
    layers = active_layers(cfg)
    costs = branch_costs(cfg, device=device)[: 2 * layers]
    stored = stored_plan(cfg, costs, layers)
    outside, log_softmax = _outside_layers_bytes(cfg, device)
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
        "precision": resolved_precision(cfg, device),
        "active_layers": layers,
        "stored_branches": sum(stored),
        "branches": len(stored),
        "attention_matrix": attention_keeps_matrix(mc, device),
    }
    return MemoryEstimate(total_bytes=sum(components.values()), components=components, detail=detail)


# --------------------------------------------------------------------------------------
# measured per-branch costs and recompute FLOPs
# --------------------------------------------------------------------------------------


class _TaggedRecorder(_StorageRecorder):
    """A storage recorder that remembers which region (branch) created each storage, and
    the running FLOP count (from an outer ``FlopCounterMode``) after each op."""

    def __init__(self, exclude: set[int], counter=None):
        super().__init__(exclude)
        self.current: int | None = None
        self.tags: dict[int, int | None] = {}
        self.counter = counter
        self.ops: list[tuple[int | None, int, list]] = []  # (tag, flops so far, output storage refs)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = super().__torch_dispatch__(func, types, args, kwargs)
        refs = []
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                ptr = t.untyped_storage().data_ptr()
                if ptr in self.storages:
                    self.tags[ptr] = self.current
                    refs.append(self.storages[ptr])
        if self.counter is not None:
            self.ops.append((self.current, self.counter.get_total_flops(), refs))
        return out

    def alive_ptrs(self) -> dict[int, int]:
        gc.collect()
        out = {}
        for ptr, ref in self.storages.items():
            s = ref()
            if s is not None:
                out[ptr] = s.nbytes()
        return out


def flop_counter():
    """``FlopCounterMode`` that also counts PyTorch's CPU flash-attention kernels (same
    formula as the CUDA flash kernel; FlopCounterMode leaves them out)."""
    from torch.utils.flop_counter import FlopCounterMode, flop_registry

    aten = torch.ops.aten

    def same_as(op):
        counted = flop_registry[op]  # already takes (args, out_val=...): mark it so

        def count(*args, **kwargs):
            return counted(*args, **kwargs)

        count._get_raw = True
        return count

    mapping = {
        aten._scaled_dot_product_flash_attention_for_cpu: same_as(aten._scaled_dot_product_flash_attention),
        aten._scaled_dot_product_flash_attention_for_cpu_backward: same_as(
            aten._scaled_dot_product_flash_attention_backward
        ),
    }
    return FlopCounterMode(display=False, custom_mapping=mapping)


def measure_branch_costs(
    model: nn.Module, idx: torch.Tensor, targets: torch.Tensor, context: Any = None
) -> tuple[list[BranchCost], int]:
    """Measured :class:`BranchCost` per branch and the bytes alive after forward with every
    branch recomputed (the minimum), from one forward pass with every branch stored.

    ``stored_bytes``: the storages a branch creates that are still alive after forward.
    ``recompute_flops``: the FLOPs backward repeats when the branch is recomputed: its
    forward ops up to the last one whose output is kept (non-reentrant checkpointing
    stops recomputing there). Wrapper flags are restored."""
    from raydrat.model.recompute import CheckpointWrapper, iter_branches

    branches = list(iter_branches(model))
    flags = [b.enabled if isinstance(b, CheckpointWrapper) else None for *_, b in branches]
    exclude = {
        t.untyped_storage().data_ptr()
        for t in itertools.chain(model.parameters(), model.buffers(), (idx, targets))
    }
    counter = flop_counter()
    recorder = _TaggedRecorder(exclude, counter)
    start_flops = [0] * len(branches)
    inputs = [0] * len(branches)
    handles = []

    def pre(i):
        def hook(_module, args):
            recorder.current = i
            inputs[i] = args[0].numel() * args[0].element_size()
            start_flops[i] = counter.get_total_flops()
        return hook

    def post(_module, _args, _out):
        recorder.current = None

    try:
        for i, (*_, b) in enumerate(branches):
            if isinstance(b, CheckpointWrapper):
                b.enabled = False
            handles += [b.register_forward_pre_hook(pre(i)), b.register_forward_hook(post)]
        with counter, recorder, (context if context is not None else contextlib.nullcontext()):
            logits, loss = model(idx, targets)
        del logits
        alive = recorder.alive_ptrs()
        kept_ops = [(tag, n) for tag, n, refs in recorder.ops if tag is not None and any(r() is not None for r in refs)]
        del loss
    finally:
        for h in handles:
            h.remove()
        for (*_, b), flag in zip(branches, flags):
            if flag is not None:
                b.enabled = flag
    stored = [0] * len(branches)
    outside = 0
    for ptr, nbytes in alive.items():
        tag = recorder.tags.get(ptr)
        if tag is None:
            outside += nbytes
        else:
            stored[tag] += nbytes
    end_flops = list(start_flops)
    for tag, flops_so_far in kept_ops:
        end_flops[tag] = flops_so_far
    costs = [
        BranchCost(layer, kind, inputs[i], stored[i], end_flops[i] - start_flops[i])
        for i, (layer, kind, _) in enumerate(branches)
    ]
    return costs, outside


def backward_flops(model: nn.Module, idx: torch.Tensor, targets: torch.Tensor, **forward_kwargs: Any) -> int:
    """FLOPs of one backward pass (device independent), recomputation included."""
    _, loss = model(idx, targets, **forward_kwargs)
    counter = flop_counter()
    with counter:
        loss.backward()
    return counter.get_total_flops()
