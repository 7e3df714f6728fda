"""What the training state holds besides activations: the model's parameters and buffers
(from one meta-device build per model config), the optimizer's states and the temporaries of
one optimizer step, for torch's AdamW and SGD and bitsandbytes' 8-bit AdamW."""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

from raydrat.config.model import ModelConfig
from raydrat.config.run import RaydratConfig
from raydrat.core.model.transformer import GPT

MIN_8BIT_NUMEL = 4096
"""bitsandbytes keeps 32-bit states for tensors with fewer elements than this."""
BNB_BLOCK = 256
"""bitsandbytes block size: one fp32 absmax per state per block; two 256-entry fp32 maps
shared by all tensors."""


def _meta_model(mcfg: ModelConfig) -> GPT:
    with torch.device("meta"):
        return GPT(mcfg)


@dataclass(frozen=True)
class Layout:
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
def _layout_of(model_json: str) -> Layout:
    meta = _meta_model(ModelConfig.model_validate_json(model_json))
    params = list(meta.parameters())  # a tied weight once
    block = meta.layers["0"]
    mats = sum(4 * p.numel() for p in params if p.dim() >= 2)
    return Layout(
        shapes=tuple(p.numel() for p in params),
        layer_shapes=tuple(tuple(p.numel() for p in b.parameters()) for b in meta.layers.values()),
        attn_bytes=4 * sum(p.numel() for p in block.attn_branch.parameters()),
        mlp_bytes=4 * sum(p.numel() for p in block.mlp_branch.parameters()),
        buffer_bytes=sum(4 * b.numel() for b in meta.buffers()),
        groups=(mats, 4 * sum(p.numel() for p in params) - mats),
    )


def model_layout(mc: ModelConfig) -> Layout:
    """The model's tensor layout, built once per model config (a meta-device GPT)."""
    return _layout_of(mc.model_dump_json())


def trained_shapes(cfg: RaydratConfig, layout: Layout) -> list[int]:
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


def optimizer_state_bytes(shapes: list[int], name: str) -> int:
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


def optimizer_step_bytes(shapes: list[int], name: str, device: str, groups: tuple[int, int]) -> int:
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
