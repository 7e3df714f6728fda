"""Decoder-only transformer: norm → RoPE → attention → MLP → block → GPT.

Reads top to bottom. Every setting comes from :class:`~raydrat.config.model.ModelConfig`.
Techniques are applied from outside: activation recomputation wraps the blocks' branches
(:mod:`raydrat.core.techniques.recompute.planners`), layer skipping is the ``active_slots`` argument of
:meth:`GPT.forward`. Incremental decoding passes a :class:`KVCache` to :meth:`GPT.forward`.
The model knows nothing of Ray, MLflow or the data pipeline. It is one file on purpose, like
nanoGPT's ``model.py``: one cohesive definition a reader follows from the norm to the loss.

Shape legend: B batch, T tokens, C d_model, H query heads, K key/value heads, D head_dim,
F MLP hidden width, V vocabulary.
"""

from __future__ import annotations

import contextlib
import math
import operator
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from raydrat.config.model import ModelConfig

NORM_EPS = 1e-5
IGNORE_INDEX = -100
"""Target value that contributes nothing to the loss (padding)."""
RESIDUAL_PROJECTIONS = ("out_proj.weight", "down_proj.weight")
"""Parameters writing into the residual stream; their init is scaled by 1/sqrt(2 * n_layer)."""


# --------------------------------------------------------------------------------------
# normalisation
# --------------------------------------------------------------------------------------


class RMSNorm(nn.Module):
    """Root-mean-square norm: ``x / rms(x) * weight`` (no centring, no bias), in fp32."""

    def __init__(self, dim: int, eps: float = NORM_EPS):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., C) -> (..., C)
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        return xf.type_as(x) * self.weight


def make_norm(cfg: ModelConfig) -> nn.Module:
    """The normalisation layer chosen by ``cfg.norm`` (LayerNorm has a bias iff ``cfg.bias``)."""
    if cfg.norm == "rmsnorm":
        return RMSNorm(cfg.d_model)
    return nn.LayerNorm(cfg.d_model, eps=NORM_EPS, bias=cfg.bias)


# --------------------------------------------------------------------------------------
# rotary position embedding
# --------------------------------------------------------------------------------------


class Rotate(torch.autograd.Function):
    """``x * cos + swap_halves(x) * sin`` and its backward ``g * cos + swap_halves(g * sin)``
    (swapping the halves is its own transpose): the forward with three new tensors and the
    backward with two, where autograd's roll + mul + addcmul graph saves and makes more."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(cos, sin)
        # out of place: selective recomputation may keep the rolled tensor, and a tensor it
        # keeps must not change afterwards
        return torch.addcmul(x.roll(x.shape[-1] // 2, dims=-1) * sin, x, cos)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        cos, sin = ctx.saved_tensors
        return (grad * sin).roll(grad.shape[-1] // 2, dims=-1).addcmul_(grad, cos), None, None


class RotaryEmbedding(nn.Module):
    """RoPE (Su et al., 2021) in the "rotate-half" layout (as Hugging Face Llama): feature
    ``i`` and feature ``i + D/2`` of each head form one pair, rotated by
    ``position * theta**(-2i/D)``.

    Full-width tables for positions ``0 .. max_len - 1`` are precomputed (in float64, stored
    as float32) into non-persistent buffers (they follow ``.to(device)`` but are not saved):
    ``cos`` repeated over both halves, and ``sin`` with the rotation's sign folded in
    (``-sin`` on the first half). Then ``rope(x) = x * cos + swap_halves(x) * sin``
    (:class:`Rotate`): a roll and two fused multiplies, forward and backward, about a third
    of the time of rotating the halves separately and concatenating (measured forward +
    backward on CPU; the complex-multiply form needs the pairs adjacent, so a copy each way).
    """

    def __init__(self, head_dim: int, max_len: int, theta: float):
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"RoPE needs an even head_dim, got {head_dim}")
        inv_freq = theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
        angles = torch.outer(torch.arange(max_len, dtype=torch.float64), inv_freq)  # (max_len, D/2)
        cos, sin = angles.cos(), angles.sin()
        self.register_buffer("cos", torch.cat([cos, cos], dim=-1).float(), persistent=False)  # (max_len, D)
        self.register_buffer("sin", torch.cat([-sin, sin], dim=-1).float(), persistent=False)  # (max_len, D)

    def forward(self, x: torch.Tensor, start: int = 0) -> torch.Tensor:  # (B, T, heads, D) -> same
        """Rotate ``x``, whose first token is at position ``start``."""
        T = x.shape[1]
        cos = self.cos[start : start + T, None, :]  # (T, 1, D)
        sin = self.sin[start : start + T, None, :]  # (T, 1, D)
        # (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin)
        return Rotate.apply(x, cos, sin)


# --------------------------------------------------------------------------------------
# attention
# --------------------------------------------------------------------------------------

SDPA_BACKENDS = {
    "flash": SDPBackend.FLASH_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
    "math": SDPBackend.MATH,
}


def sdpa_backend(name: str) -> contextlib.AbstractContextManager:
    """Restrict SDPA to the kernel ``name`` (``auto``: let PyTorch choose)."""
    return contextlib.nullcontext() if name == "auto" else sdpa_kernel(SDPA_BACKENDS[name])


def _sdpa_has_enable_gqa() -> bool:
    """Whether the installed torch's SDPA takes ``enable_gqa`` (torch >= 2.5)."""
    q, kv = torch.zeros(1, 2, 1, 2), torch.zeros(1, 1, 1, 2)
    try:
        F.scaled_dot_product_attention(q, kv, kv, enable_gqa=True)
    except TypeError:
        return False
    return True


