"""Memory pressure in the training loop: the peak-memory watch, and the optimizer step
that survives an out-of-memory error by shrinking the micro-batch (``train.auto_microbatch``).

Test-only fault injection: ``RAYDRAT_FAULT_OOM_MICRO_BATCH_ABOVE=N`` makes every step whose
micro-batch holds more than N sequences raise ``torch.OutOfMemoryError``, as a smaller
device would. It is read here and nowhere else; never set it outside tests.
"""

from __future__ import annotations

import ctypes
import os
import time

import torch

from raydrat.config import TrainConfig
from raydrat.runtime import walk_exceptions
from raydrat.train.step import train_step

FAULT_ENV = "RAYDRAT_FAULT_OOM_MICRO_BATCH_ABOVE"


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
        "fordblks", "keepcost")]


def _malloc_in_use_fn():
    """glibc's ``mallinfo2`` (bytes handed out by malloc, mmap'd blocks included), which is
    where PyTorch's CPU tensors live; ``None`` where it is not available."""
    try:
        fn = ctypes.CDLL(None).mallinfo2
    except (OSError, AttributeError):
        return None
    fn.restype = _MallInfo2

    def in_use() -> int:
        info = fn()
        return int(info.uordblks + info.hblkhd)

    return in_use


class PeakMemory:
    """Peak memory of the training process since construction: CUDA max allocated bytes
    on a GPU; on CPU the peak of malloc'd bytes over their level at construction, sampled
    at the end of every forward pass of the watched model (when activations peak)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.device = device
        self.in_use = None if self.cuda else _malloc_in_use_fn()
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(device)
        self.baseline = self.in_use() if self.in_use else 0
        self.max_seen = self.baseline

    def watch(self, model: torch.nn.Module) -> None:
        if self.in_use is not None:
            model.register_forward_hook(lambda *_: self.sample())

    def sample(self) -> None:
        self.max_seen = max(self.max_seen, self.in_use())

    def peak(self) -> int | None:
        if self.cuda:
            return int(torch.cuda.max_memory_allocated(self.device))
        if self.in_use is None:
            return None
        self.sample()
        return self.max_seen - self.baseline


def is_oom(exc: BaseException) -> bool:
    """True when ``exc`` (or anything it wraps, Ray's wrappers included) is an OOM."""
    if any(
        isinstance(e, torch.OutOfMemoryError) or "OutOfMemoryError" in type(e).__name__
        for e in walk_exceptions(exc)
    ):
        return True
    return "OutOfMemoryError" in str(exc) or "CUDA out of memory" in str(exc)


def _inject_fault(micro_batch: int) -> None:
    limit = os.environ.get(FAULT_ENV)
    if limit and micro_batch > int(limit):
        raise torch.OutOfMemoryError(
            f"injected out-of-memory: micro-batch {micro_batch} > {limit} ({FAULT_ENV}, test only)"
        )


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

    def __call__(self, model, optimizer, batches: list[torch.Tensor], grad_clip: float, **step_kwargs):
        """``step_kwargs`` (the efficiency plan's ``hooks``, the sync strategy's ``no_sync``)
        go to :func:`train_step` unchanged."""
        t0 = time.perf_counter()
        while True:
            try:
                _inject_fault(min(self.micro_batch, batches[0].shape[0]))
                out = train_step(model, optimizer, self._split(batches), grad_clip, **step_kwargs)
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
