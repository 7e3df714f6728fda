"""How Ray Train workers synchronise: DDP gradient all-reduce, or local updates with
periodic syncs (local SGD), optionally with a DiLoCo outer optimizer, streamed in
fragments with an overlapped, quantized exchange (Streaming DiLoCo).

The training loop calls a strategy at four points::

    strategy = build_strategy(cfg.sync, world_size)
    model = strategy.apply(model)                 # DDP wrapper or the bare model
    train_step(...)                               # strategy.no_sync() on accumulation steps
    strategy.after_optimizer_step(done)           # local: sync what is due at step `done`
    strategy.step_done(step_s); strategy.metrics()  # bytes / seconds in collectives

The process group is the caller's (Ray Train's ``TorchConfig`` sets it up); this module
only uses ``torch.distributed``.

**Local updates** (``sync.mode: local``). The parameters are split into ``sync.fragments``
fragments (one by default). Fragment ``k`` of ``F`` is synced at every step ``done`` with
``done % H == (k + 1) H / F % H`` (``H = sync.sync_steps``): each fragment once every ``H``
steps, one fragment every ``H / F`` steps. A sync of a fragment:

* plain local SGD (no outer optimizer, no quantization, no delay): average its parameters;
* otherwise, with a copy of the fragment's weights at its last sync (its *anchor*): the
  pseudo-gradient ``anchor - params`` is averaged across workers (``sync.quantization``:
  in fp32, bf16 or int8 with one fp32 scale per block), the anchor takes an outer step
  on it (``outer_optimizer: none`` is ``anchor -= mean``, i.e. averaging; ``nesterov`` is
  DiLoCo's SGD with Nesterov momentum) and the parameters become the new anchor. With
  ``sync.delay = d > 0`` the exchange runs on a background thread while training goes on;
  ``d`` steps later the result is applied, keeping ``sync.overlap_keep`` of the local
  progress made meanwhile.

**Communication accounting.** For every collective this worker launches we record

* bytes: what this worker sends. A ring all-reduce of an ``N``-byte buffer over ``W``
  workers sends ``2 (W - 1) / W * N`` from each (reduce-scatter, then all-gather): with 2
  workers exactly ``N``. The quantized exchange is a reduce-scatter (an all-to-all of the
  quantized chunks: ``(W - 1) / W`` of the payload leaves this worker) and an all-gather
  of this worker's re-quantized chunk (sent to ``W - 1`` peers): the same ``2 (W - 1) / W``
  of the quantized payload, scales and padding included.
* seconds: wall time from launching the collective to its completion (the union of the
  intervals when several are in flight, so overlapping DDP buckets are not double counted;
  DDP's all-reduce overlaps the backward pass and the delayed exchange overlaps the next
  steps, so this is time *in* collectives, not time *lost* to them).

``sync.latency_s`` sleeps that long before each collective (a slow link, for benchmarks);
the sleep is counted as time in the collective.
With one worker no strategy communicates: every mode is plain training.
"""

from __future__ import annotations

import contextlib
import math
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import AbstractContextManager
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from raydrat.config.sync import SyncConfig
from raydrat.core import metrics as M
from raydrat.core.techniques.base import Technique, unwrap


def ring_allreduce_bytes(payload_bytes: int, world_size: int) -> int:
    """Bytes each worker sends in a ring all-reduce of ``payload_bytes``."""
    if world_size <= 1:
        return 0
    return int(round(2 * (world_size - 1) / world_size * payload_bytes))


