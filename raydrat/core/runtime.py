"""The one runtime resolution: what a run will run on and whether it can.

:func:`resolve` is called once, at the entry point (``raydrat train``, a sweep's admission,
``raydrat estimate``, a benchmark), and its :class:`Runtime` is handed down to everything
below (the workers, the techniques, the estimator). It decides:

* the device type: ``train.device``, ``scaling.use_gpu`` and the GPUs a worker can get
  (the Ray cluster's, passed by the caller; else this machine's);
* the precision (``precision.mode: auto`` → bf16 on a GPU that has it, else fp16 on a
  GPU, else fp32);
* what this hardware cannot run (fp16 or the ``efficient`` SDPA kernel on CPU, flash with
  attention dropout on CPU, a kernel the local device refuses), each refused with a message
  that names the setting to change;
* whether the recompute budget is achievable at all (below the floor of full
  recomputation it is refused, naming the minimum);
* the memory estimate (:func:`raydrat.core.memory.estimate.estimate_memory`).

On a worker, :meth:`Runtime.verify` probes the attention kernel on the real device once
(the driver may have no GPU): it refuses, it does not decide again.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from raydrat.config.base import ConfigError
from raydrat.config.run import RaydratConfig
from raydrat.core.memory.activations import activation_plan_bounds
from raydrat.core.memory.estimate import MemoryEstimate, estimate_memory
from raydrat.core.model.transformer import sdpa_backend
from raydrat.core.techniques.precision import DTYPES


class UnsupportedCombination(ConfigError):
    """The device cannot run the configured combination; the message names the setting."""


@dataclass(frozen=True)
class Runtime:
    """The resolved choices of one run (identical for every worker)."""

    device_type: str
    """``cpu`` or ``cuda``."""
    precision: str
    """``fp32`` | ``bf16`` | ``fp16`` (never ``auto``)."""
    attention_backend: str
    estimate: MemoryEstimate
    """Predicted peak training memory per worker."""

    @property
    def use_gpu(self) -> bool:
        return self.device_type == "cuda"

    @property
    def dtype(self) -> torch.dtype:
        return DTYPES[self.precision]

    def device(self, index: int | None = None) -> torch.device:
        """The torch device of a worker (``index``: its local CUDA device)."""
        if self.device_type == "cuda":
            return torch.device("cuda", index if index is not None else torch.cuda.current_device())
        return torch.device("cpu")

    def verify(self, device: torch.device, dropout: float) -> None:
        """Refuse, on the worker, what ``device`` cannot run: no GPU where one was resolved,
        bf16 on a GPU without it, an attention kernel that fails on this device."""
        if self.device_type == "cuda" and device.type != "cuda":
            raise UnsupportedCombination(
                "this run resolved to CUDA but the worker sees no GPU: set scaling.use_gpu=false or "
                "train.device=cpu, or run on GPU workers"
            )
        if device.type == "cuda" and self.precision == "bf16" and not torch.cuda.is_bf16_supported():
            raise UnsupportedCombination(
                f"precision.mode=bf16: {torch.cuda.get_device_name(device)} has no bf16 support: "
                "use precision.mode=fp16 or auto"
            )
        probe_attention(self.attention_backend, device, self.dtype, dropout)


def resolve(cfg: RaydratConfig, gpus: float | None = None) -> Runtime:
    """Resolve ``cfg`` for the machine or cluster it will run on. ``gpus``: how many GPUs
    the cluster offers a worker (``None``: this machine's CUDA devices). Raises
    :class:`UnsupportedCombination` (a :class:`ConfigError`) for what cannot run."""
    device_type = resolve_device_type(cfg, gpus)
    precision = resolve_precision(cfg.precision.mode, device_type)
    mc = cfg.model
    if device_type == "cpu":
        if mc.attention_backend == "efficient":
            raise UnsupportedCombination(
                "model.attention_backend=efficient has no CPU kernel, and this run is on CPU: use flash, math or auto"
            )
        if mc.attention_backend == "flash" and mc.dropout > 0:
            raise UnsupportedCombination(
                "model.attention_backend=flash has no CPU kernel with attention dropout "
                f"(model.dropout={mc.dropout}): use math or auto, or set model.dropout=0"
            )
        probe_attention(mc.attention_backend, torch.device("cpu"), DTYPES[precision], mc.dropout)
    check_budget_floor(cfg, device_type, precision)
    return Runtime(device_type, precision, mc.attention_backend, estimate_memory(cfg, device_type, precision))


def resolve_device_type(cfg: RaydratConfig, gpus: float | None = None) -> str:
    """``cuda`` or ``cpu`` from ``train.device``, ``scaling.use_gpu`` and the GPUs there are."""
    have_gpu = (torch.cuda.device_count() if gpus is None else gpus) > 0
    use_gpu, device = cfg.scaling.use_gpu, cfg.train.device
    if device == "cpu" or use_gpu is False:
        if device == "cuda":
            raise UnsupportedCombination("train.device=cuda with scaling.use_gpu=false: set one of them to auto")
        return "cpu"
    if device == "cuda" or use_gpu is True:
        if not have_gpu:
            raise UnsupportedCombination(
                f"{'train.device=cuda' if device == 'cuda' else 'scaling.use_gpu=true'} but no GPU is available "
                "here: set it to auto, or run on a machine or cluster with GPUs"
            )
        return "cuda"
    return "cuda" if have_gpu else "cpu"


def resolve_precision(choice: str, device_type: str) -> str:
    if device_type != "cuda":
        if choice == "fp16":
            raise UnsupportedCombination(
                "precision.mode=fp16 needs a CUDA GPU (fp16 autocast with a GradScaler is not a CPU "
                "training mode), but this run is on CPU: use precision.mode=bf16, fp32 or auto"
            )
        return "fp32" if choice == "auto" else choice
    if choice == "auto":
        # a GPU we can see decides; GPUs only the cluster has are taken to support bf16
        # (a worker on one that does not is refused by Runtime.verify, naming the fix)
        if torch.cuda.is_available():
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return "bf16"
    return choice


def check_budget_floor(cfg: RaydratConfig, device_type: str, precision: str) -> None:
    """An activation budget below what recomputing every branch still saves is refused,
    naming the minimum achievable."""
    budget_mb = cfg.recompute.budget_mb
    if budget_mb is None:
        return
    lo, _ = activation_plan_bounds(cfg, device_type, precision)
    if budget_mb * 2**20 < lo:
        raise UnsupportedCombination(
            f"recompute.budget_mb={budget_mb:g} is below the minimum achievable {lo / 2**20:.3f} MB (every "
            f"{'block' if cfg.recompute.granularity == 'op' else 'branch'} recomputed) for this model and batch: "
            "raise recompute.budget_mb, or lower "
            "train.batch_size or model.seq_len"
        )


def probe_attention(backend: str, device: torch.device, dtype: torch.dtype, dropout: float) -> None:
    """Run the SDPA kernel once forward and backward on a tiny input; refuse if it fails."""
    if backend == "auto":
        return
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
