"""The one training loop: ``fit(state, batches, val_batches, callbacks)``.

Every way raydrat trains goes through it: the Ray Train worker
(:mod:`raydrat.ray_train.worker`), the benchmarks, and any plain PyTorch script. It knows
nothing of Ray or MLflow; what happens around the steps is a callback's job::

    state = build_fit_state(cfg, resolve(cfg), torch.device("cpu"))  # raydrat.core.setup
    fit(state, batches, lambda: val_batches, [ConsoleLog()])

Each step: set the learning rate → take ``grad_accum`` micro-batches →
``techniques.before_step`` (the slot schedule plans the layers, the recompute planner the
stored activations) → one optimizer step (:class:`~raydrat.core.microbatch.MicroBatchStep`:
``train_step``, retried with smaller micro-batches on OOM when allowed) →
``techniques.after_step`` (the gates' own update, the slots' feedback, the precision
fallback) → the sync strategy's averaging. Every ``train.log_every`` steps the
window's metrics go to ``on_log``; every ``train.eval_every`` steps (and at the end) it
evaluates (:func:`raydrat.core.evaluate.evaluate`); at evaluations and every
``train.checkpoint_every`` steps the replicas are synchronised and ``on_save`` gets the
full report (the Ray adapter checkpoints there).

:func:`iter_fit` is the same loop as a generator that yields after each step, so a
benchmark can interleave several runs step by step under the same machine load.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import torch

from raydrat.config.optim import OptimConfig
from raydrat.config.train import TrainConfig
from raydrat.core import metrics as M
from raydrat.core.checkpoint.state import DataPosition
from raydrat.core.evaluate import evaluate
from raydrat.core.memory.peak import PeakMemory
from raydrat.core.microbatch import MicroBatchStep
from raydrat.core.optim import lr_at, set_lr
from raydrat.core.techniques.bundle import Techniques

log = logging.getLogger("raydrat")


class Callback:
    """Hooks around :func:`fit`'s steps. Every rank calls them (a callback that only rank 0
    should act on checks ``state.rank``)."""

    def on_fit_start(self, state: FitState) -> None:
        pass

    def on_log(self, state: FitState, values: dict[str, float]) -> None:
        """Metrics of a logging step (and ``val_loss`` at evaluations)."""

    def on_save(self, state: FitState, report: dict[str, float]) -> None:
        """A checkpoint step: the replicas agree; ``report`` holds every figure of the run so far."""

    def on_step_end(self, state: FitState) -> None:
        pass

    def on_fit_end(self, state: FitState) -> None:
        pass


@dataclass(kw_only=True)
class FitState:
    """What the loop works on, and where it is. Callbacks read it. Built by
    :func:`raydrat.core.setup.build_fit_state`."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer | None
    """``None`` only for a model built for inference (it cannot be trained)."""
    techniques: Techniques
    train: TrainConfig
    optim: OptimConfig
    seq_len: int
    rank: int = 0
    world_size: int = 1
    start_step: int = 0
    """The step the loop starts from (a restored checkpoint's)."""
    restored: bool = False
    """Whether this worker group started from a checkpoint."""
    position: DataPosition = field(default_factory=DataPosition)
    """Where this worker is in its data (kept current by ``resumable_batches``)."""
    step: int = 0
    """Optimizer steps done."""
    clock: M.PhaseClock = field(default_factory=M.PhaseClock)
    throughput: M.Throughput | None = None
    micro: MicroBatchStep | None = None
    peak_memory: PeakMemory | None = None
    last_report: dict = field(default_factory=dict)

    @property
    def tokens_per_step(self) -> int:
        return self.train.batch_size * self.train.grad_accum * self.seq_len * self.world_size

    @property
    def device(self) -> torch.device:
        return self.techniques.precision.device


def evaluates_at(train: TrainConfig, done: int) -> bool:
    """Whether the loop evaluates after its ``done``-th step: every ``train.eval_every``
    steps and at the last."""
    return done % train.eval_every == 0 or done == train.steps


def saves_at(train: TrainConfig, done: int) -> bool:
    """Whether ``on_save`` runs after the ``done``-th step: at evaluations and every
    ``train.checkpoint_every`` steps."""
    return evaluates_at(train, done) or bool(train.checkpoint_every and done % train.checkpoint_every == 0)


