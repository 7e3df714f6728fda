"""Training length, batching, evaluation, checkpoints and placement (section ``train:``)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from raydrat.config.base import Section


class TrainConfig(Section):
    steps: int = Field(100, ge=1)
    """Optimizer steps to train."""
    batch_size: int = Field(8, ge=1)
    """Sequences per micro-batch per worker."""
    grad_accum: int = Field(1, ge=1)
    """Micro-batches accumulated per optimizer step."""
    eval_every: int = Field(50, ge=1)
    """Evaluate on the validation set every this many optimizer steps (and at the end)."""
    eval_batches: int = Field(8, ge=1)
    """Validation micro-batches per evaluation (at most the whole val set)."""
    log_every: int = Field(10, ge=1)
    """Print and record training metrics every this many optimizer steps."""
    checkpoint_every: int = Field(0, ge=0)
    """Save a checkpoint every this many steps; 0: only at evaluations."""
    checkpoints_to_keep: int = Field(2, ge=1)
    """Checkpoints kept on disk (best by validation loss)."""
    seed: int = 1337
    """Seed for model init and data order."""
    storage_path: str = "ray_results"
    """Ray Train storage for checkpoints (relative paths resolve against the working
    directory)."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """``auto``: CUDA when the worker has a GPU, else CPU."""
    max_failures: int = Field(0, ge=-1)
    """Ray Train ``FailureConfig(max_failures)``: how many times a failed worker group is
    restarted from the latest checkpoint; -1 retries forever."""
    auto_microbatch: bool = False
    """On an out-of-memory error, retry the step with half the micro-batch and twice the
    accumulation (same global batch), down to ``train.min_micro_batch``; the micro-batch
    in use is reported as ``micro_batch_size``."""
    min_micro_batch: int = Field(1, ge=1)
    """Smallest micro-batch ``train.auto_microbatch`` may shrink to before giving up."""
