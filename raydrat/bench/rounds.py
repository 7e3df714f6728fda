"""Timings that hold on a shared, noisy machine, for every benchmark that states a speed ratio.

- **Interleaved rounds.** The contenders take turns: in each round every one of them runs
  its work (the order rotated from round to round), so each sees the same machine load,
  and a ratio is taken *per round* between contenders measured minutes, not hours, apart.
- **Rounds long enough to dominate timer noise.** A round repeats a contender's unit of
  work (one training step) until it lasts at least ``round_s``; the count is fixed after
  the warm-up, from the slowest warm-up call.
- **Two clocks.** Wall-clock time, and this process's CPU time (all its threads), which
  other processes on the machine disturb far less: a process that waits for the CPU does
  not accumulate it. On a GPU only wall time means anything.
- **Median and min-max** over at least :data:`MIN_ROUNDS` rounds, of each contender's
  seconds per unit and of each per-round ratio.
- **A verdict only when the spread allows one.** :func:`verdict` compares a ratio's
  median with its goal; when half the min-max width of the per-round ratios is larger
  than the distance from the goal (the margin), it refuses and says so.
- **The load average** at the start and the end goes beside the figures (:class:`Load`).

Benchmarks that run their own loop (``bench model``, ``bench recompute``) call
:func:`run_rounds` with one callable per contender. Benchmarks whose steps are already
interleaved elsewhere (``bench combos`` steps its training runs in turn) record each
step's wall and CPU seconds and group them into rounds with :meth:`Series.from_steps`.
Either way :func:`speed_ratio` pairs two series round by round and :func:`verdict` judges it.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from raydrat.bench.report import load_average

MIN_ROUNDS = 5
"""Fewer rounds than this give no ratio (:func:`speed_ratio` refuses)."""
ROUND_S = 0.5
"""Default shortest round per contender, seconds: well above the timers' resolution and a
scheduler's time slice, short enough that every contender's round sees the same load."""
CLOCKS = ("cpu", "wall")


@dataclass(frozen=True)
class Spread:
    """Median and min-max of per-round values."""

    median: float
    low: float
    high: float
    n: int

    @classmethod
    def of(cls, values: Sequence[float]) -> Spread:
        if not values:
            raise ValueError("no rounds to summarise")
        return cls(statistics.median(values), min(values), max(values), len(values))

    @property
    def half_width(self) -> float:
        return (self.high - self.low) / 2

    def relative(self) -> float:
        """Half the min-max width over the median."""
        return self.half_width / self.median if self.median else math.inf

    def text(self, fmt: str = "{:.3f}", unit: str = "x") -> str:
        """``1.032x (0.981-1.070)``."""
        return f"{fmt.format(self.median)}{unit} ({fmt.format(self.low)}-{fmt.format(self.high)})"

    def as_dict(self) -> dict:
        return {"median": self.median, "min": self.low, "max": self.high, "rounds": self.n}


@dataclass
class Series:
    """One contender's seconds per unit of work in each round, by both clocks."""

    name: str
    wall: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)

    def add(self, wall: float, cpu: float) -> None:
        self.wall.append(wall)
        self.cpu.append(cpu)

    def clock(self, clock: str) -> list[float]:
        if clock not in CLOCKS:
            raise ValueError(f"clock must be one of {CLOCKS}, got {clock!r}")
        return self.cpu if clock == "cpu" else self.wall

    def spread(self, clock: str) -> Spread:
        return Spread.of(self.clock(clock))

    def rate(self, units: float, clock: str) -> Spread:
        """``units`` per second (e.g. tokens per step over seconds per step), per round."""
        return Spread.of([units / s for s in self.clock(clock) if s > 0])

    @classmethod
    def from_steps(cls, name: str, wall: Sequence[float], cpu: Sequence[float], rounds: int = MIN_ROUNDS) -> Series:
        """Steps that were interleaved with other contenders' as they ran, grouped into
        ``rounds`` rounds of consecutive steps (their counts differ by one at most), each
        round's mean seconds per step. Contenders that stepped in turn, grouped into the
        same number of rounds, have their rounds paired by index (:func:`speed_ratio`)."""
        if len(wall) != len(cpu):
            raise ValueError(f"{name}: {len(wall)} wall times but {len(cpu)} CPU times")
        n = min(rounds, len(wall))
        series = cls(name)
        for i in range(n):
            a, b = i * len(wall) // n, (i + 1) * len(wall) // n
            series.add(sum(wall[a:b]) / (b - a), sum(cpu[a:b]) / (b - a))
        return series


