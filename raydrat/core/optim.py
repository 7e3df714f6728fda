"""Optimizer factory and learning-rate schedule (linear warmup, cosine decay)."""

from __future__ import annotations

import math
import warnings

import torch

from raydrat.config.base import ConfigError
from raydrat.config.optim import OptimConfig


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Matrices (dim >= 2) get weight decay; norms, biases and other vectors do not."""
    decay, no_decay = [], []
    seen: set[int] = set()
    for p in model.parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (decay if p.dim() >= 2 else no_decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_optimizer(model: torch.nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    groups = param_groups(model, cfg.weight_decay)
    kwargs = dict(lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)
    if cfg.name == "adamw":
        return torch.optim.AdamW(groups, **kwargs)
    if cfg.name == "adamw_fused":
        return torch.optim.AdamW(groups, fused=True, **kwargs)
    if cfg.name in ("adamw8bit", "paged_adamw8bit"):
        try:
            import bitsandbytes as bnb  # optional heavy dependency (extra [bnb]): only the 8-bit optimizers need it
        except ImportError:
            raise ConfigError(
                f"optim.name={cfg.name} needs bitsandbytes, which is not installed: "
                "pip install 'raydrat[bnb]', or use optim.name=adamw"
            ) from None

        cls = bnb.optim.AdamW8bit if cfg.name == "adamw8bit" else bnb.optim.PagedAdamW8bit
        with warnings.catch_warnings():  # "paged optimizers are not supported on CPU": documented
            warnings.filterwarnings("ignore", message="Paged optimizers are not supported on CPU")
            return cls(groups, **kwargs)
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr)
    raise ValueError(f"optim.name={cfg.name!r} is not supported")


def lr_at(step: int, cfg: OptimConfig, total_steps: int) -> float:
    """Learning rate for optimizer step ``step`` (0-based)."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(1, total_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1.0 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
