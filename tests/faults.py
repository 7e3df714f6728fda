"""Faults injected from outside production code, and probes that record what a worker did,
as ``fit`` callbacks a test registers (they travel to Ray workers by value: ``conftest``
registers this module with cloudpickle), and :func:`main`, raydrat's real command line with
such callbacks added to the runs and sweeps it starts (what a test's subprocess runs)."""

from __future__ import annotations

import functools
import json
import os
import signal
import sys
import time
from pathlib import Path

import torch

from raydrat.core.fit import Callback, FitState
from raydrat.core.techniques.base import unwrap
from raydrat.core.techniques.sync.strategy import model_checksum


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


class StepTrace(Callback):
    """Every rank appends one JSON line per optimizer step to ``directory/rank{r}.jsonl``:
    its process id, the step, and a checksum of its parameters (and one line, ``"start"``,
    with the step it starts from), so a test sees which process trained which step and
    whether replicas agree. ``pace_s``: sleep that long after each step (a slower run, so a
    replacement has time to start while the others train)."""

    def __init__(self, directory: str, pace_s: float = 0.0):
        self.directory, self.pace_s = directory, pace_s

    def _write(self, state: FitState, **entry) -> None:
        entry.update(pid=os.getpid(), checksum=model_checksum(state.model))
        with open(Path(self.directory) / f"rank{state.rank}.jsonl", "a") as f:
            f.write(json.dumps(entry) + "\n")

    def on_fit_start(self, state: FitState) -> None:
        self._write(state, start=state.start_step)

    def on_step_end(self, state: FitState) -> None:
        self._write(state, step=state.step)
        if self.pace_s:
            time.sleep(self.pace_s)


class KillLighthouseAt(Callback):
    """After optimizer step ``step``, rank ``rank`` of a worker group that did not start from
    a checkpoint SIGKILLs the process of this Ray cluster's torchft Lighthouse actor (Ray
    Train's ``LighthouseServerActor``), as a crash of the head node's process would."""

    def __init__(self, step: int, rank: int = 0):
        self.step, self.rank = step, rank

    def on_step_end(self, state: FitState) -> None:
        if state.step != self.step or state.rank != self.rank or state.restored:
            return
        import ray
        from ray.util.state import list_actors

        actors = list_actors(
            address=ray.get_runtime_context().gcs_address,  # this cluster's (others may run on the machine)
            filters=[("class_name", "=", "LighthouseServerActor"), ("state", "=", "ALIVE")],
            detail=True,
        )
        assert len(actors) == 1, actors
        os.kill(actors[0].pid, signal.SIGKILL)


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


def _trial(state: FitState) -> str:
    """The sweep trial a Ray Train worker trains for (its Ray Train run is ``<sweep>-<trial>``)."""
    import ray.train  # inside: this module travels to Ray workers by value

    return ray.train.get_context().get_experiment_name().rsplit("-", 1)[-1]


class KillTrial(Callback):
    """As trial ``trial``'s training starts (before its first report), SIGKILL the trial's own
    process, as the kernel's OOM killer would: the Tune trial actor of this Ray cluster whose
    working directory is the trial's (Tune moves each trial's actor there)."""

    def __init__(self, trial: str):
        self.trial = trial

    def on_fit_start(self, state: FitState) -> None:
        if state.rank != 0 or _trial(state) != self.trial:
            return
        import ray
        from ray.util.state import list_actors

        actors = list_actors(
            address=ray.get_runtime_context().gcs_address,  # this cluster's (others may run on the machine)
            filters=[("class_name", "=", "ImplicitFunc"), ("state", "=", "ALIVE")],
            detail=True,
        )
        pids = [a.pid for a in actors if Path(f"/proc/{a.pid}/cwd").resolve().name == self.trial]
        assert len(pids) == 1, (self.trial, [(a.pid, Path(f"/proc/{a.pid}/cwd").resolve()) for a in actors])
        os.kill(pids[0], signal.SIGKILL)
        time.sleep(120)  # this worker goes with its trial


class RaiseAt(Callback):
    """After optimizer step ``step`` of trial ``trial`` (or of any run when ``trial`` is None),
    raise ``RuntimeError``."""

    def __init__(self, step: int, trial: str | None = None):
        self.step, self.trial = step, trial

    def on_step_end(self, state: FitState) -> None:
        if state.step == self.step and (self.trial is None or _trial(state) == self.trial):
            raise RuntimeError(f"injected fault at step {self.step} (test)")


class FillDiskAt(Callback):
    """After optimizer step ``step`` (rank 0, in a run that did not start from a checkpoint),
    fill the file system of ``path`` with ``path/filler``, leaving ``leave`` bytes free: the
    next checkpoint does not fit."""

    def __init__(self, step: int, path: str, leave: int):
        self.step, self.path, self.leave = step, path, leave

    def on_step_end(self, state: FitState) -> None:
        if state.step != self.step or state.rank != 0 or state.restored:
            return
        import shutil

        free = shutil.disk_usage(self.path).free
        with open(os.path.join(self.path, "filler"), "wb") as f:
            f.write(b"\0" * max(0, free - self.leave))


FAULTS = {c.__name__: c for c in (KillTrial, RaiseAt, FillDiskAt, KillAt, KillLighthouseAt, StepTrace)}


def main() -> int:
    """``python -c 'import faults; faults.main()' SPEC ARGS...``: ``raydrat ARGS`` with the
    fit callbacks ``SPEC`` names (JSON: ``[["KillTrial", {"trial": "t000"}], ...]``) in every
    run and sweep it starts."""
    import ray.cloudpickle

    import raydrat.ray_train.trainer as trainer
    import raydrat.tune.sweep as sweep
    from raydrat.cli import main as cli

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    callbacks = [FAULTS[name](**kwargs) for name, kwargs in json.loads(sys.argv[1])]
    sweep.run_sweep = functools.partial(sweep.run_sweep, fit_callbacks=callbacks)
    trainer.run_training = functools.partial(trainer.run_training, fit_callbacks=callbacks)
    return cli(sys.argv[2:])