def check_rounds(rounds: int) -> None:
    """Refuse fewer than :data:`MIN_ROUNDS` rounds before any work starts."""
    if rounds < MIN_ROUNDS:
        raise ValueError(f"at least {MIN_ROUNDS} rounds make a ratio, got {rounds} (--rounds)")


def run_rounds(
    work: Mapping[str, Callable[[], object]],
    rounds: int = MIN_ROUNDS,
    round_s: float = ROUND_S,
    warmup: int = 2,
    sync: Callable[[], None] | None = None,
    log: Callable[[str], None] | None = None,
) -> dict[str, Series]:
    """Time each of ``work``'s callables (one unit of work each call), interleaved.

    ``warmup`` untimed calls each (the last one timed to size the rounds), then ``rounds``
    rounds; in round ``r`` the contenders start at the ``r``-th and take turns, each
    calling its work as many times as fill ``round_s`` seconds. ``sync`` (e.g.
    ``torch.cuda.synchronize``) is called before each clock reading."""
    check_rounds(rounds)
    wait = sync or (lambda: None)
    repeats: dict[str, int] = {}
    for name, fn in work.items():
        last = 0.0
        for _ in range(max(1, warmup)):
            wait()
            t0 = time.perf_counter()
            fn()
            wait()
            last = time.perf_counter() - t0
        repeats[name] = max(1, math.ceil(round_s / last)) if last > 0 else 1
    if log:
        log("  units per round: " + ", ".join(f"{n} {k}" for n, k in repeats.items()))
    names = list(work)
    series = {name: Series(name) for name in names}
    for r in range(rounds):
        for j in range(len(names)):
            name = names[(r + j) % len(names)]
            fn, k = work[name], repeats[name]
            wait()
            t0, c0 = time.perf_counter(), time.process_time()
            for _ in range(k):
                fn()
            wait()
            series[name].add((time.perf_counter() - t0) / k, (time.process_time() - c0) / k)
    return series


def speed_ratio(ours: Series, ref: Series, clock: str) -> Spread:
    """How many times faster ``ours`` is than ``ref`` (``ref``'s seconds over ours), round
    by round (rounds paired by index: they ran side by side), median and min-max."""
    a, b = ours.clock(clock), ref.clock(clock)
    if len(a) != len(b):
        raise ValueError(f"{ours.name} has {len(a)} rounds, {ref.name} {len(b)}: pair rounds of one run")
    if len(a) < MIN_ROUNDS:
        raise ValueError(f"{len(a)} rounds: a ratio needs at least {MIN_ROUNDS}")
    return Spread.of([r / o for o, r in zip(a, b) if o > 0])


@dataclass(frozen=True)
class Verdict:
    """``holds``: True (the ratio is past its goal), False (short of it) or None (the
    spread allows no verdict); ``text`` says which, and why when there is none."""

    holds: bool | None
    text: str


def verdict(ratio: Spread, goal: float = 1.0, ahead: str = "ahead", behind: str = "behind") -> Verdict:
    """Past ``goal`` or short of it, but only when the margin (the median's distance from
    the goal) is wider than the spread (half the min-max width of the per-round ratios)."""
    margin, spread = abs(ratio.median - goal), ratio.half_width
    if margin <= spread:
        return Verdict(None, f"no verdict: spread +/-{spread:.3f} wider than margin {margin:.3f}")
    holds = ratio.median > goal
    return Verdict(holds, f"{ahead if holds else behind} (margin {margin:.3f} > spread +/-{spread:.3f})")


VERDICT_RULE = (
    "verdict: only where the margin (the median ratio's distance from {goal:g}) is wider than the spread "
    "(half the min-max width of the per-round ratios); otherwise none, and the two are printed: "
    "more rounds or a quieter machine may give one"
)
"""The rule :func:`verdict` applies, for a table's footer (``VERDICT_RULE.format(goal=1)``)."""


@dataclass
class Load:
    """The load average when a measurement starts and when it ends."""

    start: str = field(default_factory=load_average)
    end: str | None = None

    def finish(self) -> Load:
        self.end = load_average()
        return self

    def text(self) -> str:
        return f"load average {self.start} (start), {self.end or load_average()} (end)"

    def as_list(self) -> list[str]:
        return [self.start, self.end or load_average()]
