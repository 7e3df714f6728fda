"""Decoder-only transformer: norm → RoPE → attention → MLP → block → GPT.

Reads top to bottom. Every setting comes from :class:`~raydrat.core.model.config.ModelConfig`.
Techniques are applied from outside: activation recomputation wraps the blocks' branches
(:mod:`raydrat.core.techniques.recompute`), layer skipping is the ``active_slots`` argument of
:meth:`GPT.forward`. The model knows nothing of Ray, MLflow or the data pipeline.

Shape legend: B batch, T tokens, C d_model, H query heads, K key/value heads, D head_dim,
F MLP hidden width, V vocabulary.
"""

from __future__ import annotations

import contextlib
import math
import operator
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from raydrat.core.model.config import ModelConfig

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


class RotaryEmbedding(nn.Module):
    """RoPE (Su et al., 2021) in the "rotate-half" layout: feature ``i`` and feature
    ``i + D/2`` of each head form one pair, rotated by ``position * theta**(-2i/D)``.

    cos/sin tables for positions ``0 .. max_len - 1`` are precomputed (in float64, stored
    as float32) into non-persistent buffers: they follow ``.to(device)`` but are not saved.
    """

    def __init__(self, head_dim: int, max_len: int, theta: float):
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"RoPE needs an even head_dim, got {head_dim}")
        inv_freq = theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
        angles = torch.outer(torch.arange(max_len, dtype=torch.float64), inv_freq)  # (max_len, D/2)
        self.register_buffer("cos", angles.cos().float(), persistent=False)
        self.register_buffer("sin", angles.sin().float(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, heads, D) -> same
        T = x.shape[1]
        cos, sin = self.cos[:T, None, :], self.sin[:T, None, :]  # (T, 1, D/2)
        x1, x2 = x.chunk(2, dim=-1)  # (B, T, heads, D/2) each
        return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


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


class Attention(nn.Module):
    """Causal grouped-query self-attention with RoPE, through
    ``F.scaled_dot_product_attention``. Query head ``h`` attends with key/value head
    ``h // (H / K)``; ``K == H`` is plain multi-head attention, ``K == 1`` multi-query."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.n_head % cfg.kv_heads:
            raise ValueError(
                f"model.n_head ({cfg.n_head}) must be divisible by model.n_kv_head ({cfg.kv_heads})"
            )
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, cfg.kv_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.d_model, self.n_head * self.head_dim, bias=cfg.bias)
        self.k_proj = nn.Linear(cfg.d_model, self.n_kv_head * self.head_dim, bias=cfg.bias)
        self.v_proj = nn.Linear(cfg.d_model, self.n_kv_head * self.head_dim, bias=cfg.bias)
        self.out_proj = nn.Linear(self.n_head * self.head_dim, cfg.d_model, bias=cfg.bias)
        self.rope = RotaryEmbedding(self.head_dim, cfg.seq_len, cfg.rope_theta)
        self.dropout = cfg.dropout
        self.backend = cfg.attention_backend

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, C) -> (B, T, C)
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_head, self.head_dim)  # (B, T, H, D)
        k = self.k_proj(x).view(B, T, self.n_kv_head, self.head_dim)  # (B, T, K, D)
        v = self.v_proj(x).view(B, T, self.n_kv_head, self.head_dim)  # (B, T, K, D)
        q, k = self.rope(q), self.rope(k)
        if self.n_kv_head != self.n_head:  # each kv head serves H / K consecutive query heads
            repeats = self.n_head // self.n_kv_head
            k = k.repeat_interleave(repeats, dim=2)  # (B, T, H, D)
            v = v.repeat_interleave(repeats, dim=2)  # (B, T, H, D)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, H, T, D)
        with sdpa_backend(self.backend):
            y = F.scaled_dot_product_attention(
                q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0
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

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, C) -> (B, T, C)
        x = x + self.attn_branch(x)
        return x + self.mlp_branch(x)


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
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``idx`` (B, T) token ids, ``targets`` (B, T) or ``None``; ``active_slots`` the
        layers to run (``None``: all). Returns logits (B, T, V) and the mean cross-entropy
        over targets that are not ``IGNORE_INDEX`` (``None`` without targets)."""
        if idx.dim() != 2:
            raise ValueError(f"idx must be (batch, tokens), got shape {tuple(idx.shape)}")
        B, T = idx.shape
        if T > self.cfg.seq_len:
            raise ValueError(f"sequence of {T} tokens exceeds model.seq_len ({self.cfg.seq_len})")
        slots = self._slot_order(active_slots)
        x = self.drop(self.tok_emb(idx))  # (B, T, C)
        for i in slots:
            x = self.layers[str(i)](x)  # (B, T, C)
        logits = self.lm_head(self.norm(x))  # (B, T, V)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(
                logits.float().view(B * T, -1), targets.reshape(B * T), ignore_index=IGNORE_INDEX
            )
        return logits, loss

    def num_params(self, exclude_embeddings: bool = False) -> int:
        """Parameter count, tied weights counted once. ``exclude_embeddings`` leaves out the
        token embedding table (and with it a tied head; an untied head is counted)."""
        n = sum(p.numel() for p in self.parameters())  # parameters() yields a tied weight once
        return n - self.tok_emb.weight.numel() if exclude_embeddings else n
