"""A run of the one training loop (:func:`raydrat.core.fit.iter_fit`) in this process, on
blocks tokenized beforehand: what the benchmarks compare against, and how they interleave
several runs step by step under the same machine load."""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from raydrat.config import RaydratConfig
from raydrat.core import metrics as M
from raydrat.core.checkpoint.state import resumable_batches
from raydrat.core.data.blocks import iter_blocks_local
from raydrat.core.fit import Callback, FitState, iter_fit
from raydrat.core.memory.peak import PeakMemory
from raydrat.core.runtime import Runtime, resolve
from raydrat.core.setup import build_fit_state
from raydrat.core.techniques.bundle import Techniques


def batches_of(blocks: list, batch_size: int) -> list[torch.Tensor]:
    """``(batch_size, seq_len + 1)`` long tensors from a list of blocks (a tail is dropped)."""
    n = len(blocks) // batch_size
    return [torch.from_numpy(np.stack(blocks[i * batch_size : (i + 1) * batch_size])).long() for i in range(n)]


@dataclass
class LocalData:
    """Train and val batches, tokenized once and shared by every run of a benchmark."""

    train: list[torch.Tensor]
    val: list[torch.Tensor]

    @classmethod
    def load(cls, cfg: RaydratConfig, steps: int | None = None, workers: int = 1) -> LocalData:
        """Enough train blocks for ``steps`` optimizer steps of ``workers`` workers (they
        cycle if the corpus has fewer), and ``train.eval_batches`` val batches."""
        tc, mc = cfg.train, cfg.model
        need = (steps or tc.steps) * tc.grad_accum * tc.batch_size * workers
        train = list(itertools.islice(iter_blocks_local(cfg.data, mc.seq_len, mc.vocab_size, "train"), need))
        val = list(
            itertools.islice(
                iter_blocks_local(cfg.data, mc.seq_len, mc.vocab_size, "val"), tc.eval_batches * tc.batch_size
            )
        )
        data = cls(batches_of(train, tc.batch_size), batches_of(val, tc.batch_size))
        if not data.train or not data.val:
            raise RuntimeError("corpus too small for the benchmark: lower train.batch_size")
        return data

    @classmethod
    def random(cls, cfg: RaydratConfig, steps: int, seed: int = 0) -> LocalData:
        """Uniformly random token blocks for ``steps`` optimizer steps (one val batch): what a
        memory measurement needs (the allocator's figures do not depend on the tokens)."""
        tc, mc = cfg.train, cfg.model
        gen = torch.Generator().manual_seed(seed)
        blocks = lambda n: [
            torch.randint(0, mc.vocab_size, (tc.batch_size, mc.seq_len + 1), generator=gen) for _ in range(n)
        ]
        return cls(blocks(steps * tc.grad_accum), blocks(1))

    def shard(self, rank: int, world: int) -> LocalData:
        """Rank ``rank``'s share of the train batches (every ``world``-th), the whole val."""
        return LocalData(self.train[rank::world], self.val)


@dataclass
class LocalRun:
    """``cfg`` built by the setup a Ray Train worker runs
    (:func:`~raydrat.core.setup.build_fit_state`), training on ``data`` through
    :func:`iter_fit`. :meth:`step` advances one optimizer step and times it (evaluation and
    checkpoint callbacks excluded)."""

    cfg: RaydratConfig
    runtime: Runtime
    state: FitState
    data: LocalData
    callbacks: Sequence[Callback] = ()
    step_s: list[float] = field(default_factory=list)
    """Wall seconds of each optimizer step (planning, the step, the techniques' updates)."""
    profiled: list[bool] = field(default_factory=list)
    """Whether each step ran while the allocator profiler was on."""
    _steps: Iterator[FitState] | None = None

    @classmethod
    def start(
        cls,
        cfg: RaydratConfig,
        data: LocalData,
        callbacks: Sequence[Callback] = (),
        runtime: Runtime | None = None,
        rank: int = 0,
        world_size: int = 1,
        sample_steps: int = 2,
        sample_at: Sequence[int] = (),
    ) -> LocalRun:
        """``sample_steps`` / ``sample_at``: the steps whose allocator peak is measured on
        CPU (:class:`~raydrat.core.memory.peak.PeakMemory`'s ``first_steps`` / ``at_steps``)."""
        runtime = runtime or resolve(cfg)
        device = runtime.device()
        state = build_fit_state(cfg, runtime, device, rank, world_size, sample_steps=sample_steps, sample_at=sample_at)
        return cls(cfg, runtime, state, data, callbacks)

    @property
    def peak(self) -> PeakMemory:
        return self.state.peak_memory

    @property
    def model(self) -> torch.nn.Module:
        return self.state.model

    @property
    def techniques(self) -> Techniques:
        return self.state.techniques

    def _iterator(self) -> Iterator[FitState]:
        device = self.runtime.device()
        train = [b.to(device) for b in self.data.train]
        val = [b.to(device) for b in self.data.val]
        batches = resumable_batches(lambda: iter(train), self.state.position)
        return iter_fit(self.state, batches, lambda: val, self.callbacks)

    def step(self) -> bool:
        """One optimizer step; False when the run is over."""
        if self._steps is None:
            self._steps = self._iterator()
        clock = self.state.clock.totals
        outside = clock[M.EVAL_S] + clock[M.CHECKPOINT_S]
        profiled = self.peak.profiling
        t0 = time.perf_counter()
        try:
            next(self._steps)
        except StopIteration:
            return False
        self.step_s.append(time.perf_counter() - t0 - (clock[M.EVAL_S] + clock[M.CHECKPOINT_S] - outside))
        self.profiled.append(profiled or self.peak.profiling or self.state.step - 1 in self.peak.profiled_steps)
        return True

    def run(self) -> LocalRun:
        while self.step():
            pass
        return self

    def timed_steps(self) -> list[int]:
        """Indices of the steps that count for throughput: not the first (it warms up), not
        one that ran while the allocator profiler was on (it is slower)."""
        return [i for i in range(1, len(self.step_s)) if not self.profiled[i]]

    def steady_s(self) -> float:
        """Seconds of the timed steps (:meth:`timed_steps`)."""
        return sum(self.step_s[i] for i in self.timed_steps())

    def steady_tokens_per_s(self) -> float:
        steady = len(self.timed_steps())
        return steady * self.state.tokens_per_step / self.steady_s() if steady > 0 and self.steady_s() > 0 else 0.0


def interleave(runs: Sequence[LocalRun]) -> None:
    """Advance ``runs`` (each with ``step() -> bool``: a :class:`LocalRun`, or a benchmark's
    reference loop) one step each in turn (the order reversed every round) until all are
    done, so each sees the same machine load."""
    live = list(runs)
    forward = True
    while live:
        order = live if forward else live[::-1]
        live = [r for r in order if r.step()]
        if not forward:
            live.reverse()
        forward = not forward
