"""Peak memory that PyTorch's allocator holds over training steps, per worker.

:class:`PeakMemory` watches one run (one worker) through named *regions*: ``build`` (model,
techniques, optimizer), ``restore``, and per step ``plan`` (the planners'
``before_step``), ``train`` (forward, backward, the optimizer step, every micro-batch of
the accumulation) and ``after`` (the planners' ``after_step``). The run's *persistent*
bytes are the net bytes its regions have allocated so far (parameters, optimizer states,
the planners' state); a step's peak is those persistent bytes plus the highest level the
allocator reaches in the step's ``train`` region above its level at the region's start.
So two runs interleaved in one process (a benchmark) each get their own figure.

Where the figures come from (never from raydrat's own tensor counting, never RSS):

* **CUDA**: ``torch.cuda.memory_allocated`` at each region boundary and
  ``torch.cuda.max_memory_allocated`` (reset at each ``train`` region's start) inside it:
  every step, at no cost.
* **CPU**: PyTorch keeps no statistics for its CPU allocator, but its profiler reports
  every allocation and free of it, with the size, when ``profile_memory=True``
  (:class:`AllocatorTrace`: ``torch.autograd.profiler.profile(use_kineto=True)``, what
  ``torch.profiler.profile`` wraps). The profiler costs a fifth of a step or so, so only a few
  steps are *sampled*: the first ``first_steps`` the loop runs (the profiler runs from
  the construction of :class:`PeakMemory`, so the build is measured too) and any listed in
  ``at_steps``. A process runs one profiler at a time, so every :class:`PeakMemory` of the
  process shares one session (:data:`SESSION`); steps that ran while it was on are
  reported by :meth:`PeakMemory.step` so that throughput can leave them out.

Caveats of the CPU source: frees of blocks allocated while the profiler was off are not
reported (PyTorch prints once "Memory block of unknown size was allocated before the
profiling started": expected), and bytes allocated outside the regions (the data batches)
are not the run's. A region outside the sampled steps is taken to leave the persistent
bytes unchanged, which holds for a steady training loop.

Phase markers: :func:`raydrat.core.step.train_step` opens ``record_function`` regions
``raydrat/forward``, ``raydrat/backward``, ``raydrat/optimizer`` and
``raydrat/zero_grad``; on a sampled step :class:`StepMemory` holds the allocator's level
at their boundaries (what ``raydrat estimate --measure`` compares the estimate's
components against).
"""

from __future__ import annotations

import bisect
import contextlib
import itertools
import os
import weakref
from collections.abc import Collection, Iterator
from dataclasses import dataclass, field

import torch
from torch.autograd import profiler as autograd_profiler
from torch.autograd.profiler import record_function

from raydrat.core.techniques.base import StepPlan

FORWARD, BACKWARD, OPTIMIZER, ZERO_GRAD = (
    "raydrat/forward",
    "raydrat/backward",
    "raydrat/optimizer",
    "raydrat/zero_grad",
)
"""The phase markers :func:`raydrat.core.step.train_step` opens (``record_function`` names)."""
PHASES = (FORWARD, BACKWARD, OPTIMIZER, ZERO_GRAD)


@dataclass
class Timeline:
    """The allocator's events of one profiled session on one device type: its level
    (bytes allocated during the session, net of frees) after each event, and the
    ``record_function`` regions opened in it."""

    times: list[int]
    levels: list[int]
    regions: dict[str, list[tuple[int, int]]]

    @classmethod
    def from_profile(cls, prof: autograd_profiler.profile, device_type: str) -> Timeline:
        events = prof.kineto_results.events()
        want = torch.device(device_type).type
        memory = sorted(
            (e.start_ns(), e.nbytes())
            for e in events
            if e.name() == "[memory]" and str(e.device_type()).split(".")[-1].lower() == want
        )
        regions: dict[str, list[tuple[int, int]]] = {}
        for e in events:
            if e.name().startswith("raydrat/"):
                regions.setdefault(e.name(), []).append((e.start_ns(), e.end_ns()))
        for spans in regions.values():
            spans.sort()
        times = [t for t, _ in memory]
        levels = list(itertools.accumulate(n for _, n in memory))
        return cls(times, levels, regions)

    def level(self, ns: int) -> int:
        """The level just after the last event at or before ``ns``."""
        i = bisect.bisect_right(self.times, ns) - 1
        return self.levels[i] if i >= 0 else 0

    def peak(self, start: int, end: int) -> int:
        """The highest level between ``start`` and ``end`` (the level at ``start`` included)."""
        i, j = bisect.bisect_left(self.times, start), bisect.bisect_right(self.times, end)
        return max([self.level(start), *self.levels[i:j]])

    def spans(self, name: str, start: int, end: int) -> list[tuple[int, int]]:
        """The spans of region ``name`` that lie within ``[start, end]``."""
        return [(a, b) for a, b in self.regions.get(name, []) if a >= start and b <= end]


