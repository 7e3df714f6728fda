"""Peer models for raydrat's benchmarks, built here from their published architectures
(written for raydrat, not copied from their repositories), so raydrat's model is timed
against what its users would otherwise train, in the same process and settings.

``TitanLlama``
    torchtitan's Llama 3 (``torchtitan/models/llama3/model.py``): ``nn.RMSNorm``; RoPE as a
    complex multiply (``view_as_complex`` on adjacent feature pairs, a ``freqs_cis`` buffer);
    grouped-query attention with the key/value heads repeated (``expand`` + ``reshape``)
    before ``scaled_dot_product_attention``; SwiGLU ``w2(silu(w1(x)) * w3(x))``. Built at a
    raydrat shape (the same widths, heads and MLP width; a head tied to the embedding as
    raydrat's recipes), so the two models have the same parameters and the same function
    (:func:`titan_state_dict` maps raydrat's weights into it).
``NanoGPT``
    nanoGPT's GPT-2 (``model.py``): learned position embeddings, LayerNorm, one fused
    ``c_attn`` projection for q/k/v, multi-head SDPA, a 4x GELU MLP, tied head. raydrat is
    configured as close as it goes by :func:`nanogpt_settings`; what still differs is
    :data:`NANOGPT_DIFFERENCES`.

Torch only: the GPU benchmark imports this on a machine without Ray or MLflow.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from raydrat.config.model import ModelConfig
from raydrat.core.model.transformer import GPT

NANOGPT_DIFFERENCES = (
    "raydrat rotates q/k with RoPE where nanoGPT adds a learned position embedding (wpe); "
    "raydrat projects q, k and v with three matrices where nanoGPT uses one fused c_attn"
)


# --------------------------------------------------------------------------------------
# torchtitan-style Llama
# --------------------------------------------------------------------------------------


def precompute_freqs_cis(head_dim: int, end: int, theta: float) -> torch.Tensor:
    """``exp(i * t * theta**(-2k/D))`` for positions ``t < end``: (end, D/2) complex64."""
    freqs = 1.0 / (theta ** (torch.arange(0, head_dim, 2).float() / head_dim))
    angles = torch.outer(torch.arange(end).float(), freqs)
    return torch.polar(torch.ones_like(angles), angles)


def apply_rotary_emb(xq: torch.Tensor, xk: torch.Tensor, freqs_cis: torch.Tensor):
    """Rotate adjacent pairs (2k, 2k+1) of each head as complex numbers: (B, T, heads, D)."""
    xq_ = torch.view_as_complex(xq.float().reshape(*xq.shape[:-1], -1, 2))  # (B, T, H, D/2)
    xk_ = torch.view_as_complex(xk.float().reshape(*xk.shape[:-1], -1, 2))
    f = freqs_cis[: xq.shape[1]].view(1, xq.shape[1], 1, -1)  # (1, T, 1, D/2)
    return (torch.view_as_real(xq_ * f).flatten(3).type_as(xq), torch.view_as_real(xk_ * f).flatten(3).type_as(xk))


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """(B, T, K, D) -> (B, T, K * n_rep, D), each kv head repeated for its query heads."""
    if n_rep == 1:
        return x
    B, T, K, D = x.shape
    return x[:, :, :, None, :].expand(B, T, K, n_rep, D).reshape(B, T, K * n_rep, D)


class TitanAttention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_head, cfg.kv_heads, cfg.head_dim
        self.n_rep = self.n_heads // self.n_kv_heads
        self.wq = nn.Linear(cfg.d_model, self.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(cfg.d_model, self.n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(cfg.d_model, self.n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(self.n_heads * self.head_dim, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor, freqs_cis: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        xq = self.wq(x).view(B, T, -1, self.head_dim)
        xk = self.wk(x).view(B, T, -1, self.head_dim)
        xv = self.wv(x).view(B, T, -1, self.head_dim)
        xq, xk = apply_rotary_emb(xq, xk, freqs_cis)
        keys, values = repeat_kv(xk, self.n_rep), repeat_kv(xv, self.n_rep)
        out = F.scaled_dot_product_attention(
            xq.transpose(1, 2), keys.transpose(1, 2), values.transpose(1, 2), is_causal=True
        )
        return self.wo(out.transpose(1, 2).contiguous().view(B, T, -1))


class TitanFeedForward(nn.Module):
    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TitanBlock(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attention = TitanAttention(cfg)
        self.feed_forward = TitanFeedForward(cfg.d_model, cfg.ff_dim)
        self.attention_norm = nn.RMSNorm(cfg.d_model, eps=1e-5)
        self.ffn_norm = nn.RMSNorm(cfg.d_model, eps=1e-5)

    def forward(self, x: torch.Tensor, freqs_cis: torch.Tensor) -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x), freqs_cis)
        return h + self.feed_forward(self.ffn_norm(h))


class TitanLlama(nn.Module):
    """torchtitan's Llama 3 at a raydrat shape (RMSNorm, RoPE, GQA, SwiGLU)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.norm != "rmsnorm" or cfg.activation != "swiglu" or cfg.bias:
            raise ValueError("the torchtitan reference is RMSNorm + SwiGLU without biases")
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.register_buffer(
            "freqs_cis", precompute_freqs_cis(cfg.head_dim, cfg.seq_len, cfg.rope_theta), persistent=False
        )
        self.layers = nn.ModuleDict({str(i): TitanBlock(cfg) for i in range(cfg.n_layer)})
        self.norm = nn.RMSNorm(cfg.d_model, eps=1e-5)
        self.output = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=cfg.init_std)

    def forward(self, tokens: torch.Tensor, targets: torch.Tensor | None = None):
        h = self.tok_embeddings(tokens)
        for layer in self.layers.values():
            h = layer(h, self.freqs_cis)
        pred = self.output(self.norm(h)).float()
        loss = None if targets is None else F.cross_entropy(pred.flatten(0, 1), targets.flatten(0, 1))
        return pred, loss


