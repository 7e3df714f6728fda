"""The model's settings (section ``model:``), read by the model package (:mod:`raydrat.core.model`).

Layer 1: pydantic only, imports nothing else of raydrat, so a config can be validated
without building a model or asking the machine anything.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class ModelConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    vocab_size: int = Field(4096, ge=16)
    """Vocabulary size. Also the size the BPE tokenizer is trained to; a tokenizer with
    more tokens than this is refused."""
    seq_len: int = Field(256, ge=8)
    """Context length in tokens. The data pipeline packs ``seq_len + 1`` token blocks."""
    d_model: int = Field(256, ge=8)
    """Residual stream width."""
    n_layer: int = Field(4, ge=1)
    """Number of transformer layers (slots)."""
    n_head: int = Field(4, ge=1)
    """Number of query heads."""
    n_kv_head: int | None = Field(None, ge=1)
    """Number of key/value heads (grouped-query attention). ``None`` means ``n_head``
    (plain multi-head attention); 1 is multi-query attention. Must divide ``n_head``."""
    d_ff: int | None = Field(None, ge=1)
    """Hidden width of the MLP. ``None``: 4 * d_model, or 8/3 * d_model rounded up to a
    multiple of 64 for the gated activations (swiglu, geglu) to keep parameters equal."""
    activation: Literal["gelu", "relu", "silu", "swiglu", "geglu"] = "gelu"
    """MLP activation. ``swiglu``/``geglu`` are gated (three projections)."""
    norm: Literal["rmsnorm", "layernorm"] = "rmsnorm"
    """Normalisation layer used before attention, before the MLP and before the head."""
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    """Dropout probability on attention weights and residual branches."""
    bias: bool = False
    """Use bias terms in linear layers and LayerNorm."""
    tie_embeddings: bool = True
    """Share the token embedding matrix with the output head."""
    rope_theta: float = Field(10000.0, gt=0)
    """RoPE base frequency."""
    init_std: float = Field(0.02, gt=0)
    """Standard deviation of the GPT-2 style normal init (residual projections are scaled
    by 1/sqrt(2 * n_layer))."""
    attention_backend: Literal["auto", "flash", "efficient", "math"] = "auto"
    """Kernel for ``F.scaled_dot_product_attention``. ``auto`` lets PyTorch choose."""

    init_from: str | None = None
    """Start from these weights instead of a random init (continued pretraining): a raydrat
    checkpoint directory or run directory, or a directory written by ``raydrat export``
    (``--format hf`` or ``safetensors``) of the same architecture. Every parameter must
    match the config's shapes; a mismatch names the parameter and both shapes."""

    @model_validator(mode="after")
    def _check_shapes(self) -> ModelConfig:
        if self.d_model % self.n_head:
            raise ValueError(
                f"model.d_model ({self.d_model}) must be divisible by model.n_head ({self.n_head}): change one of them"
            )
        if (self.d_model // self.n_head) % 2:
            raise ValueError(
                f"model.d_model / model.n_head = {self.d_model // self.n_head} must be even "
                "for RoPE: change model.d_model or model.n_head"
            )
        kv = self.kv_heads
        if self.n_head % kv:
            raise ValueError(
                f"model.n_head ({self.n_head}) must be divisible by model.n_kv_head ({kv}): "
                f"choose n_kv_head from {[d for d in range(1, self.n_head + 1) if self.n_head % d == 0]}"
            )
        return self

    @property
    def kv_heads(self) -> int:
        return self.n_kv_head or self.n_head

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head

    @property
    def gated_mlp(self) -> bool:
        return self.activation in ("swiglu", "geglu")

    @property
    def ff_dim(self) -> int:
        if self.d_ff is not None:
            return self.d_ff
        if self.gated_mlp:
            hidden = int(8 * self.d_model / 3)
            return 64 * ((hidden + 63) // 64)
        return 4 * self.d_model
