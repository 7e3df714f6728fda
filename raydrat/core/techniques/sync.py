"""How Ray Train workers synchronise: DDP gradient all-reduce, or local updates with
periodic parameter averaging (local SGD), optionally with a DiLoCo outer optimizer.

The training loop calls a strategy at four points::

    strategy = build_strategy(cfg.sync, world_size)
    model = strategy.apply(model)                 # DDP wrapper or the bare model
    train_step(...)                               # strategy.no_sync() on accumulation steps
    strategy.after_optimizer_step(done)           # local: average every sync_steps
    strategy.step_done(step_s); strategy.metrics()  # bytes / seconds in collectives

The process group is the caller's (Ray Train's ``TorchConfig`` sets it up); this module
only uses ``torch.distributed``.

**Communication accounting.** For every collective this worker launches we record

* bytes: the bytes a ring all-reduce of an ``N``-byte buffer sends from each of ``W``
  workers, ``2 (W - 1) / W * N`` (reduce-scatter then all-gather). With 2 workers that is
  exactly ``N``, the payload. DDP buckets and local-mode flat buffers are counted the same
  way, so the two modes are directly comparable.
* seconds: wall time from launching the collective to its completion (the union of the
  intervals when several are in flight, so overlapping DDP buckets are not double counted;
  DDP's all-reduce overlaps the backward pass, so this is time *in* collectives, not time
  *lost* to them).

``sync.latency_s`` sleeps that long before each collective (a slow link, for benchmarks);
the sleep is counted as time in the collective.
With one worker no strategy communicates: every mode is plain training.
"""

from __future__ import annotations

import contextlib
import time
from collections import OrderedDict
from typing import Callable, ContextManager, Iterator

import torch
import torch.distributed as dist

from torch.nn.parallel import DistributedDataParallel

from raydrat.config.sync import SyncConfig
from raydrat.core import metrics as M
from raydrat.core.techniques.base import Technique


def ring_allreduce_bytes(payload_bytes: int, world_size: int) -> int:
    """Bytes each worker sends in a ring all-reduce of ``payload_bytes``."""
    if world_size <= 1:
        return 0
    return int(round(2 * (world_size - 1) / world_size * payload_bytes))


class CommStats:
    """Bytes sent and seconds spent in collectives since the last :meth:`take`."""

    def __init__(self, world_size: int):
        self.world_size = world_size
        self._bytes = 0
        self._intervals: list[tuple[float, float]] = []
        self.total_bytes = 0
        self.total_s = 0.0
        self.calls = 0

    def add(self, payload_bytes: int, start: float, end: float) -> None:
        b = ring_allreduce_bytes(payload_bytes, self.world_size)
        self._bytes += b
        self.total_bytes += b
        self.calls += 1
        self._intervals.append((start, end))

    @contextlib.contextmanager
    def timed(self, payload_bytes: int) -> Iterator[None]:
        start = time.perf_counter()
        yield
        self.add(payload_bytes, start, time.perf_counter())

    def take(self) -> tuple[int, float]:
        """``(bytes, seconds)`` since the previous call; resets the window."""
        seconds = _union_length(self._intervals)
        self.total_s += seconds
        out = (self._bytes, seconds)
        self._bytes, self._intervals = 0, []
        return out


def _union_length(intervals: list[tuple[float, float]]) -> float:
    total, cur_start, cur_end = 0.0, None, None
    for s, e in sorted(intervals):
        if cur_end is None or s > cur_end:
            if cur_end is not None:
                total += cur_end - cur_start
            cur_start, cur_end = s, e
        else:
            cur_end = max(cur_end, e)
    if cur_end is not None:
        total += cur_end - cur_start
    return total


def flat_allreduce_mean(tensors: list[torch.Tensor], comm: CommStats, latency_s: float = 0.0) -> None:
    """Average ``tensors`` in place across workers: one flat buffer (one all-reduce) per
    (device, dtype), not one call per tensor."""
    world = dist.get_world_size()
    groups: "OrderedDict[tuple, list[torch.Tensor]]" = OrderedDict()
    for t in tensors:
        groups.setdefault((t.device, t.dtype), []).append(t)
    for group in groups.values():
        flat = torch.cat([t.detach().reshape(-1) for t in group])
        with comm.timed(flat.numel() * flat.element_size()):
            if latency_s:
                time.sleep(latency_s)  # the simulated slow link counts as communication time
            dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        flat.div_(world)
        offset = 0
        for t in group:
            n = t.numel()
            t.detach().copy_(flat[offset : offset + n].view_as(t))
            offset += n