SDPA_ENABLE_GQA = _sdpa_has_enable_gqa()
GQA_BACKENDS = ("auto", "flash", "math")
"""SDPA backends that take grouped key/value heads directly (``efficient`` does not, so
with ``attention_backend: efficient`` the key/value heads are repeated first)."""


def sdpa_grouped_heads(device_type: str, dtype: torch.dtype, masked: bool = False) -> bool:
    """Whether SDPA's fast kernel takes grouped heads here: the CPU kernel does; on CUDA
    only flash attention (fp16/bf16, no mask) does, and the kernel SDPA would otherwise pick
    for fp32 or a mask (memory-efficient) does not, so there repeating k, v keeps it."""
    if device_type == "cpu":
        return True
    return dtype in (torch.float16, torch.bfloat16) and not masked


@dataclass
class LayerKV:
    """One layer's slice of a :class:`KVCache`: key/value buffers and where ``x`` starts."""

    keys: torch.Tensor  # (B, K, max_len, D)
    values: torch.Tensor  # (B, K, max_len, D)
    start: int


class Attention(nn.Module):
    """Causal grouped-query self-attention with RoPE, through
    ``F.scaled_dot_product_attention``. Query head ``h`` attends with key/value head
    ``h // (H / K)``; ``K == H`` is plain multi-head attention, ``K == 1`` multi-query.
    Grouped heads go to SDPA as they are (``enable_gqa``: no repeated copies kept for
    backward) where the installed torch and the kernel take them (:func:`sdpa_grouped_heads`),
    else each key/value head is repeated ``H / K`` times."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.n_head % cfg.kv_heads:
            raise ValueError(f"model.n_head ({cfg.n_head}) must be divisible by model.n_kv_head ({cfg.kv_heads})")
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, cfg.kv_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.d_model, self.n_head * self.head_dim, bias=cfg.bias)
        self.k_proj = nn.Linear(cfg.d_model, self.n_kv_head * self.head_dim, bias=cfg.bias)
        self.v_proj = nn.Linear(cfg.d_model, self.n_kv_head * self.head_dim, bias=cfg.bias)
        self.out_proj = nn.Linear(self.n_head * self.head_dim, cfg.d_model, bias=cfg.bias)
        self.rope = RotaryEmbedding(self.head_dim, cfg.seq_len, cfg.rope_theta)
        self.dropout = cfg.dropout
        self.backend = cfg.attention_backend
        self.enable_gqa = SDPA_ENABLE_GQA and self.backend in GQA_BACKENDS

    def forward(self, x: torch.Tensor, kv: LayerKV | None = None) -> torch.Tensor:  # (B, T, C) -> (B, T, C)
        """``kv``: incremental decoding: ``x`` continues the cached tokens; its keys and
        values are written into the cache and its queries attend to all of them."""
        B, T, _ = x.shape
        start = 0 if kv is None else kv.start
        q = self.q_proj(x).view(B, T, self.n_head, self.head_dim)  # (B, T, H, D)
        k = self.k_proj(x).view(B, T, self.n_kv_head, self.head_dim)  # (B, T, K, D)
        v = self.v_proj(x).view(B, T, self.n_kv_head, self.head_dim)  # (B, T, K, D)
        q, k = self.rope(q, start), self.rope(k, start)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, H, T, D), (B, K, T, D) x 2
        mask, causal = None, True
        if kv is not None:
            end = start + T
            kv.keys[:, :, start:end] = k
            kv.values[:, :, start:end] = v
            k, v = kv.keys[:, :, :end], kv.values[:, :, :end]  # (B, K, end, D)
            if start and T == 1:  # one new token sees every cached one
                causal = False
            elif start:  # query i (position start + i) sees keys 0 .. start + i
                mask, causal = torch.ones(T, end, dtype=torch.bool, device=x.device).tril(start), False
        gqa = {}
        if (
            self.n_kv_head != self.n_head
            and self.enable_gqa
            and sdpa_grouped_heads(q.device.type, q.dtype, mask is not None)
        ):
            gqa = {"enable_gqa": True}
        elif self.n_kv_head != self.n_head:  # each kv head serves H / K consecutive query heads
            repeats = self.n_head // self.n_kv_head
            k = k.repeat_interleave(repeats, dim=1)  # (B, H, T, D)
            v = v.repeat_interleave(repeats, dim=1)  # (B, H, T, D)
        with sdpa_backend(self.backend):
            y = F.scaled_dot_product_attention(
                q,
                k,
                v,
                attn_mask=mask,
                is_causal=causal,
                dropout_p=self.dropout if self.training else 0.0,
                **gqa,
            )  # (B, H, T, D)
        y = y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim)  # (B, T, H*D)
        return self.out_proj(y)  # (B, T, C)


# --------------------------------------------------------------------------------------
# MLP
# --------------------------------------------------------------------------------------

ACTIVATIONS = {"gelu": F.gelu, "relu": F.relu, "silu": F.silu, "swiglu": F.silu, "geglu": F.gelu}


class MLP(nn.Module):
    """``down(act(up(x)))``, or for the gated activations (swiglu, geglu)
    ``down(act(gate(x)) * up(x))``."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.act = ACTIVATIONS[cfg.activation]
        self.gate_proj = nn.Linear(cfg.d_model, cfg.ff_dim, bias=cfg.bias) if cfg.gated_mlp else None
        self.up_proj = nn.Linear(cfg.d_model, cfg.ff_dim, bias=cfg.bias)
        self.down_proj = nn.Linear(cfg.ff_dim, cfg.d_model, bias=cfg.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, C) -> (B, T, C)
        h = self.up_proj(x)  # (B, T, F)
        h = self.act(self.gate_proj(x)) * h if self.gate_proj is not None else self.act(h)
        return self.down_proj(h)  # (B, T, C)


