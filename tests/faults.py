"""Faults injected from outside production code, and probes that record what a worker did,
as ``fit`` callbacks a test registers (they travel to Ray workers by value: ``conftest``
registers this module with cloudpickle)."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import torch

from raydrat.core.fit import Callback, FitState
from raydrat.core.techniques.base import unwrap


def oom_above(model: torch.nn.Module, limit: int):
    """Make every forward of ``model`` whose micro-batch holds more than ``limit``
    sequences raise ``torch.OutOfMemoryError``, as a smaller device would. Returns the hook
    handle (``.remove()`` undoes it)."""

    def hook(_module, args):
        if args[0].shape[0] > limit:
            raise torch.OutOfMemoryError(f"injected out-of-memory: micro-batch {args[0].shape[0]} > {limit} (test)")

    return unwrap(model).register_forward_pre_hook(hook)


class OOMAbove(Callback):
    """:func:`oom_above` on the worker's model for the whole fit."""

    def __init__(self, limit: int):
        self.limit = limit

    def on_fit_start(self, state: FitState) -> None:
        oom_above(state.model, self.limit)


class KillAt(Callback):
    """After optimizer step ``step``, rank ``rank`` of a worker group that did not start from
    a checkpoint kills its own process (SIGKILL), once the controller had a moment to
    register the step's report."""

    def __init__(self, step: int, rank: int = 0):
        self.step, self.rank = step, rank

    def on_step_end(self, state: FitState) -> None:
        if state.step == self.step and state.rank == self.rank and not state.restored:
            time.sleep(1.0)
            os.kill(os.getpid(), signal.SIGKILL)


class StopAt(Callback):
    """After optimizer step ``step``, rank ``rank`` kills its own process (SIGKILL), whether
    or not its worker group started from a checkpoint: each leg of a chain of resumes stops
    at its own step."""

    def __init__(self, step: int, rank: int = 0):
        self.step, self.rank = step, rank

    def on_step_end(self, state: FitState) -> None:
        if state.step == self.step and state.rank == self.rank:
            time.sleep(1.0)
            os.kill(os.getpid(), signal.SIGKILL)


class TraceBlocks(Callback):
    """Every rank appends, after each step, ``[step, world_size, [[position, block_id, epoch],
    ...]]`` of the blocks it trained on in that step to ``directory/{tag}-rank{r}.jsonl``
    (the training stream's trace: ``state.position.trace``)."""

    def __init__(self, directory, tag: str):
        self.directory, self.tag = str(directory), tag

    def on_fit_start(self, state: FitState) -> None:
        state.position.trace = []

    def on_step_end(self, state: FitState) -> None:
        trace = state.position.trace
        line = json.dumps([state.step, state.world_size, [list(t) for t in trace]])
        with open(Path(self.directory) / f"{self.tag}-rank{state.rank}.jsonl", "a") as f:
            f.write(line + "\n")
        trace.clear()


def read_traces(directory, tag: str) -> dict[int, list[tuple[int, int, int]]]:
    """``{step: [(position, block_id, epoch), ...]}`` of every rank's trace of ``tag``."""
    steps: dict[int, list] = {}
    for path in sorted(Path(directory).glob(f"{tag}-rank*.jsonl")):
        for line in path.read_text().splitlines():
            step, _, blocks = json.loads(line)
            steps.setdefault(step, []).extend(tuple(b) for b in blocks)
    return steps


def corrupt_data_page(path, row_group: int) -> None:
    """Overwrite the middle of ``row_group``'s first column chunk of a parquet file with
    garbage, leaving the footer (and so the metadata every reader plans from) valid, as a
    bad disk sector or a torn copy would. Write the file uncompressed, without dictionary
    pages and with page checksums for the damage to land in a data page's values."""
    import pyarrow.parquet as pq  # inside: this module travels to Ray workers by value

    col = pq.ParquetFile(path).metadata.row_group(row_group).column(0)
    start = col.data_page_offset + col.total_compressed_size // 2
    with open(path, "r+b") as f:
        f.seek(start)
        f.write(b"\xff" * 16)


class SpoilAt(Callback):
    """After optimizer step ``step``, add large noise to every weight (seeded), so that the
    run's later validation losses are worse than before: its last save is not its best."""

    def __init__(self, step: int, scale: float = 1.0):
        self.step, self.scale = step, scale

    def on_step_end(self, state: FitState) -> None:
        if state.step == self.step:
            g = torch.Generator().manual_seed(0)
            with torch.no_grad():
                for p in unwrap(state.model).parameters():
                    p.add_(torch.randn(p.shape, generator=g).to(p) * self.scale)