class CommStats:
    """Bytes sent and seconds spent in collectives since the last :meth:`take` (thread-safe:
    a delayed exchange reports from its background thread).

    ``flush_bytes`` are those of the syncs outside the schedule (before an evaluation or a
    checkpoint); ``launch_bytes`` maps each step that launched scheduled syncs to their bytes."""

    def __init__(self, world_size: int):
        self.world_size = world_size
        self._lock = threading.Lock()
        self._bytes = 0
        self._intervals: list[tuple[float, float]] = []
        self.total_bytes = 0
        self.flush_bytes = 0
        self.launch_bytes: dict[int, int] = {}
        self.total_s = 0.0
        self.calls = 0

    def add(self, payload_bytes: int, start: float, end: float) -> None:
        """One all-reduce of ``payload_bytes`` (counted as a ring sends it)."""
        self.add_sent(ring_allreduce_bytes(payload_bytes, self.world_size), start, end)

    def add_sent(self, sent_bytes: int, start: float, end: float, step: int | None = None, flush: bool = False) -> None:
        """``sent_bytes`` that left this worker between ``start`` and ``end``; ``step``: the
        step that launched this scheduled sync; ``flush``: a sync outside the schedule."""
        with self._lock:
            self._bytes += sent_bytes
            self.total_bytes += sent_bytes
            if flush:
                self.flush_bytes += sent_bytes
            if step is not None:
                self.launch_bytes[step] = self.launch_bytes.get(step, 0) + sent_bytes
            self.calls += 1
            self._intervals.append((start, end))

    @contextlib.contextmanager
    def timed(self, payload_bytes: int) -> Iterator[None]:
        start = time.perf_counter()
        yield
        self.add(payload_bytes, start, time.perf_counter())

    def take(self) -> tuple[int, float]:
        """``(bytes, seconds)`` since the previous call; resets the window."""
        with self._lock:
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


def flat_allreduce_mean(
    tensors: list[torch.Tensor], comm: CommStats, latency_s: float = 0.0, step: int | None = None, flush: bool = False
) -> None:
    """Average ``tensors`` in place across workers: one flat buffer (one all-reduce) per
    (device, dtype), not one call per tensor (``step``, ``flush``: see :meth:`CommStats.add_sent`)."""
    world = dist.get_world_size()
    groups: OrderedDict[tuple, list[torch.Tensor]] = OrderedDict()
    for t in tensors:
        groups.setdefault((t.device, t.dtype), []).append(t)
    for group in groups.values():
        flat = torch.cat([t.detach().reshape(-1) for t in group])
        start = time.perf_counter()
        if latency_s:
            time.sleep(latency_s)  # the simulated slow link counts as communication time
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        comm.add_sent(
            ring_allreduce_bytes(flat.numel() * flat.element_size(), world),
            start,
            time.perf_counter(),
            step=step,
            flush=flush,
        )
        flat.div_(world)
        offset = 0
        for t in group:
            n = t.numel()
            t.detach().copy_(flat[offset : offset + n].view_as(t))
            offset += n


# -- quantized exchange ---------------------------------------------------------------


