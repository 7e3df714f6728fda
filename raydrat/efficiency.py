"""Which combinations of optimisation switches this hardware can run.

Two stages, both raising an error that names the setting to change:

* :func:`check_static` runs inside config validation: what the config alone says is
  impossible (fp16 or the ``efficient`` SDPA kernel on a CPU-only run, a budget below the
  minimum that even full recomputation needs, inconsistent slot bounds).
* :func:`resolve_runtime` runs at worker start, where the device is known: resolves the
  ``auto`` choices and probes the SDPA kernel with the run's dtype and dropout, so a
  kernel the device lacks is refused with PyTorch's reason instead of failing mid-step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from raydrat.config import RaydratConfig

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def cpu_only(cfg: "RaydratConfig") -> bool:
    """True when the config alone says training runs on CPU."""
    return cfg.train.device == "cpu" or cfg.scaling.use_gpu is False


def check_static(cfg: "RaydratConfig") -> None:
    """Refuse combinations the config alone shows to be impossible (ValueError)."""
    tc, mc, sc = cfg.train, cfg.model, cfg.slots
    if cpu_only(cfg):
        if tc.precision == "fp16":
            raise ValueError(
                "train.precision=fp16 needs a CUDA GPU (fp16 autocast with a GradScaler is not "
                "a CPU training mode), but this run is CPU-only: use train.precision=bf16, fp32 or auto"
            )
        if mc.attention_backend == "efficient":
            raise ValueError(
                "model.attention_backend=efficient has no CPU kernel: use flash, math or auto"
            )
        if mc.attention_backend == "flash" and mc.dropout > 0:
            raise ValueError(
                "model.attention_backend=flash has no CPU kernel with attention dropout "
                f"(model.dropout={mc.dropout}): use math or auto, or set model.dropout=0"
            )
    n = mc.n_layer
    if sc.mode == "fixed":
        if not sc.fixed:
            raise ValueError("slots.mode=fixed needs slots.fixed, a list of layer indices")
        bad = sorted({i for i in sc.fixed if not 0 <= i < n})
        if bad:
            raise ValueError(f"slots.fixed has {bad} outside 0..{n - 1} (model.n_layer={n})")
        if len(set(sc.fixed)) != len(sc.fixed):
            raise ValueError(f"slots.fixed {sc.fixed} repeats a layer: list each layer once")
    max_slots = sc.max_slots or n
    if max_slots > n:
        raise ValueError(f"slots.max_slots ({max_slots}) exceeds model.n_layer ({n})")
    if sc.min_slots > max_slots:
        raise ValueError(f"slots.min_slots ({sc.min_slots}) exceeds slots.max_slots ({max_slots})")
    if sc.start_slots is not None and not sc.min_slots <= sc.start_slots <= max_slots:
        raise ValueError(
            f"slots.start_slots ({sc.start_slots}) must lie in [slots.min_slots, slots.max_slots] "
            f"= [{sc.min_slots}, {max_slots}]"
        )
    if tc.checkpointing == "gated" and cfg.gates.memory_budget_mb is not None:
        _check_budget_floor(cfg, "gates.memory_budget_mb", cfg.gates.memory_budget_mb)
    if tc.checkpointing == "budget":
        if cfg.recompute.budget_mb is None:
            raise ValueError("train.checkpointing=budget needs recompute.budget_mb (MB of saved activations)")
        _check_budget_floor(cfg, "recompute.budget_mb", cfg.recompute.budget_mb)


def _check_budget_floor(cfg: RaydratConfig, key: str, budget_mb: float) -> None:
    """An activation budget below what recomputing every branch still saves is refused,
    naming ``key`` and the minimum achievable."""
    from raydrat.memory import activation_plan_bounds

    lo, _ = activation_plan_bounds(cfg)
    if budget_mb * 2**20 < lo:
        raise ValueError(
            f"{key}={budget_mb:g} is below the minimum achievable {lo / 2**20:.3f} MB (every branch "
            f"recomputed) for this model and batch: raise {key}, or lower train.batch_size or model.seq_len"
        )


@dataclass(frozen=True)
class Runtime:
    """The resolved choices for one worker."""

    device: torch.device
    precision: str  # fp32 | bf16 | fp16 (never auto)
    attention_backend: str

    @property
    def dtype(self) -> torch.dtype:
        return DTYPES[self.precision]


class UnsupportedCombination(RuntimeError):
    """The device cannot run the configured combination; the message names the setting."""


def resolve_precision(choice: str, device: torch.device) -> str:
    if device.type != "cuda":
        if choice == "fp16":
            raise UnsupportedCombination(
                "train.precision=fp16 needs a CUDA GPU but this worker runs on CPU: "
                "use train.precision=bf16, fp32 or auto"
            )
        return "fp32" if choice == "auto" else choice
    if choice == "auto":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if choice == "bf16" and not torch.cuda.is_bf16_supported():
        raise UnsupportedCombination(
            f"train.precision=bf16: {torch.cuda.get_device_name(device)} has no bf16 support: "
            "use train.precision=fp16 or auto"
        )
    return choice


def probe_attention(backend: str, device: torch.device, dtype: torch.dtype, dropout: float) -> None:
    """Run the SDPA kernel once forward and backward on a tiny input; refuse if it fails."""
    if backend == "auto":
        return
    from raydrat.model.transformer import sdpa_backend

    q = torch.randn(1, 2, 8, 16, device=device, dtype=dtype, requires_grad=True)
    try:
        with sdpa_backend(backend):
            y = torch.nn.functional.scaled_dot_product_attention(q, q, q, is_causal=True, dropout_p=dropout)
        y.float().sum().backward()
    except RuntimeError as exc:
        reason = str(exc).strip().splitlines()[0]
        raise UnsupportedCombination(
            f"model.attention_backend={backend} cannot run on {device.type} with "
            f"{str(dtype).removeprefix('torch.')} and dropout {dropout} ({reason}): use model.attention_backend=auto"
        ) from None


def resolve_runtime(cfg: "RaydratConfig", device: torch.device) -> Runtime:
    """Resolve ``auto`` choices for ``device`` and refuse what it cannot run."""
    precision = resolve_precision(cfg.train.precision, device)
    probe_attention(cfg.model.attention_backend, device, DTYPES[precision], cfg.model.dropout)
    return Runtime(device=device, precision=precision, attention_backend=cfg.model.attention_backend)