def rotate_half_to_pairs(n_heads: int, head_dim: int) -> torch.Tensor:
    """Row order that turns a q/k projection from the rotate-half layout (raydrat, Hugging
    Face Llama: feature i pairs with i + D/2) into adjacent pairs (torchtitan, Meta's Llama:
    2k pairs with 2k + 1)."""
    half = torch.arange(head_dim // 2)
    per_head = torch.stack([half, half + head_dim // 2], dim=-1).flatten()  # 0, D/2, 1, D/2+1, ...
    return (torch.arange(n_heads)[:, None] * head_dim + per_head).flatten()


def titan_state_dict(model: GPT) -> dict[str, torch.Tensor]:
    """raydrat weights under the torchtitan reference's names (and q/k pair layout)."""
    cfg, sd = model.cfg, model.state_dict()
    q_rows = rotate_half_to_pairs(cfg.n_head, cfg.head_dim)
    k_rows = rotate_half_to_pairs(cfg.kv_heads, cfg.head_dim)
    out = {
        "tok_embeddings.weight": sd["tok_emb.weight"],
        "norm.weight": sd["norm.weight"],
        "output.weight": sd["lm_head.weight"],
    }
    ours = {  # torchtitan name -> raydrat name, per layer
        "attention.wq.weight": "attn_branch.layer.q_proj.weight",
        "attention.wk.weight": "attn_branch.layer.k_proj.weight",
        "attention.wv.weight": "attn_branch.layer.v_proj.weight",
        "attention.wo.weight": "attn_branch.layer.out_proj.weight",
        "feed_forward.w1.weight": "mlp_branch.layer.gate_proj.weight",
        "feed_forward.w3.weight": "mlp_branch.layer.up_proj.weight",
        "feed_forward.w2.weight": "mlp_branch.layer.down_proj.weight",
        "attention_norm.weight": "attn_branch.norm.weight",
        "ffn_norm.weight": "mlp_branch.norm.weight",
    }
    for i in range(cfg.n_layer):
        for theirs, mine in ours.items():
            out[f"layers.{i}.{theirs}"] = sd[f"layers.{i}.{mine}"]
        out[f"layers.{i}.attention.wq.weight"] = out[f"layers.{i}.attention.wq.weight"][q_rows]
        out[f"layers.{i}.attention.wk.weight"] = out[f"layers.{i}.attention.wk.weight"][k_rows]
    return out


# --------------------------------------------------------------------------------------
# nanoGPT's GPT-2
# --------------------------------------------------------------------------------------


class NanoLayerNorm(nn.Module):
    """LayerNorm with an optional bias."""

    def __init__(self, ndim: int, bias: bool):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(ndim))
        self.bias = nn.Parameter(torch.zeros(ndim)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, 1e-5)


class NanoSelfAttention(nn.Module):
    def __init__(self, n_embd: int, n_head: int, bias: bool, dropout: float):
        super().__init__()
        self.c_attn = nn.Linear(n_embd, 3 * n_embd, bias=bias)
        self.c_proj = nn.Linear(n_embd, n_embd, bias=bias)
        self.resid_dropout = nn.Dropout(dropout)
        self.n_head, self.n_embd, self.dropout = n_head, n_embd, dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True)
        return self.resid_dropout(self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C)))