def quantize(x: torch.Tensor, quantization: str, block: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``x`` (rows, m), fp32 → (payload, scales). ``bf16``: the values in bf16, no scales.
    ``int8``: each row cut into blocks of ``block`` values (the last one partial), each
    scaled by its absmax / 127 and rounded to the nearest int8 in [-127, 127]; scales
    (rows, ceil(m / block)) in fp32."""
    if quantization == "bf16":
        return x.to(torch.bfloat16), None
    rows, m = x.shape
    nb = math.ceil(m / block)
    xb = F.pad(x, (0, nb * block - m)).view(rows, nb, block)
    scale = xb.abs().amax(dim=-1) / 127.0  # (rows, nb)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round(xb / scale.unsqueeze(-1)).clamp_(-127, 127).to(torch.int8)
    return q.view(rows, nb * block)[:, :m].contiguous(), scale


def dequantize(q: torch.Tensor, scale: torch.Tensor | None, block: int) -> torch.Tensor:
    """Inverse of :func:`quantize`: (rows, m) fp32."""
    if scale is None:
        return q.float()
    rows, m = q.shape
    nb = scale.shape[1]
    qb = F.pad(q.float(), (0, nb * block - m)).view(rows, nb, block)
    return (qb * scale.unsqueeze(-1)).view(rows, nb * block)[:, :m]


def _all_gather_flat(out: torch.Tensor, inp: torch.Tensor) -> None:
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(out.view(-1), inp.reshape(-1))


def _pack(q: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    """One byte buffer per row: the quantized values, then the row's fp32 scales (one
    collective instead of two)."""
    if scale is None:
        return q
    return torch.cat([q.view(torch.uint8), scale.view(torch.uint8)], dim=1)


def _unpack(buf: torch.Tensor, m: int, quantization: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    if quantization != "int8":
        return buf, None
    return buf[:, :m].view(torch.int8), buf[:, m:].contiguous().view(torch.float32)


def exchange_mean(flat: torch.Tensor, quantization: str, block: int) -> tuple[torch.Tensor, int]:
    """The mean across workers of the fp32 vector ``flat``, exchanged in ``quantization``,
    and the bytes this worker sent. The result is the same tensor on every rank.

    ``none``: one ring all-reduce. ``bf16``/``int8``: ``flat`` is cut into ``W`` equal
    chunks (zero-padded to a multiple of ``W``), quantized and exchanged with an all-to-all
    (this rank receives every worker's copy of its chunk), reduced in fp32, re-quantized and
    all-gathered; every rank dequantizes the same gathered bytes. The int8 scales travel in
    the same buffers as the values (two collectives in all)."""
    world = dist.get_world_size()
    if quantization == "none":
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        return flat.div_(world), ring_allreduce_bytes(flat.numel() * flat.element_size(), world)
    n = flat.numel()
    m = math.ceil(n / world)
    chunks = F.pad(flat, (0, world * m - n)).view(world, m)
    out = _pack(*quantize(chunks, quantization, block))
    received = torch.empty_like(out)
    dist.all_to_all_single(received, out)  # row r of `received`: rank r's copy of this rank's chunk
    sent = out.numel() * out.element_size() * (world - 1) // world
    mine = dequantize(*_unpack(received, m, quantization), block).sum(dim=0, keepdim=True).div_(world)
    mine_q = _pack(*quantize(mine, quantization, block))  # (1, ...): this rank's chunk of the mean
    gathered = torch.empty_like(out)
    _all_gather_flat(gathered, mine_q)
    sent += mine_q.numel() * mine_q.element_size() * (world - 1)
    return dequantize(*_unpack(gathered, m, quantization), block).reshape(-1)[:n], sent


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

    def no_sync(self) -> AbstractContextManager:
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

    def no_sync(self) -> AbstractContextManager:
        return self.model.no_sync()


# -- local updates in fragments --------------------------------------------------------


@dataclass
class Fragment:
    """A share of the parameters synced together: views of whole parameters or of row
    ranges of them (``names`` say which, e.g. ``tok_emb.weight[0:1024]``)."""

    index: int
    names: list[str]
    views: list[torch.Tensor]
    anchor: torch.Tensor | None = None
    """fp32 copy of the fragment (flat) at its last sync: the global weights."""
    outer: torch.optim.Optimizer | None = None
    outer_steps: int = 0
    clean_at: int | None = None
    """The step after which this fragment was last brought into agreement with nothing
    local since (a flush at that step can skip it)."""

    @property
    def numel(self) -> int:
        return sum(v.numel() for v in self.views)

    def flat(self) -> torch.Tensor:
        return torch.cat([v.detach().reshape(-1).float() for v in self.views])

    def assign(self, flat: torch.Tensor) -> None:
        offset = 0
        for v in self.views:
            n = v.numel()
            v.copy_(flat[offset : offset + n].view_as(v))
            offset += n


def split_fragments(model: torch.nn.Module, n_fragments: int) -> list[Fragment]:
    """The model's parameters (each tied tensor once) in ``n_fragments`` fragments.

    One fragment: every parameter whole, in ``parameters()`` order. Several (a model with
    a ``layers`` ModuleDict of blocks, like :class:`~raydrat.core.model.transformer.GPT`):
    block ``i`` goes to fragment ``i % F`` (strided, as in Streaming DiLoCo), and every
    tensor outside the blocks (token embedding, final norm, an untied head) is cut into
    ``F`` row chunks, chunk ``k`` to fragment ``k``. Cutting those keeps the fragments
    even: the embedding is 40% of the demo model, more than one fragment's share."""
    bare = unwrap(model)
    seen: set[int] = set()
    named = []
    for name, p in bare.named_parameters():
        if id(p) not in seen:
            seen.add(id(p))
            named.append((name, p))
    if n_fragments == 1:
        return [Fragment(0, [n for n, _ in named], [p.detach() for _, p in named])]
    layers = getattr(bare, "layers", None)
    if not isinstance(layers, torch.nn.ModuleDict) or len(layers) < n_fragments:
        n = len(layers) if isinstance(layers, torch.nn.ModuleDict) else 0
        raise ValueError(
            f"sync.fragments ({n_fragments}) exceeds the model's {n} blocks: lower sync.fragments "
            f"to at most {max(1, n)}"
        )
    block_of = {}
    for key, block in layers.items():
        for p in block.parameters():
            block_of[id(p)] = int(key)
    frags = [Fragment(k, [], []) for k in range(n_fragments)]
    for name, p in named:
        if id(p) in block_of:
            f = frags[block_of[id(p)] % n_fragments]
            f.names.append(name)
            f.views.append(p.detach())
        elif p.dim() >= 1 and p.shape[0] >= n_fragments:
            bounds = [round(p.shape[0] * k / n_fragments) for k in range(n_fragments + 1)]
            for k, f in enumerate(frags):
                f.names.append(f"{name}[{bounds[k]}:{bounds[k + 1]}]")
                f.views.append(p.detach()[bounds[k] : bounds[k + 1]])
        else:
            frags[0].names.append(name)
            frags[0].views.append(p.detach())
    return frags


@dataclass
class _Pending:
    """A fragment's exchange in flight on the background thread."""

    fragment: Fragment
    future: Future
    due: int
    launched: torch.Tensor
    """The fragment's weights when the exchange was launched."""


class LocalStrategy(SyncStrategy):
    """Local updates; each fragment (the whole model by default) is synced every
    ``sync_steps`` optimizer steps at its own offset: averaged, or (with an anchor)
    moved by an outer step on the averaged pseudo-gradient; optionally exchanged in
    bf16/int8 and overlapped with ``delay`` steps of compute (see the module docstring)."""

    mode = "local"

    def __init__(self, cfg: SyncConfig, world_size: int):
        super().__init__(cfg, world_size)
        self.fragments: list[Fragment] = []
        self.pending: list[_Pending] = []
        self._executor: ThreadPoolExecutor | None = None
        self.done = 0
        self.uses_anchor = cfg.outer_optimizer != "none" or cfg.quantization != "none" or cfg.delay > 0

    @property
    def period(self) -> int:
        """Steps between two fragments' syncs."""
        return self.cfg.sync_steps // self.cfg.fragments

    def apply(self, model: torch.nn.Module) -> torch.nn.Module:
        self.model = model
        # Every replica starts from the same weights (rank 0's), whatever the seeds.
        self._params = list({id(p): p for p in model.parameters()}.values())
        for p in self._params:
            dist.broadcast(p.detach(), src=0)
        self.fragments = split_fragments(model, self.cfg.fragments)
        for frag in self.fragments:
            frag.clean_at = 0
        if self.uses_anchor:
            for frag in self.fragments:
                frag.anchor = frag.flat()
                if self.cfg.outer_optimizer == "nesterov":
                    frag.outer = torch.optim.SGD(
                        [frag.anchor], lr=self.cfg.outer_lr, momentum=self.cfg.outer_momentum, nesterov=True
                    )
        if self.cfg.delay:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="raydrat-sync")
        return model

    def offset(self, k: int) -> int:
        """Fragment ``k`` is synced (its result applied) at steps ``done % H == offset(k)``."""
        return ((k + 1) * self.period) % self.cfg.sync_steps

    def after_optimizer_step(self, done: int) -> bool:
        H, delay = self.cfg.sync_steps, self.cfg.delay
        self.done = done
        synced = False
        for pend in [p for p in self.pending if p.due == done]:
            self._finish(pend)
            synced = True
        for frag in self.fragments:
            if (done + delay) % H == self.offset(frag.index):
                if delay:
                    self._launch(frag, done, due=done + delay)
                else:
                    self._sync_now(frag, done)
                    synced = True
        return synced

    @torch.no_grad()
    def synchronize(self) -> bool:
        """Land the exchanges in flight, then sync every fragment now (a flush: counted in
        ``comm.flush_bytes``, outside the schedule)."""
        for pend in list(self.pending):
            self._finish(pend)
        dirty = [f for f in self.fragments if f.clean_at != self.done]
        for frag in dirty:
            self._sync_now(frag, None)
        if dirty and self.cfg.average_optimizer_state and self.optimizer is not None:
            self._average_optimizer_state(flush=True)
        return bool(dirty)

    # -- one fragment --

    @torch.no_grad()
    def _sync_now(self, frag: Fragment, step: int | None) -> None:
        flush = step is None
        if not self.uses_anchor:  # plain local SGD: average the parameters
            flat = frag.flat()
            start = time.perf_counter()
            if self.cfg.latency_s:
                time.sleep(self.cfg.latency_s)  # the simulated slow link counts as communication time
            mean, sent = exchange_mean(flat, "none", self.cfg.quant_block)
            self.comm.add_sent(sent, start, time.perf_counter(), step=step, flush=flush)
            frag.assign(mean)
            frag.clean_at = self.done
        else:
            launched = frag.flat()
            mean = self._exchange(frag.anchor - launched, step, flush)
            self._outer_step(frag, mean, launched, launched)
        if self.cfg.average_optimizer_state and self.optimizer is not None and not flush:
            self._average_optimizer_state(flush=False, step=step)

    def _exchange(self, delta: torch.Tensor, step: int | None, flush: bool) -> torch.Tensor:
        """Mean pseudo-gradient across workers (runs on the background thread with a delay)."""
        start = time.perf_counter()
        if self.cfg.latency_s:
            time.sleep(self.cfg.latency_s)  # the simulated slow link counts as communication time
        mean, sent = exchange_mean(delta, self.cfg.quantization, self.cfg.quant_block)
        self.comm.add_sent(sent, start, time.perf_counter(), step=step, flush=flush)
        return mean

    @torch.no_grad()
    def _launch(self, frag: Fragment, step: int, due: int) -> None:
        launched = frag.flat()
        delta = frag.anchor - launched
        future = self._executor.submit(self._exchange, delta, step, False)
        self.pending.append(_Pending(frag, future, due, launched))

    @torch.no_grad()
    def _finish(self, pend: _Pending) -> None:
        self.pending.remove(pend)
        mean = pend.future.result()
        self._outer_step(pend.fragment, mean, pend.launched, pend.fragment.flat())

    def _outer_step(self, frag: Fragment, mean_delta: torch.Tensor, launched: torch.Tensor, now: torch.Tensor) -> None:
        """The anchor moves by the averaged pseudo-gradient (through the outer optimizer);
        the parameters become the new anchor plus ``overlap_keep`` of the progress made
        since the exchange was launched (none without a delay)."""
        if frag.outer is None:
            frag.anchor.sub_(mean_delta)
        else:
            frag.outer_steps += 1
            warm = self.cfg.outer_warmup
            lr = self.cfg.outer_lr * (min(1.0, frag.outer_steps / warm) if warm else 1.0)
            for group in frag.outer.param_groups:
                group["lr"] = lr
            frag.anchor.grad = mean_delta
            frag.outer.step()
            frag.anchor.grad = None
        new = frag.anchor.clone()
        if now is not launched and self.cfg.overlap_keep:
            new.add_(now - launched, alpha=self.cfg.overlap_keep)
        else:
            frag.clean_at = self.done
        frag.assign(new)

    def _average_optimizer_state(self, flush: bool, step: int | None = None) -> None:
        states = [
            v
            for p in self._params
            for v in self.optimizer.state.get(p, {}).values()
            if torch.is_tensor(v) and v.is_floating_point() and v.dim() > 0
        ]
        if states:
            flat_allreduce_mean(states, self.comm, self.cfg.latency_s, step=step, flush=flush)

    # -- checkpoints --

    def state_dict(self) -> dict:
        out: dict = {}
        if self.uses_anchor:
            out["fragments"] = [
                {
                    "anchor": f.anchor.detach().cpu().clone(),
                    "outer_steps": f.outer_steps,
                    **({"outer": f.outer.state_dict()} if f.outer is not None else {}),
                }
                for f in self.fragments
            ]
        return out

    def load_state_dict(self, state: dict) -> None:
        if not self.uses_anchor:
            return
        saved = state.get("fragments")
        if saved is None and "anchors" in state:  # the one-fragment layout before fragments existed
            saved = [
                {
                    "anchor": torch.cat([a.reshape(-1).float() for a in state["anchors"]]),
                    "outer": state.get("outer"),
                    "outer_steps": 0,
                }
            ]
        if saved is None:
            return
        if len(saved) != len(self.fragments):
            raise ValueError(
                f"the checkpoint holds {len(saved)} sync fragments, this run has "
                f"{len(self.fragments)}: keep sync.fragments as it was"
            )
        with torch.no_grad():
            for frag, s in zip(self.fragments, saved):
                frag.anchor.copy_(s["anchor"].to(frag.anchor.device))
                frag.outer_steps = int(s.get("outer_steps", 0))
                if frag.outer is not None and s.get("outer") is not None:
                    frag.outer.load_state_dict(s["outer"])


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