def model_checksum(model: torch.nn.Module) -> float:
    """A float64 checksum of every parameter (to compare replicas across ranks)."""
    total = torch.zeros((), dtype=torch.float64)
    for i, p in enumerate(model.parameters()):
        total += (p.detach().double().cpu().flatten() * (1 + (torch.arange(p.numel()) % 7))).sum() * (i + 1)
    return float(total)


class SyncStrategy(Technique):
    """Plain training (one worker, or the base of the others)."""

    name = "sync"
    mode = "none"

    def __init__(self, cfg: SyncConfig, world_size: int):
        self.cfg = cfg
        self.world_size = world_size
        self.comm = CommStats(world_size)
        self.meter = CommMeter(self.comm)
        self.model: torch.nn.Module | None = None
        self.optimizer: torch.optim.Optimizer | None = None

    def apply(self, model: torch.nn.Module) -> torch.nn.Module:
        self.model = model
        return model

    def step_done(self, step_s: float) -> None:
        """Account this optimizer step's collectives (``step_s``: its wall time)."""
        self.meter.step_done(step_s)

    def metrics(self) -> dict[str, float]:
        """Communication per step over the window since the last call (with several workers)."""
        return self.meter.window() if self.world_size > 1 else {}

    def attach_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        self.optimizer = optimizer

    def no_sync(self) -> ContextManager:
        """Context for micro-batches whose gradients must not be communicated yet."""
        return contextlib.nullcontext()

    def after_optimizer_step(self, done: int) -> bool:
        """Called after optimizer step number ``done`` (1-based); True if it synced."""
        return False

    def synchronize(self) -> bool:
        """Bring replicas into agreement now (before evaluating or checkpointing)."""
        return False

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class DDPStrategy(SyncStrategy):
    """PyTorch DDP, with a comm hook that counts and times every bucket's all-reduce."""

    mode = "ddp"

    def apply(self, model: torch.nn.Module) -> torch.nn.Module:
        kwargs = {"find_unused_parameters": self.cfg.find_unused_parameters}
        if self.cfg.bucket_cap_mb is not None:
            kwargs["bucket_cap_mb"] = self.cfg.bucket_cap_mb
        device = next(model.parameters()).device
        if device.type == "cuda":
            kwargs["device_ids"] = [device.index]
        ddp = DistributedDataParallel(model, **kwargs)
        ddp.register_comm_hook(None, self._allreduce_hook())
        self.model = ddp
        return ddp

    def _allreduce_hook(self) -> Callable:
        comm, latency, world = self.comm, self.cfg.latency_s, self.world_size

        def hook(_state, bucket):  # -> Future[Tensor] (no annotation: DDP checks it literally)
            buf = bucket.buffer()
            start = time.perf_counter()
            if latency:
                time.sleep(latency)  # the simulated slow link counts as communication time
            nbytes = buf.numel() * buf.element_size()
            fut = dist.all_reduce(buf, async_op=True).get_future()

            def done(f):
                comm.add(nbytes, start, time.perf_counter())
                return f.value()[0].div_(world)

            return fut.then(done)

        return hook

    def no_sync(self) -> ContextManager:
        return self.model.no_sync()


