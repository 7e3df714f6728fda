"""Metric names (defined once), the raydrat logger, and the throughput and phase clocks
behind the console progress line.

It imports nothing of raydrat, so every layer can report under these names (the techniques
their own metrics, the training loop its figures, the adapters what they log to MLflow)
without depending on the layer that reads them."""

from __future__ import annotations

import logging
import sys
import time
from contextlib import contextmanager

# The naming rules, as the MLflow UI shows them: the training curves (losses, learning rate,
# gradient norm) have plain names and make up the run page's "Model metrics"; how fast and
# how much memory ("system/", the UI's System metrics) are apart; a figure of bytes names
# its unit (MiB). A run's metrics are logged losses first (LEADING), the order the run
# page's overview lists them in.
SYSTEM = "system/"
MIB = 2**20

# Mean training loss over the optimizer steps since the previous log line.
TRAIN_LOSS = "train_loss"
VAL_LOSS = "val_loss"
LEADING = (TRAIN_LOSS, VAL_LOSS)
LR = "lr"
TOKENS_PER_S = "system/tokens_per_s"
# Steady-state tokens/s over the whole run so far (first step excluded).
TOKENS_PER_S_AVG = "system/tokens_per_s_avg"
GRAD_NORM = "grad_norm"
STEP = "step"
TOKENS_SEEN = "tokens_seen"
# Communication (raydrat.core.techniques.sync.comm), per optimizer step averaged over the logging window:
# MiB this worker sent in collectives (ring all-reduce: 2(W-1)/W x payload), seconds from
# launch to completion of its collectives, and that time over the step time.
COMM_MIB_PER_STEP = "system/comm_mib_per_step"
COMM_S_PER_STEP = "system/comm_s_per_step"
COMM_FRACTION = "system/comm_fraction"
COMM_MIB_TOTAL = "system/comm_mib_total"
# Local updates on torchft replica groups (raydrat.core.techniques.sync.torchft_local), per
# logging window: the replicas in the last sync's quorum, the replicas that left it and that
# joined it (deaths and rejoins), and the syncs that did not commit.
QUORUM_SIZE = "replicas/quorum_size"
REPLICAS_LEFT = "replicas/left"
REPLICAS_JOINED = "replicas/joined"
SYNC_COMMITS_FAILED = "replicas/failed_commits"
# Logged once by a replica that joined the others by healing from a live peer: the step it took on.
HEALED_AT_STEP = "replicas/healed_at_step"
# Logged once when a worker group starts from a checkpoint (after a failure or --resume).
RESUMED_FROM_STEP = "resumed_from_step"

# Efficiency techniques (raydrat.core.techniques): reported only by the techniques a run uses.
ACTIVE_SLOTS = "active_slots"
STORED_FRACTION = "gates/stored_fraction"
# Saved activation MiB of the step's plan, from the per-branch costs last measured.
ACTIVATION_MIB = "memory/activation_mib"
RECOMPUTE_FLOPS = "recompute_flops"
RESOURCE_LOSS = "resource_loss"
# memory_budget form of the gates: the Lagrange multiplier of the budget constraint.
GATE_MULTIPLIER = "gates/multiplier"
PRECISION_SWITCHES = "precision_switches"
OVERFLOW_STEPS = "fp16_overflow_steps"
GATE_HEATMAP_ARTIFACT = "plots/gate_heatmap.png"


def gate_prob_name(layer: int, kind: str) -> str:
    """Metric name of the store probability of one gate, e.g. ``gates/p/L0.attn``."""
    return f"gates/p/L{layer}.{kind}"


# Peak MiB PyTorch's allocator holds for the worker's training steps (forward, backward,
# optimizer step, accumulation), parameters and optimizer states included: CUDA
# max_memory_allocated over every step; CPU the profiler's allocator events on a few
# sampled steps (raydrat.core.memory.peak).
PEAK_MIB = "system/peak_mib"
# The predicted peak per worker (the resolved Runtime's estimate): a param of the run, it is
# known before the first step.
ESTIMATED_PEAK_PARAM = "runtime.estimated_peak_mib"
# Micro-batch in use (train.auto_microbatch may have shrunk it).
MICRO_BATCH = "micro_batch_size"
# Overhead accounting. Seconds spent inside optimizer steps so far:
TRAIN_TIME_S = "system/train_time_s"
# Where else a worker's loop spent its time, in seconds since the loop started (each is
# reported with every checkpoint, so the last one's own save is not in it).
DATA_WAIT_S = "system/data_wait_s"
EVAL_S = "system/eval_s"
CHECKPOINT_S = "system/checkpoint_s"
LOOP_S = "system/loop_s"
PHASES = (DATA_WAIT_S, EVAL_S, CHECKPOINT_S)
SYSTEM_DECIMALS = 3
"""System figures are logged rounded to this many decimals (a millisecond, a KiB)."""

# Names runs logged before the rules above, and the factor into today's unit: what reads a
# run back (a sweep's report over trials that ran before) reads them through ``current``.
RENAMED = {
    "peak_bytes": (PEAK_MIB, 1 / MIB),
    "tokens_per_s": (TOKENS_PER_S, 1.0),
    "tokens_per_s_avg": (TOKENS_PER_S_AVG, 1.0),
    "comm_bytes_per_step": (COMM_MIB_PER_STEP, 1 / MIB),
    "comm_bytes_total": (COMM_MIB_TOTAL, 1 / MIB),
    "comm_s_per_step": (COMM_S_PER_STEP, 1.0),
    "comm_fraction": (COMM_FRACTION, 1.0),
    "memory/activation_bytes": (ACTIVATION_MIB, 1 / MIB),
}


