"""The optimizer step that survives an out-of-memory error by shrinking the micro-batch
(``train.auto_microbatch``), and recognising an OOM inside the wrappers Ray puts around it."""

from __future__ import annotations

import time

import torch

from raydrat.config.train import TrainConfig
from raydrat.core.exceptions import walk_exceptions
from raydrat.core.step import train_step


def is_oom(exc: BaseException) -> bool:
    """True when ``exc`` (or anything it wraps, Ray's wrappers included) is an OOM."""
    if any(
        isinstance(e, torch.OutOfMemoryError) or "OutOfMemoryError" in type(e).__name__ for e in walk_exceptions(exc)
    ):
        return True
    return "OutOfMemoryError" in str(exc) or "CUDA out of memory" in str(exc)


class MicroBatchStep:
    """``train_step`` over a step's batches; with ``auto_microbatch`` an OOM retries the
    same batches split into halves (twice the accumulation, same global batch), down to
    ``min_micro_batch`` sequences. The split persists for the rest of the run."""

    def __init__(self, tc: TrainConfig):
        self.auto = tc.auto_microbatch
        self.floor = tc.min_micro_batch
        self.micro_batch = tc.batch_size
        self.train_time_s = 0.0
        self.retries = 0

    def _split(self, batches: list[torch.Tensor]) -> list[torch.Tensor]:
        return [piece for b in batches for piece in torch.split(b, self.micro_batch)]

    def __call__(self, model, optimizer, batches: list[torch.Tensor], grad_clip: float, techniques=None):
        """One optimizer step over ``batches`` (see :func:`raydrat.core.step.train_step`)."""
        t0 = time.perf_counter()
        while True:
            try:
                out = train_step(model, optimizer, self._split(batches), grad_clip, techniques)
                break
            except torch.OutOfMemoryError:
                smaller = self.micro_batch // 2
                if not self.auto or smaller < self.floor:
                    raise
                optimizer.zero_grad(set_to_none=True)
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                self.micro_batch = smaller
                self.retries += 1
        self.train_time_s += time.perf_counter() - t0
        return out