class LocalStrategy(SyncStrategy):
    """Local updates; every ``sync_steps`` optimizer steps average the parameters (and,
    optionally, the optimizer state); with an outer optimizer, apply the averaged change
    as a pseudo-gradient through SGD with Nesterov momentum (DiLoCo)."""

    mode = "local"

    def __init__(self, cfg: SyncConfig, world_size: int):
        super().__init__(cfg, world_size)
        self.last_sync = 0
        self.steps_since_sync = 0
        self.anchors: list[torch.Tensor] | None = None
        self.outer: torch.optim.Optimizer | None = None

    def apply(self, model: torch.nn.Module) -> torch.nn.Module:
        self.model = model
        # Every replica starts from the same weights (rank 0's), whatever the seeds.
        self._params_list()
        for p in self._params:
            dist.broadcast(p.detach(), src=0)
        if self.cfg.outer_optimizer == "nesterov":
            self.anchors = [p.detach().clone() for p in self._params]
            self.outer = torch.optim.SGD(
                self.anchors, lr=self.cfg.outer_lr, momentum=self.cfg.outer_momentum, nesterov=True
            )
        return model

    def _params_list(self) -> None:
        seen: set[int] = set()
        self._params = []
        for p in self.model.parameters():
            if id(p) not in seen:
                seen.add(id(p))
                self._params.append(p)

    def after_optimizer_step(self, done: int) -> bool:
        self.steps_since_sync += 1
        if self.steps_since_sync >= self.cfg.sync_steps:
            return self.synchronize()
        return False

    @torch.no_grad()
    def synchronize(self) -> bool:
        if self.steps_since_sync == 0:
            return False
        self.steps_since_sync = 0
        flat_allreduce_mean(self._params, self.comm, self.cfg.latency_s)
        if self.cfg.average_optimizer_state and self.optimizer is not None:
            states = [
                v for p in self._params for v in self.optimizer.state.get(p, {}).values()
                if torch.is_tensor(v) and v.is_floating_point() and v.dim() > 0
            ]
            if states:
                flat_allreduce_mean(states, self.comm, self.cfg.latency_s)
        if self.outer is not None:
            for anchor, p in zip(self.anchors, self._params):
                anchor.grad = anchor - p.detach()  # pseudo-gradient: averaged change, negated
            self.outer.step()
            self.outer.zero_grad(set_to_none=True)
            for anchor, p in zip(self.anchors, self._params):
                p.copy_(anchor)
        return True

    def state_dict(self) -> dict:
        out: dict = {"steps_since_sync": self.steps_since_sync}
        if self.outer is not None:
            out["anchors"] = [a.detach().cpu() for a in self.anchors]
            out["outer"] = self.outer.state_dict()
        return out

    def load_state_dict(self, state: dict) -> None:
        self.steps_since_sync = int(state.get("steps_since_sync", 0))
        if self.outer is not None and "anchors" in state:
            with torch.no_grad():
                for a, saved in zip(self.anchors, state["anchors"]):
                    a.copy_(saved)
            self.outer.load_state_dict(state["outer"])


def build_strategy(cfg: SyncConfig, world_size: int, skips_layers: bool = False) -> SyncStrategy:
    """The strategy for ``sync.mode``; with one worker, plain training. ``skips_layers``:
    some steps leave parameters without gradients (``slots.mode`` other than ``all``), so
    DDP must look for unused parameters whatever ``sync.find_unused_parameters`` says."""
    if world_size <= 1:
        return SyncStrategy(cfg, world_size)
    if cfg.mode == "ddp":
        if skips_layers and not cfg.find_unused_parameters:
            cfg = cfg.model_copy(update={"find_unused_parameters": True})
        return DDPStrategy(cfg, world_size)
    return LocalStrategy(cfg, world_size)


class CommMeter:
    """Per-step communication figures over a logging window (rank 0 logs them)."""

    def __init__(self, comm: CommStats):
        self.comm = comm
        self._steps = 0
        self._bytes = 0
        self._comm_s = 0.0
        self._step_s = 0.0

    def step_done(self, step_s: float) -> None:
        b, s = self.comm.take()
        self._steps += 1
        self._bytes += b
        self._comm_s += s
        self._step_s += step_s

    def window(self) -> dict[str, float]:
        """Mean bytes and seconds per step and the comm share of step time; resets."""
        n = max(1, self._steps)
        out = {
            M.COMM_BYTES_PER_STEP: self._bytes / n,
            M.COMM_S_PER_STEP: self._comm_s / n,
            M.COMM_FRACTION: self._comm_s / self._step_s if self._step_s > 0 else 0.0,
            M.COMM_BYTES_TOTAL: float(self.comm.total_bytes),
        }
        self._steps, self._bytes, self._comm_s, self._step_s = 0, 0, 0.0, 0.0
        return out