def iter_fit(
    state: FitState,
    batches: Iterator[torch.Tensor],
    val_batches: Callable[[], Iterable[torch.Tensor]],
    callbacks: Sequence[Callback] = (),
) -> Iterator[FitState]:
    """:func:`fit`, yielding ``state`` after each optimizer step."""
    if state.optimizer is None:
        raise ValueError("this FitState was built for inference (no optimizer): build it with inference=False to train")
    tc, t, model, optimizer = state.train, state.techniques, state.model, state.optimizer
    state.step = state.start_step
    state.throughput = thr = M.Throughput(tc.steps - state.start_step, state.tokens_per_step)
    state.micro = state.micro or MicroBatchStep(tc)
    if state.peak_memory is None:  # counts from here: build it before the model to count the model too
        state.peak_memory = PeakMemory(state.device)
    peak = state.peak_memory
    try:
        for cb in callbacks:
            cb.on_fit_start(state)
        model.train()
        window_loss, window_steps = torch.zeros((), device=state.device), 0
        for step in range(state.start_step, tc.steps):
            lr = lr_at(step, state.optim, tc.steps)
            set_lr(optimizer, lr)
            t_step = time.perf_counter()
            with state.clock.timing(M.DATA_WAIT_S):
                micro = [next(batches) for _ in range(tc.grad_accum)]
            profiled = peak.profiling
            with peak.region("plan", step):
                t.before_step(step, micro[0])
            with peak.step(step, t.step_plan()):
                loss, grad_norm = state.micro(model, optimizer, micro, state.optim.grad_clip, t)
            with peak.region("after", step):
                message = t.after_step(step, loss)
            profiled = profiled or peak.profiling or step in peak.profiled_steps
            if message:
                log.info(message)
            window_loss += loss.detach()
            window_steps += 1
            done = state.step = step + 1
            last = done == tc.steps
            evaluate_now, save_now = evaluates_at(tc, done), saves_at(tc, done)
            t.sync.after_optimizer_step(done)
            if save_now:  # replicas agree before they are evaluated or saved
                t.sync.synchronize()
            t.sync.step_done(time.perf_counter() - t_step)
            thr.step_done(timed=not profiled)  # a step under the allocator profiler is slower: left out
            values: dict[str, float] = {}
            if done % tc.log_every == 0 or last:
                values = {
                    M.TRAIN_LOSS: (window_loss / window_steps).item(),
                    M.LR: lr,
                    M.TOKENS_PER_S: thr.rate(),
                    M.TOKENS_SEEN: done * state.tokens_per_step,
                }
                if grad_norm is not None:
                    values[M.GRAD_NORM] = float(grad_norm)
                window_loss.zero_()
                window_steps = 0
                values.update(t.metrics())
            if evaluate_now:
                with state.clock.timing(M.EVAL_S):
                    values[M.VAL_LOSS] = evaluate(model, val_batches(), tc.eval_batches).loss
            if values:
                for cb in callbacks:
                    cb.on_log(state, values)
            if save_now:
                report = {
                    **values,
                    M.STEP: done,
                    M.TOKENS_PER_S_AVG: thr.steady_rate(),
                    M.PEAK_MIB: (peak.peak() or 0) / M.MIB,
                    M.MICRO_BATCH: state.micro.micro_batch,
                    M.TRAIN_TIME_S: state.micro.train_time_s,
                    **state.clock.snapshot(),
                }
                report[M.CHECKPOINT_SCORE] = report.get(M.VAL_LOSS, M.UNSCORED)
                report.setdefault(M.VAL_LOSS, float("inf"))  # every report has the sweep metric
                state.last_report = report
                with state.clock.timing(M.CHECKPOINT_S):
                    for cb in callbacks:
                        cb.on_save(state, report)
            for cb in callbacks:
                cb.on_step_end(state)
            yield state
    finally:  # the allocator profiler stops even if a step fails or the loop is abandoned
        peak.finish()
    for cb in callbacks:
        cb.on_fit_end(state)


def fit(
    state: FitState,
    batches: Iterator[torch.Tensor],
    val_batches: Callable[[], Iterable[torch.Tensor]],
    callbacks: Sequence[Callback] = (),
) -> dict:
    """Train from ``state.start_step`` to ``train.steps`` on ``batches`` (an endless iterator
    of ``(B, seq_len + 1)`` token blocks, e.g. :func:`raydrat.core.checkpoint.state.resumable_batches`),
    evaluating on ``val_batches()``. Returns the last checkpoint step's report."""
    for _ in iter_fit(state, batches, val_batches, callbacks):
        pass
    return state.last_report
