"""The models raydrat's model is timed against, in the same process and settings.

The real peers are the installed packages of the ``[peers]`` extra, imported as they are
and built at raydrat's shape from their own config classes, randomly initialised (nothing
is downloaded); each trains with the loss its own training loop uses:

``transformers``
    ``LlamaForCausalLM`` with SDPA attention, from the ``LlamaConfig`` that
    ``raydrat export --format hf`` writes for the same model (:func:`hf_config`); the loss
    is the model's own (``labels`` with ``shift_labels``: every position predicts its target).
``torchtitan``
    the llama3 ``Llama3Model`` from torchtitan's config builders (fused ``wqkv``,
    ``ComplexRoPE``, SwiGLU ``FeedForward``, ``RMSNorm``, its depth-scaled init) with
    torchtitan's ``ScaledDotProductAttention`` inner attention; the loss is
    ``torchtitan.components.loss.cross_entropy_loss`` over the tokens. (torchtitan's language
    models default to FlexAttention with block-causal document masks, compiled with
    ``max_autotune``; with one causal document per row SDPA computes the same attention.)
``litgpt``
    ``litgpt.GPT`` from a ``litgpt.Config`` (``LLaMAMLP``, ``RMSNorm``, fused ``qkv``,
    rotate-half RoPE), its ``_init_weights``; the loss is ``litgpt.utils.chunked_cross_entropy``
    as its ``pretrain`` uses it.

All three are compared with raydrat's model at :func:`recipe_settings` (RMSNorm, SwiGLU,
grouped-query attention), the same width, depth, heads, key/value heads, MLP width,
vocabulary, sequence length and tied head, so every one has raydrat's parameter count
(``tests/test_bench_model.py`` loads raydrat's weights into each and compares logits).

``nanogpt``
    the nanoGPT reference (:class:`NanoGPT`, written here from nanoGPT's ``model.py``;
    measured at 1.00x the unmodified nanoGPT code), against raydrat at
    :func:`nanogpt_settings`; what still differs is :data:`NANOGPT_DIFFERENCES`.

A peer whose package is not installed is skipped (:func:`available`). Torch only at import:
the GPU benchmark imports this module on a machine without Ray or MLflow.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from raydrat.config.model import ModelConfig
from raydrat.core.checkpoint.hf import hf_config
from raydrat.core.model.transformer import NORM_EPS

NANOGPT_DIFFERENCES = (
    "raydrat rotates q/k with RoPE where nanoGPT adds a learned position embedding (wpe); "
    "raydrat projects q, k and v with three matrices where nanoGPT uses one fused c_attn"
)
NANOGPT_PACKAGE = "raydrat nanogpt-reference"


@dataclass(frozen=True)
class Peer:
    """A model to time raydrat's against: ``build(cfg)`` returns a module whose
    ``forward(idx, targets)`` returns ``(logits, loss)``, as raydrat's ``GPT`` does."""

    name: str
    distribution: str | None
    """The installed package it comes from (None: written in raydrat)."""
    settings: str
    """``recipe``: compared with raydrat at :func:`recipe_settings`; ``nanogpt``: at
    :func:`nanogpt_settings`."""
    build: Callable[[ModelConfig], nn.Module]

    def package(self) -> str:
        """``reference_package`` of a benchmark row: the distribution and its installed
        version, e.g. ``transformers 5.25.0``."""
        if self.distribution is None:
            return NANOGPT_PACKAGE
        return f"{self.distribution} {importlib.metadata.version(self.distribution)}"

    def installed(self) -> bool:
        return self.distribution is None or importlib.util.find_spec(self.distribution) is not None


# --------------------------------------------------------------------------------------
# transformers: LlamaForCausalLM
# --------------------------------------------------------------------------------------