def current(values: dict[str, float]) -> dict[str, float]:
    """``values`` under today's names: a figure logged under an old name (:data:`RENAMED`)
    is converted, unless today's is there too."""
    out = dict(values)
    for old, (new, factor) in RENAMED.items():
        if old in out:
            value = out.pop(old)
            out.setdefault(new, value * factor if value is not None else None)
    return out


def for_tracking(values: dict[str, float]) -> dict[str, float]:
    """``values`` as a run logs them: the losses first (the order the run page lists a run's
    metrics in is the order they were first logged), system figures rounded."""
    first = {k: values[k] for k in LEADING if k in values}
    rest = {k: round(v, SYSTEM_DECIMALS) if k.startswith(SYSTEM) else v for k, v in values.items() if k not in first}
    return first | rest


# The attribute Ray Train ranks checkpoints by: the save's val_loss, or UNSCORED for a save
# without evaluation (``train.checkpoint_every``). It must be finite: Ray Train writes an inf
# score as null in its checkpoint snapshot, and a resumed controller then fails ranking saves.
# (Ray keeps the newest checkpoint whatever its score.)
CHECKPOINT_SCORE = "checkpoint_score"
CHECKPOINT_ORDER = "min"
UNSCORED = 1e30

logger = logging.getLogger("raydrat")


class ConsoleHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is when a record is emitted, not to the stream that
    was current when logging was set up (a console redirected later still gets the lines)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:
        pass


def setup_logging(level: int = logging.INFO) -> logging.Logger:
    """Configure the one raydrat logger (idempotent)."""
    if not logger.handlers:
        handler = ConsoleHandler()
        handler.setFormatter(logging.Formatter("[raydrat] %(message)s"))
        logger.addHandler(handler)
        logger.propagate = False
    logger.setLevel(level)
    return logger


class PhaseClock:
    """Seconds a worker's loop spends waiting for data, evaluating and saving checkpoints,
    and its wall time since it started: with ``train_time_s`` they split the loop's time."""

    def __init__(self):
        self.started = time.perf_counter()
        self.totals = dict.fromkeys(PHASES, 0.0)

    @contextmanager
    def timing(self, phase: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.totals[phase] += time.perf_counter() - t0

    def snapshot(self) -> dict[str, float]:
        return {**self.totals, LOOP_S: time.perf_counter() - self.started}


class Throughput:
    """Tokens/s over the steps since the last ``rate()`` call, and ETA from the mean step
    time since the first step (the first step, which includes warm-up, is excluded)."""

    def __init__(self, total_steps: int, tokens_per_step: int):
        self.total_steps = total_steps
        self.tokens_per_step = tokens_per_step
        self._window_start = time.perf_counter()
        self._window_steps = 0
        self._window_skipped = 0.0
        self._steady_start: float | None = None
        self._steady_steps = 0
        self._skipped = 0.0
        self._last = self._window_start

    def step_done(self, timed: bool = True) -> None:
        """A step ended; ``timed=False``: leave its time and tokens out (a step that ran
        under a profiler)."""
        now = time.perf_counter()
        took, self._last = now - self._last, now
        if self._steady_start is None:
            self._steady_start = now
            self._window_start = now
            self._window_steps = 0
        elif timed:
            self._window_steps += 1
            self._steady_steps += 1
        else:
            self._skipped += took
            self._window_skipped += took

    def rate(self) -> float:
        """Tokens/s since the previous call (resets the window)."""
        now = time.perf_counter()
        elapsed = now - self._window_start - self._window_skipped
        rate = self._window_steps * self.tokens_per_step / elapsed if elapsed > 0 else 0.0
        self._window_start, self._window_steps, self._window_skipped = now, 0, 0.0
        return rate

    def steady_rate(self) -> float:
        """Tokens/s over all timed steps after the first."""
        if self._steady_start is None or self._steady_steps == 0:
            return 0.0
        return self._steady_steps * self.tokens_per_step / (time.perf_counter() - self._steady_start - self._skipped)

    def eta_s(self, step: int) -> float:
        if self._steady_start is None or self._steady_steps == 0:
            return float("nan")
        per_step = (time.perf_counter() - self._steady_start - self._skipped) / self._steady_steps
        return per_step * (self.total_steps - step)


def format_eta(seconds: float) -> str:
    if seconds != seconds:  # nan
        return "?"
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def progress_line(step: int, total: int, metrics: dict, eta_s: float) -> str:
    parts = [f"step {step}/{total}"]
    if TRAIN_LOSS in metrics:
        parts.append(f"loss {metrics[TRAIN_LOSS]:.4f}")
    if VAL_LOSS in metrics:
        parts.append(f"val {metrics[VAL_LOSS]:.4f}")
    if LR in metrics:
        parts.append(f"lr {metrics[LR]:.2e}")
    if TOKENS_PER_S in metrics:
        parts.append(f"{metrics[TOKENS_PER_S]:,.0f} tok/s")
    parts.append(f"ETA {format_eta(eta_s)}")
    return " | ".join(parts)