# --------------------------------------------------------------------------------------
# block
# --------------------------------------------------------------------------------------


class Branch(nn.Module):
    """One pre-norm residual branch, ``dropout(layer(norm(x)))``; the block adds it to ``x``.

    Attention and MLP are separate branch modules so that a policy can wrap each one on
    its own (e.g. recompute the attention branch but keep the MLP's activations).
    """

    def __init__(self, norm: nn.Module, layer: nn.Module, dropout: float):
        super().__init__()
        self.norm = norm
        self.layer = layer
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, C) -> (B, T, C)
        return self.drop(self.layer(self.norm(x)))


class Block(nn.Module):
    """Pre-norm transformer block: ``x + attn_branch(x)``, then ``x + mlp_branch(x)``."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attn_branch = Branch(make_norm(cfg), Attention(cfg), cfg.dropout)
        self.mlp_branch = Branch(make_norm(cfg), MLP(cfg), cfg.dropout)

    def forward(self, x: torch.Tensor, kv: LayerKV | None = None) -> torch.Tensor:  # (B, T, C) -> (B, T, C)
        if kv is None:
            x = x + self.attn_branch(x)
        else:  # decoding (no backward): the branch's parts are called past any wrapper
            a = self.attn_branch
            x = x + a.drop(a.layer(a.norm(x), kv))
        return x + self.mlp_branch(x)


# --------------------------------------------------------------------------------------
# key/value cache
# --------------------------------------------------------------------------------------


class KVCache:
    """Keys and values of the tokens decoded so far, for :meth:`GPT.forward` with
    ``cache=``: per layer ``(B, K, max_len, D)`` buffers (``K = n_kv_head``: grouped heads
    are cached once, not repeated), of which the first ``length`` positions are filled.
    Each forward appends its tokens' keys and values (at positions ``length ..``, which is
    also the RoPE offset) and advances ``length``."""

    def __init__(
        self,
        cfg: ModelConfig,
        batch_size: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ):
        shape = (batch_size, cfg.kv_heads, cfg.seq_len, cfg.head_dim)  # (B, K, max_len, D)
        self.keys = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layer)]
        self.values = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layer)]
        self.batch_size, self.max_len = batch_size, cfg.seq_len
        self.length = 0

    def layer(self, i: int) -> LayerKV:
        return LayerKV(self.keys[i], self.values[i], self.length)

    def reset(self) -> None:
        self.length = 0


# --------------------------------------------------------------------------------------
# loss
# --------------------------------------------------------------------------------------


class CrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of logits ``(N, V)`` over the targets ``(N,)`` that are not
    ``IGNORE_INDEX``: ``F.cross_entropy(logits.float(), targets, ignore_index=IGNORE_INDEX)``
    with a leaner backward. The gradient ``(softmax - onehot(target)) / n`` is written into
    the saved log-probabilities in place (exp, scale, subtract at the targets), where
    autograd's log_softmax + nll_loss backward allocates and zero-fills an ``(N, V)``
    tensor and makes a second full pass: about 30% less time for loss and head backward
    on CPU at the demo shape. The backward can run once (no ``retain_graph``)."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:  # (N, V), (N,) -> ()
        logp = torch.log_softmax(logits.float(), dim=-1)  # (N, V)
        valid = targets != IGNORE_INDEX  # (N,)
        safe = targets.where(valid, 0)  # (N,) ignored rows point at token 0, then weigh 0
        n = valid.sum()
        ctx.save_for_backward(logp, safe, valid, n)
        ctx.logits_dtype, ctx.spent = logits.dtype, False
        return -(logp.gather(1, safe[:, None]).squeeze(1) * valid).sum() / n

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        if ctx.spent:
            raise RuntimeError("CrossEntropy's backward reuses its saved tensors: it cannot run twice")
        ctx.spent = True
        logp, safe, valid, n = ctx.saved_tensors
        row = valid * (grad / n)  # (N,) d loss / d logit of each row's target, ignored rows 0
        g = logp.exp_().mul_(row[:, None])  # (N, V) softmax * row, in place
        g.scatter_add_(1, safe[:, None], -row[:, None])
        return g.to(ctx.logits_dtype), None


# --------------------------------------------------------------------------------------
# model
# --------------------------------------------------------------------------------------


class GPT(nn.Module):
    """Token embedding → ``n_layer`` blocks → final norm → LM head.

    ``layers`` is a ``ModuleDict`` keyed ``"0" .. "n_layer-1"``; the keys never change, so
    parameter names are the same whichever layers run and whatever wraps the branches.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if not isinstance(cfg, ModelConfig):
            raise TypeError(f"GPT needs a ModelConfig, got {type(cfg).__name__}")
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)
        self.layers = nn.ModuleDict({str(i): Block(cfg) for i in range(cfg.n_layer)})
        self.norm = make_norm(cfg)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        self._init_weights()

    def _init_weights(self) -> None:
        """GPT-2 init: N(0, init_std) for linear and embedding weights, zero biases, and
        N(0, init_std / sqrt(2 * n_layer)) for the projections into the residual stream."""
        std = self.cfg.init_std
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=std)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
        residual_std = std / math.sqrt(2 * self.cfg.n_layer)
        for name, param in self.named_parameters():
            if name.endswith(RESIDUAL_PROJECTIONS):
                nn.init.normal_(param, mean=0.0, std=residual_std)

    def _slot_order(self, active_slots: Iterable[int] | None) -> list[int]:
        """The layer indices to run, in increasing order (all when ``None``)."""
        n = self.cfg.n_layer
        if active_slots is None:
            return list(range(n))
        try:
            slots = [operator.index(i) for i in active_slots]
        except TypeError:
            raise ValueError(f"active_slots must be layer indices (ints), got {active_slots!r}") from None
        bad = sorted({i for i in slots if not 0 <= i < n})
        if bad:
            raise ValueError(f"active_slots {bad} out of range: model.n_layer is {n}, use 0..{n - 1}")
        repeated = sorted({i for i in slots if slots.count(i) > 1})
        if repeated:
            raise ValueError(f"active_slots has duplicates {repeated}: each layer runs at most once")
        return sorted(slots)

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        active_slots: Iterable[int] | None = None,
        cache: KVCache | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``idx`` (B, T) token ids, ``targets`` (B, T) or ``None``; ``active_slots`` the
        layers to run (``None``: all). Returns logits (B, T, V) and the mean cross-entropy
        over targets that are not ``IGNORE_INDEX`` (``None`` without targets).

        ``cache``: incremental decoding: ``idx`` continues the ``cache.length`` tokens
        already in the cache (their logits equal those of one forward over the whole
        sequence); the cache then holds them too. Inference only (no backward)."""
        if idx.dim() != 2:
            raise ValueError(f"idx must be (batch, tokens), got shape {tuple(idx.shape)}")
        B, T = idx.shape
        if T > self.cfg.seq_len:
            raise ValueError(f"sequence of {T} tokens exceeds model.seq_len ({self.cfg.seq_len})")
        if cache is not None:
            self._check_cache(cache, B, T)
        slots = self._slot_order(active_slots)
        x = self.drop(self.tok_emb(idx))  # (B, T, C)
        for i in slots:
            block = self.layers[str(i)]
            # training calls a block with its input alone, so a block wrapped from outside
            # (torch.utils.checkpoint, a recompute region) sees the call it expects
            x = block(x) if cache is None else block(x, cache.layer(i))  # (B, T, C)
        if cache is not None:
            cache.length += T
        logits = self.lm_head(self.norm(x))  # (B, T, V)
        loss = None
        if targets is not None:
            loss = CrossEntropy.apply(logits.view(B * T, -1), targets.reshape(B * T))
        return logits, loss

    def _check_cache(self, cache: KVCache, B: int, T: int) -> None:
        if len(cache.keys) != self.cfg.n_layer or cache.max_len != self.cfg.seq_len:
            raise ValueError("the KVCache was made for another model: build it with KVCache(model.cfg, ...)")
        if cache.batch_size != B:
            raise ValueError(f"the KVCache holds {cache.batch_size} sequences, idx has {B}")
        if cache.length + T > cache.max_len:
            raise ValueError(
                f"the KVCache holds {cache.length} tokens; {T} more exceed model.seq_len "
                f"({cache.max_len}): start a new cache from the last tokens"
            )

    def num_params(self, exclude_embeddings: bool = False) -> int:
        """Parameter count, tied weights counted once. ``exclude_embeddings`` leaves out the
        token embedding table (and with it a tied head; an untied head is counted)."""
        n = sum(p.numel() for p in self.parameters())  # parameters() yields a tied weight once
        return n - self.tok_emb.weight.numel() if exclude_embeddings else n
