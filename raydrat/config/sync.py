"""How the workers share the training: replicated (DDP, local updates) or sharded (FSDP)
(section ``sync:``)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from raydrat.config.base import Section, changed_fields

LOCAL_ONLY = (
    "engine",
    "sync_steps",
    "average_optimizer_state",
    "outer_optimizer",
    "outer_lr",
    "outer_momentum",
    "outer_warmup",
    "fragments",
    "delay",
    "overlap_keep",
    "quantization",
    "quant_block",
)
DDP_ONLY = ("bucket_cap_mb", "find_unused_parameters")
ONLY_FOR = {"ddp": DDP_ONLY, "local": LOCAL_ONLY}
"""The settings that mean something in one mode only (the others refuse them)."""
TORCHFT_LACKS = {
    "average_optimizer_state": "torchft averages the parameters or pseudo-gradients only",
    "outer_warmup": "torchft's outer optimizer has no warm-up",
    "quantization": "torchft's quantized all-reduce needs Triton on a CUDA GPU",
    "quant_block": "torchft's quantized all-reduce needs Triton on a CUDA GPU",
}
"""The ``local`` settings torchft's LocalSGD / DiLoCo have no counterpart for, and why."""


class SyncConfig(Section):
    """How the Ray Train workers synchronise (see docs/distributed.md)."""

    mode: Literal["ddp", "local", "fsdp"] = "ddp"
    """``ddp``: every worker holds the whole model; gradients are all-reduced every optimizer
    step (PyTorch DDP). ``local``: every worker holds the whole model and takes
    ``sync_steps`` optimizer steps on its own shard, then the replicas are averaged (local
    SGD; DiLoCo with ``outer_optimizer``; Streaming DiLoCo with ``fragments``, ``delay`` and
    ``quantization``). ``fsdp``: PyTorch's ``fully_shard`` (FSDP2) per transformer block:
    each worker holds ``1 / scaling.num_workers`` of the parameters, gradients and optimizer
    state, gathers a block's parameters for its forward and backward, and reduce-scatters
    its gradients every step; for models whose training state does not fit one worker (see
    docs/distributed.md). With one worker every mode is plain training."""
    engine: Literal["raydrat", "torchft"] = "raydrat"
    """``local`` only: who runs the local updates. ``raydrat``: raydrat's own exchange over
    the worker group's process group; any failure restarts every worker from the last
    checkpoint. ``torchft``: each Ray Train worker is a torchft replica group with its own
    ``Manager`` (Ray Train's ``TorchftConfig`` runs the Lighthouse): torchft's ``LocalSGD``
    (no outer optimizer) or ``DiLoCo`` (``outer_optimizer: nesterov``, streaming with
    ``fragments``) sync the replicas that are alive, a dead replica is replaced alone, and
    its replacement takes the parameters and outer-optimizer state from a live peer at the
    next sync (see docs/distributed.md). Needs ``pip install 'raydrat[torchft]'`` and at
    least two workers."""
    sync_steps: int = Field(1, ge=1)
    """``local`` only: optimizer steps between two syncs of the same parameters (H)."""
    average_optimizer_state: bool = False
    """``local`` only: also average the optimizer's floating-point state (e.g. AdamW
    moments) at each sync; otherwise it stays local to each worker."""
    outer_optimizer: Literal["none", "nesterov"] = "none"
    """``local`` only: ``nesterov`` treats the averaged change since the last sync as a
    pseudo-gradient for an outer SGD with Nesterov momentum (DiLoCo)."""
    outer_lr: float = Field(0.5, gt=0)
    """Learning rate of the outer optimizer. With ``outer_momentum`` its default makes the
    steady-state gain ``outer_lr / (1 - outer_momentum)`` 1: a pseudo-gradient moves the
    weights by its own size once momentum has built up. DiLoCo's 0.7 with momentum 0.9
    (gain 7) suits its H = 500 but diverges at H = 4 or 16 (measured in docs/distributed.md)."""
    outer_momentum: float = Field(0.5, ge=0, lt=1)
    """Nesterov momentum of the outer optimizer (DiLoCo's is 0.9 at H = 500)."""
    outer_warmup: int = Field(0, ge=0)
    """Outer steps (syncs of one fragment) over which the outer learning rate ramps
    linearly up to ``outer_lr``; 0: none."""
    fragments: int = Field(1, ge=1)
    """``local`` only: streaming DiLoCo. Split the parameters into this many fragments,
    each synced once every ``sync_steps`` steps at staggered steps (one fragment every
    ``sync_steps / fragments`` steps), so the bytes of one step fall by this factor.
    Fragment ``k`` holds blocks ``k, k + F, ...`` and the ``k``-th row chunk of the tensors
    outside the blocks (embedding, final norm). At most ``model.n_layer``."""
    delay: int = Field(0, ge=0)
    """``local`` only: steps between launching a fragment's exchange and applying its
    result (the exchange runs in the background, overlapped with these steps' compute;
    Streaming DiLoCo's tau). Below ``sync_steps / fragments``."""
    overlap_keep: float = Field(1.0, ge=0, le=1)
    """With ``delay``: the share of the local progress made during the overlap that is
    kept when the delayed result lands (1: the outer update is applied as a correction
    on top of it; 0: the fragment is reset to the new global weights)."""
    quantization: Literal["none", "bf16", "int8"] = "none"
    """``local`` only: how pseudo-gradients travel. ``bf16``: 2 bytes per value; ``int8``:
    1 byte per value plus one fp32 scale per ``quant_block`` values (absmax). Reduced in
    fp32 after a reduce-scatter, re-quantized for the all-gather: every rank gets the
    same result."""
    quant_block: int = Field(256, ge=8)
    """``int8`` only: values sharing one fp32 scale."""
    bucket_cap_mb: float | None = Field(None, gt=0)
    """``ddp`` only: DDP gradient bucket size in MB (``None``: PyTorch's default, 25)."""
    find_unused_parameters: bool = False
    """``ddp`` only: let DDP tolerate parameters without gradients in a step (always on
    when ``slots.mode`` is not ``all``: skipped layers get no gradients)."""

    @model_validator(mode="after")
    def _check_mode(self) -> SyncConfig:
        for mode, keys in ONLY_FOR.items():
            stray = changed_fields(self, keys) if self.mode != mode else []
            if stray:
                raise ValueError(
                    f"sync.{', sync.'.join(stray)} only apply to sync.mode={mode}, not sync.mode={self.mode}: "
                    f"set sync.mode={mode} or remove them"
                )
        if self.mode == "local":
            self._check_streaming()
        if self.engine == "torchft":
            self._check_torchft()
        return self

    def _check_torchft(self) -> None:
        for key, why in TORCHFT_LACKS.items():
            if key in self.model_fields_set and getattr(self, key) != type(self).model_fields[key].default:
                raise ValueError(
                    f"sync.{key} cannot be combined with sync.engine=torchft: {why}; "
                    f"remove sync.{key} or set sync.engine=raydrat"
                )
        if self.delay and self.overlap_keep != 0:
            raise ValueError(
                f"sync.delay with sync.engine=torchft needs sync.overlap_keep=0 (got {self.overlap_keep:g}): "
                "torchft's DiLoCo sets a fragment to the new global weights when its delayed exchange "
                "lands; set sync.overlap_keep=0 or sync.engine=raydrat"
            )
        if self.delay and self.outer_optimizer == "none":
            raise ValueError(
                "sync.delay with sync.engine=torchft needs sync.outer_optimizer=nesterov: torchft's "
                "delayed exchange is DiLoCo's; set sync.outer_optimizer=nesterov or remove sync.delay"
            )
        if self.fragments > 1 and self.outer_optimizer == "none":
            raise ValueError(
                "sync.fragments with sync.engine=torchft needs sync.outer_optimizer=nesterov: torchft "
                "streams fragments in DiLoCo only; set sync.outer_optimizer=nesterov or sync.fragments=1"
            )

    def _check_streaming(self) -> None:
        H, F = self.sync_steps, self.fragments
        if F > 1 and H % F:
            raise ValueError(
                f"sync.sync_steps ({H}) must be a multiple of sync.fragments ({F}): one fragment "
                "syncs every sync_steps / fragments steps"
            )
        if self.delay and self.delay >= H // F:
            raise ValueError(
                f"sync.delay ({self.delay}) must be below sync.sync_steps / sync.fragments "
                f"({H}/{F} = {H // F}): a fragment's exchange lands before the next one starts"
            )
        if self.average_optimizer_state and (F > 1 or self.delay):
            other = "sync.fragments" if F > 1 else "sync.delay"
            raise ValueError(
                f"sync.average_optimizer_state cannot be combined with {other}: the optimizer "
                f"state is averaged whole at one step; remove one of them"
            )
        if self.quantization != "int8" and "quant_block" in self.model_fields_set and self.quant_block != 256:
            raise ValueError("sync.quant_block only applies to sync.quantization=int8")