class HFLlama(nn.Module):
    """transformers' ``LlamaForCausalLM`` at a raydrat shape, trained with its own loss."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        import transformers

        config = transformers.LlamaConfig(**hf_config(cfg))
        self.model = transformers.LlamaForCausalLM._from_config(config, attn_implementation="sdpa")

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None):
        if targets is None:
            return self.model(input_ids=idx, use_cache=False).logits, None
        targets = targets.contiguous()  # its loss views them flat
        out = self.model(input_ids=idx, labels=targets, shift_labels=targets, use_cache=False)
        return out.logits, out.loss


# --------------------------------------------------------------------------------------
# torchtitan: llama3
# --------------------------------------------------------------------------------------


def titan_config(cfg: ModelConfig):
    """torchtitan's ``Llama3Model.Config`` at ``cfg``'s shape, built as its llama3 flavours
    are (``torchtitan.models.llama3``: fused wqkv, ComplexRoPE without scaling at
    ``cfg.rope_theta``, depth-scaled init of ``wo``, ``w2``, ``w3``), with SDPA inside."""
    from torchtitan.models import llama3 as tt
    from torchtitan.models.common import ComplexRoPE, Embedding, Linear, RMSNorm
    from torchtitan.models.common.attention import ScaledDotProductAttention
    from torchtitan.models.common.config_utils import make_ffn_config, make_gqa_config

    d, heads = cfg.d_model, cfg.n_head
    norm = lambda: RMSNorm.Config(normalized_shape=d, eps=NORM_EPS, param_init=tt._NORM_INIT)
    layers = [
        tt.Llama3TransformerBlock.Config(
            attention_norm=norm(),
            ffn_norm=norm(),
            attention=make_gqa_config(
                dim=d,
                n_heads=heads,
                n_kv_heads=cfg.kv_heads,
                wqkv_param_init=tt._LINEAR_INIT,
                wo_param_init=tt._depth_init(i),
                inner_attention=ScaledDotProductAttention.Config(),
                fuse_qkv=True,
                rope=ComplexRoPE.Config(dim=cfg.head_dim, max_seq_len=cfg.seq_len, theta=cfg.rope_theta),
            ),
            feed_forward=make_ffn_config(
                dim=d, hidden_dim=cfg.ff_dim, w1_param_init=tt._LINEAR_INIT, w2w3_param_init=tt._depth_init(i)
            ),
        )
        for i in range(cfg.n_layer)
    ]
    return tt.Llama3Model.Config(
        dim=d,
        vocab_size=cfg.vocab_size,
        enable_weight_tying=cfg.tie_embeddings,
        tok_embeddings=Embedding.Config(
            num_embeddings=cfg.vocab_size,
            embedding_dim=d,
            param_init=tt._EMBEDDING_SKIP_INIT if cfg.tie_embeddings else tt._EMBEDDING_INIT,
        ),
        norm=norm(),
        lm_head=Linear.Config(in_features=d, out_features=cfg.vocab_size, param_init=tt._output_linear_init(d)),
        layers=layers,
    )


class TitanLlama3(nn.Module):
    """torchtitan's llama3 at a raydrat shape, trained with torchtitan's loss (summed
    cross-entropy over the tokens, divided by their number as its trainer does)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.model = titan_config(cfg).build()
        self.model.init_states()

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None):
        from torchtitan.components.loss import cross_entropy_loss

        logits = self.model(idx)
        loss = None if targets is None else cross_entropy_loss(logits, targets) / targets.numel()
        return logits, loss


# --------------------------------------------------------------------------------------
# litgpt: GPT
# --------------------------------------------------------------------------------------


class LitGPT(nn.Module):
    """litgpt's ``GPT`` at a raydrat shape (a Llama: ``LLaMAMLP``, ``RMSNorm``, fused
    ``qkv``), trained with ``chunked_cross_entropy`` as litgpt's ``pretrain`` does."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        from litgpt.config import Config
        from litgpt.model import GPT as LitgptGPT

        config = Config(
            block_size=cfg.seq_len,
            vocab_size=cfg.vocab_size,
            padded_vocab_size=cfg.vocab_size,
            n_layer=cfg.n_layer,
            n_head=cfg.n_head,
            n_embd=cfg.d_model,
            n_query_groups=cfg.kv_heads,
            head_size=cfg.head_dim,
            rotary_percentage=1.0,
            parallel_residual=False,
            bias=False,
            norm_class_name="RMSNorm",
            norm_eps=NORM_EPS,
            mlp_class_name="LLaMAMLP",
            intermediate_size=cfg.ff_dim,
            rope_base=int(cfg.rope_theta),
        )
        self.model = LitgptGPT(config)
        self.model.apply(self.model._init_weights)
        if cfg.tie_embeddings:
            self.model.lm_head.weight = self.model.transformer.wte.weight

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None):
        from litgpt.utils import chunked_cross_entropy

        logits = self.model(idx)
        return logits, None if targets is None else chunked_cross_entropy(logits, targets)


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
        for name, p in self.named_parameters():  # nanoGPT's scaled init of the residual projections
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * n_layer))

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
    """The recipe's model as the Llama peers are built: RMSNorm, SwiGLU, no biases, no dropout."""
    return cfg.model_copy(update=dict(norm="rmsnorm", activation="swiglu", bias=False, dropout=0.0))


def _nanogpt(cfg: ModelConfig) -> nn.Module:
    return NanoGPT.like(cfg)


PEERS = (
    Peer("transformers", "transformers", "recipe", HFLlama),
    Peer("torchtitan", "torchtitan", "recipe", TitanLlama3),
    Peer("litgpt", "litgpt", "recipe", LitGPT),
    Peer("nanogpt", None, "nanogpt", _nanogpt),
)
"""Every peer, in the order of the benchmark's rows."""


def available(
    names: list[str] | None = None, log: Callable[[str], None] = print, peers: tuple[Peer, ...] = PEERS
) -> list[Peer]:
    """The ``peers`` (``names``: only these) whose package is installed; one line for each
    one skipped."""
    unknown = sorted(set(names or ()) - {p.name for p in peers})
    if unknown:
        raise ValueError(f"unknown peer(s) {unknown}: choose from {[p.name for p in peers]}")
    chosen = [p for p in peers if names is None or p.name in names]
    found = []
    for p in chosen:
        if p.installed():
            found.append(p)
        else:
            log(f"[bench model] {p.name}: skipped, {p.distribution} is not installed (pip install 'raydrat[peers]')")
    return found


def settings_for(peer: Peer, cfg: ModelConfig) -> ModelConfig:
    """raydrat's model as it is compared with ``peer``."""
    return recipe_settings(cfg) if peer.settings == "recipe" else nanogpt_settings(cfg)