class AllocatorTrace:
    """The process's one profiler session (``profile_memory=True``, CPU ops only, no shapes
    or stacks), shared by every holder: started by the first :meth:`acquire`, stopped by
    the last :meth:`release`; at each stop every :class:`PeakMemory` that opened regions in
    the session reads them from its :class:`Timeline`."""

    def __init__(self):
        self.prof: autograd_profiler.profile | None = None
        self.holders: set[int] = set()
        self.readers: weakref.WeakValueDictionary[int, PeakMemory] = weakref.WeakValueDictionary()

    @property
    def running(self) -> bool:
        return self.prof is not None

    def _start(self) -> None:
        # Kineto prints "profiler_start/stop" lines on every session unless told
        # otherwise; it reads this when the profiler first starts (a user's setting wins)
        os.environ.setdefault("KINETO_LOG_LEVEL", "6")
        # the autograd profiler that torch.profiler.profile wraps: the wrapper's start
        # imports torch._inductor (seconds) to read one setting this session never uses
        self.prof = autograd_profiler.profile(use_cpu=True, profile_memory=True, use_kineto=True)
        self.prof.__enter__()

    def acquire(self, reader: PeakMemory) -> bool:
        """Hold the session for ``reader`` (starting it); False when another profiler runs
        in this process (the user's own): then nothing is sampled."""
        if self.prof is None:
            if torch.autograd._profiler_enabled():
                return False
            self._start()
        self.holders.add(reader.uid)
        self.readers[reader.uid] = reader
        return True

    def release(self, uid: int) -> None:
        """``uid`` (a :attr:`PeakMemory.uid`) is done; the last holder stops the session.
        Also called when a holder is garbage-collected."""
        self.holders.discard(uid)
        if not self.holders:
            self._stop()

    def flush(self) -> None:
        """Stop now so every reader gets its figures; restart for the remaining holders."""
        if self.prof is None:
            return
        self._stop()
        if self.holders:
            self._start()

    def _stop(self) -> None:
        prof, self.prof = self.prof, None
        if prof is None:
            return
        prof.__exit__(None, None, None)
        readers = list(self.readers.values())
        for uid in [uid for uid in self.readers if uid not in self.holders]:
            del self.readers[uid]
        timelines: dict[str, Timeline] = {}
        for reader in readers:
            kind = reader.device.type
            if kind not in timelines:
                timelines[kind] = Timeline.from_profile(prof, kind)
            reader._read(timelines[kind])


SESSION = AllocatorTrace()
"""The one profiler session of this process."""


@dataclass
class StepMemory:
    """The allocator on one training step (``train`` region) of one run, in bytes.

    ``peak``: the run's persistent bytes before the step plus the step's rise above its
    start. ``phases``: for each phase marker of :func:`raydrat.core.step.train_step`, the
    list (one per micro-batch) of ``(level at start, level at end, peak)`` relative to the
    step's start (profiled steps only)."""

    step: int
    persistent: int
    peak: int
    phases: dict[str, list[tuple[int, int, int]]] = field(default_factory=dict)
    plan: StepPlan | None = None
    """The step's plan (active layers, stored branches), when the caller gave it."""

    @property
    def saved_bytes(self) -> int | None:
        """Bytes allocated in the first micro-batch's forward phase and still allocated at
        its end: what the autograd graph keeps for backward (saved tensors, checkpoint
        regions' inputs, SAC caches, a compiled graph's saved buffers) plus the loss, the
        logits being dropped inside the phase (``None``: phases not recorded, e.g. CUDA)."""
        spans = self.phases.get(FORWARD)
        return spans[0][1] if spans else None