class NanoMLP(nn.Module):
    def __init__(self, n_embd: int, bias: bool, dropout: float):
        super().__init__()
        self.c_fc = nn.Linear(n_embd, 4 * n_embd, bias=bias)
        self.gelu = nn.GELU()
        self.c_proj = nn.Linear(4 * n_embd, n_embd, bias=bias)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class NanoBlock(nn.Module):
    def __init__(self, n_embd: int, n_head: int, bias: bool, dropout: float):
        super().__init__()
        self.ln_1 = NanoLayerNorm(n_embd, bias)
        self.attn = NanoSelfAttention(n_embd, n_head, bias, dropout)
        self.ln_2 = NanoLayerNorm(n_embd, bias)
        self.mlp = NanoMLP(n_embd, bias, dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class NanoGPT(nn.Module):
    """nanoGPT's GPT-2: learned positions, LayerNorm, fused-qkv multi-head attention, GELU."""

    def __init__(
        self,
        vocab_size: int,
        block_size: int,
        n_layer: int,
        n_head: int,
        n_embd: int,
        bias: bool = False,
        dropout: float = 0.0,
    ):
        super().__init__()
        self.block_size = block_size
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(vocab_size, n_embd),
                wpe=nn.Embedding(block_size, n_embd),
                drop=nn.Dropout(dropout),
                h=nn.ModuleList([NanoBlock(n_embd, n_head, bias, dropout) for _ in range(n_layer)]),
                ln_f=NanoLayerNorm(n_embd, bias),
            )
        )
        self.lm_head = nn.Linear(n_embd, vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=0.02)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)

    @classmethod
    def like(cls, cfg: ModelConfig) -> NanoGPT:
        return cls(cfg.vocab_size, cfg.seq_len, cfg.n_layer, cfg.n_head, cfg.d_model, cfg.bias, cfg.dropout)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None):
        t = idx.shape[1]
        pos = torch.arange(0, t, dtype=torch.long, device=idx.device)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))
        for block in self.transformer.h:
            x = block(x)
        logits = self.lm_head(self.transformer.ln_f(x))
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)
        return logits, loss


def nanogpt_settings(cfg: ModelConfig) -> ModelConfig:
    """raydrat's model configured as close to nanoGPT's GPT-2 as it goes."""
    return cfg.model_copy(
        update=dict(
            norm="layernorm", activation="gelu", n_kv_head=None, d_ff=None, bias=False, dropout=0.0, tie_embeddings=True
        )
    )


def recipe_settings(cfg: ModelConfig) -> ModelConfig:
    """The recipe's model as the torchtitan reference builds it (RMSNorm, SwiGLU, no biases)."""
    return cfg.model_copy(update=dict(norm="rmsnorm", activation="swiglu", bias=False, dropout=0.0))