class PeakMemory:
    """Peak bytes PyTorch's allocator holds for one run over its training steps (see the
    module docstring). Construct it before building the model (the build is then part of
    the persistent bytes), open :meth:`region` around the build and :meth:`step` around
    each step's phases (:func:`raydrat.core.fit.iter_fit` does the latter).

    ``first_steps``: on CPU, how many of the loop's first steps are sampled (the profiler
    runs from construction to their end); ``at_steps``: further step numbers to sample."""

    _ids = itertools.count()

    def __init__(self, device: torch.device, first_steps: int = 2, at_steps: Collection[int] = ()):
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.uid = next(self._ids)
        self.first_steps = first_steps
        self.at_steps = set(at_steps)
        self.persistent = 0
        """Net bytes the run's regions have allocated so far (known up to the last read)."""
        self.steps: dict[int, StepMemory] = {}
        """Every measured step: every step on CUDA, the sampled ones on CPU."""
        self.region_bytes: dict[str, int] = {}
        """Net bytes of the ``build`` and ``restore`` regions (e.g. the parameters)."""
        self.plan_peaks: dict[int, int] = {}
        """Peak of the ``plan`` region (the planners' ``before_step``: a recompute planner
        measures its costs there with a forward that stores everything): CUDA every step,
        CPU the profiled ones."""
        self._spans: list[tuple[str, int | None]] = []  # regions opened in the current session, in order
        self._steps_seen = 0
        self.profiled_steps: set[int] = set()
        """Steps whose ``train`` region ran while the shared profiler was on (any run's)."""
        self._holding = False
        self._plans: dict[int, StepPlan | None] = {}
        if not self.cuda and first_steps > 0:
            self._holding = SESSION.acquire(self)
        weakref.finalize(self, SESSION.release, self.uid)  # a run dropped mid-window lets the session go

    # --- regions ------------------------------------------------------------------------

    def _name(self, kind: str, step: int | None) -> str:
        return f"raydrat/{self.uid}/{kind}" if step is None else f"raydrat/{self.uid}/{kind}/{step}"

    @contextlib.contextmanager
    def region(self, kind: str, step: int | None = None) -> Iterator[None]:
        """A region whose net allocations persist (``build``, ``restore``, ``plan``, ``after``)."""
        if self.cuda:
            before = torch.cuda.memory_allocated(self.device)
            if kind == "plan":
                torch.cuda.reset_peak_memory_stats(self.device)
            yield
            if kind == "plan":
                self.plan_peaks[step] = self.persistent + torch.cuda.max_memory_allocated(self.device) - before
            grown = torch.cuda.memory_allocated(self.device) - before
            self.persistent += grown
            if step is None:
                self.region_bytes[kind] = self.region_bytes.get(kind, 0) + grown
            return
        if not SESSION.running or not self._holding:
            yield
            return
        self._spans.append((kind, step))
        with record_function(self._name(kind, step)):
            yield

    def sampled(self, step: int) -> bool:
        """Whether ``step`` (the loop's next) will be profiled (CPU)."""
        return not self.cuda and (self._steps_seen < self.first_steps or step in self.at_steps)

    @contextlib.contextmanager
    def step(self, step: int, plan: StepPlan | None = None) -> Iterator[None]:
        """The ``train`` region of ``step``: forward, backward, optimizer step. ``plan``:
        the step's plan, kept with its figures."""
        self._plans[step] = plan
        if self.cuda:
            # the caching allocator's statistics are kept on the host at each call: no sync
            start = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            yield
            rise = torch.cuda.max_memory_allocated(self.device) - start
            self.steps[step] = StepMemory(step, self.persistent, self.persistent + rise, {}, plan)
            self.persistent += torch.cuda.memory_allocated(self.device) - start
            self._steps_seen += 1
            return
        sample = self.sampled(step)
        if sample and not self._holding:
            self._holding = SESSION.acquire(self)
        profiled = SESSION.running
        if self._holding:
            self._spans.append(("train", step))
            with record_function(self._name("train", step)):
                yield
        else:
            yield
        if profiled or SESSION.running:
            self.profiled_steps.add(step)
        self._steps_seen += 1
        if self._holding and self._steps_seen >= self.first_steps and (step + 1) not in self.at_steps:
            self._holding = False
            SESSION.release(self.uid)

    @property
    def profiling(self) -> bool:
        """Whether the shared profiler session is on now (a step that ran while it was is slower)."""
        return SESSION.running

    def finish(self) -> None:
        """Stop sampling (the figures of sampled steps are read)."""
        if self._holding:
            self._holding = False
            SESSION.release(self.uid)
        elif SESSION.running and self._spans:
            SESSION.flush()

    def _read(self, tl: Timeline) -> None:
        """Read this run's regions from a finished session."""
        spans, self._spans = self._spans, []
        seen: dict[str, int] = {}
        for kind, step in spans:
            name = self._name(kind, step)
            k = seen.get(name, 0)
            seen[name] = k + 1
            found = tl.regions.get(name, [])
            if k >= len(found):
                continue
            a, b = found[k]
            start, end = tl.level(a), tl.level(b)
            if kind == "train":
                phases = {}
                for phase in PHASES:
                    phases[phase] = [
                        (tl.level(x) - start, tl.level(y) - start, tl.peak(x, y) - start)
                        for x, y in tl.spans(phase, a, b)
                    ]
                self.steps[step] = StepMemory(
                    step, self.persistent, self.persistent + tl.peak(a, b) - start, phases, self._plans.get(step)
                )
            elif kind == "plan":
                self.plan_peaks[step] = self.persistent + tl.peak(a, b) - start
            elif step is None:
                self.region_bytes[kind] = self.region_bytes.get(kind, 0) + end - start
            self.persistent += end - start

    # --- results ------------------------------------------------------------------------

    def peak(self) -> int | None:
        """The highest step peak measured so far (``None``: no step measured yet, or
        another profiler held the process's one session)."""
        if SESSION.running and self._spans and not self.cuda:
            SESSION.flush()
        if not self.steps:
            return None
        return max(s.peak for s in self.steps.values())

    def worst_step(self, steady: bool = True) -> StepMemory | None:
        """The measured step with the highest peak; ``steady``: not the loop's first step
        when a later one was measured (the optimizer states do not exist yet during the
        first step's forward and backward: it is not the step an estimate predicts)."""
        self.peak()
        steps = sorted(self.steps)
        if steady and len(steps) > 1:
            steps = steps[1:]
        return max((self.steps[k] for k in steps), key=lambda s: s.peak, default=None)
