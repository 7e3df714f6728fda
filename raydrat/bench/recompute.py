"""``raydrat bench recompute``: raydrat's recomputation plans against PyTorch's, side by side.

Every variant is a :class:`~raydrat.bench.local.LocalRun`: the config built as a worker
builds it (model, techniques in order, optimizer) and trained through the project's loop
(:func:`raydrat.core.fit.iter_fit`), all from the same seed on the same batches, in one
process. Per model (the demo recipe's, and a 6-layer d_model 384 model):

* eager: ``none`` (the reference of every time ratio); ``torch.utils.checkpoint`` per
  block (torch's ``full``, written the plain way around the blocks of a ``none`` run);
  raydrat ``recompute.mode: full``; raydrat op-level ``budget`` and ``gated``
  (``recompute.granularity: op``) at each budget fraction;
* compiled (``compile.mode: default``): torch's default partition (``none``) and with
  ``torch._functorch.config.activation_memory_budget`` at each fraction; raydrat ``full``;
  raydrat op-level ``budget`` at each fraction and at the bytes torch stored at that
  fraction (``@torch``).

Budgets are fractions of the no-recompute saved bytes of the same execution mode: eager
rows of eager ``none``'s (the op costs' count, equal to the allocator's), compiled rows of
torch.compile default's as the allocator measured them (what ``activation_memory_budget``'s
1.0 means), so at one fraction raydrat's compiled budget and torch's are the same bytes.

Op costs are measured once per model on a probe model before any run starts (the
allocator profiler, which slows every op, is off) and given to raydrat's planners, which
use them unless their plan cache (:mod:`raydrat.core.techniques.recompute.plan_cache`)
holds a plan for that model, batch and budget: a row says which (``plan``: ``cached``, or
``measured`` with the measurement's CPU seconds, which count towards its compile time).

Columns (the same instruments for every row): ``saved_bytes``, the bytes the forward phase
of a steady step (step 1) leaves allocated for backward, and ``peak_bytes``, that step's
peak (parameters and optimizer states included), both from PyTorch's allocator
(:class:`~raydrat.core.memory.peak.PeakMemory`: the profiler's memory events on CPU,
``memory_allocated`` on CUDA); ``time_ratio``, step time over eager ``none``'s in the same
round, median over the timed rounds (wall clock), and ``cpu_time_ratio``, the same with this
thread's CPU time (one intra-op thread: the whole step runs on the calling thread, so
other processes competing for the cores do not inflate it; the verdicts use it on CPU),
with its min–max over the rounds and the step's own CPU time (median, min–max);
``compile_cpu_s`` / ``compile_s``, step 0's CPU time (this process and the compile workers
and compilers it starts, :mod:`raydrat.bench.compile_time`) and wall clock, with
``inductor_cache``: whether inductor's FX graph cache served the compile (``hit``) or it
compiled from scratch (``miss``). Steps 0 and 1 (compile, planning, allocator sampling) are
not timed; the timed rounds interleave every run step by step, the order reversed each round.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch._dynamo
import torch._functorch.config
from torch import nn
from torch.utils.checkpoint import checkpoint

from raydrat.bench.compile_time import CompileClock, CompileTime, tree_cpu_s
from raydrat.bench.local import LocalData, LocalRun
from raydrat.bench.report import load_average, print_table
from raydrat.config import ConfigError, RaydratConfig, load_config
from raydrat.core.model.build import build_model
from raydrat.core.techniques.recompute.op_costs import OpCosts
from raydrat.core.techniques.recompute.op_measure import measure_op_costs
from raydrat.tables import write_json

DEFAULT_FRACTIONS = (0.25, 0.5, 0.75)
SIX_LAYER = "6l-d384"
"""The larger shape: the demo model at 6 layers, d_model 384 (6 heads, 2 kv heads), seq 256, batch 8."""
DEFAULT_MODELS = ("demo", SIX_LAYER)
WARM_STEPS = 2
"""Untimed steps per run first: compile, planning, the allocator's sampled steps."""
COMPILE_GOAL = 2.0
"""raydrat's compiled plan compiles (planning included) within this factor of torch's budget."""


def model_config(name: str, steps: int, extra: Sequence[str] = ()) -> RaydratConfig:
    """The bench's base config for a model name (``6l-d384`` or a recipe / YAML path):
    ``steps`` optimizer steps, one intra-op thread, no evaluation to speak of."""
    shape = []
    if name == SIX_LAYER:
        name, shape = (
            "demo",
            [
                "model.n_layer=6",
                "model.d_model=384",
                "model.n_head=6",
                "model.n_kv_head=2",
                "model.seq_len=256",
                "train.batch_size=8",
            ],
        )
    return load_config(
        name,
        [
            *shape,
            f"train.steps={steps}",
            f"train.eval_every={steps}",
            "train.eval_batches=1",
            f"train.log_every={steps}",
            "optim.warmup_steps=0",
            "scaling.cpus_per_worker=1",
            "train.device=cpu",
            *extra,
        ],
    )


class _TorchBlockCheckpoint(nn.Module):
    """PyTorch's own per-block checkpointing, written the plain way (the peer of raydrat ``full``)."""

    def __init__(self, block: nn.Module):
        super().__init__()
        self.block = block

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return checkpoint(self.block, x, use_reentrant=False)


@dataclass
class Variant:
    name: str
    planner: str
    mode: str
    fraction: float | None
    compiled: bool
    run: LocalRun
    torch_budget: float | None = None
    """``activation_memory_budget`` this run compiles and steps under (torch budget rows)."""
    budget_bytes: int | None = None
    note: str = ""
    wall: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)
    compile: CompileTime = field(default_factory=CompileTime)
    """Step 0: compile (compiled rows) and planning."""
    plan_source: str | None = None
    """raydrat op-level rows: ``cached`` (the plan cache's) or ``measured`` (planned from the costs)."""
    plan_cpu_s: float = 0.0
    """CPU seconds of the cost measurement the plan came from (0 for a cached plan)."""

    def context(self) -> contextlib.AbstractContextManager:
        if self.torch_budget is None:
            return contextlib.nullcontext()
        return torch._functorch.config.patch(activation_memory_budget=self.torch_budget)

    def step(self, timed: bool) -> bool:
        t0, c0 = time.perf_counter(), time.thread_time()
        with self.context():
            more = self.run.step()
        if more and timed:
            self.wall.append(time.perf_counter() - t0)
            self.cpu.append(time.thread_time() - c0)
        return more

    @property
    def saved(self) -> int | None:
        s = self.run.peak.steps.get(1)
        return None if s is None else s.saved_bytes

    @property
    def peak_bytes(self) -> int | None:
        s = self.run.peak.steps.get(1)
        return None if s is None else s.peak

    @property
    def predicted(self) -> int | None:
        rec = self.run.techniques.recompute
        return rec.plan_bytes() if rec.granularity == "op" else None

    @property
    def setup_cpu_s(self) -> float:
        """What this row costs before its first timed step: compile and planning."""
        return self.compile.cpu_s + self.plan_cpu_s


def _isolate(run: LocalRun, name: str) -> None:
    """Dynamo reuses one compiled graph for every GPT instance it can (the module is not
    guarded by identity); a subclass per variant gives each its own compile, under its own
    ``activation_memory_budget``."""
    model = run.model
    model.__class__ = type(f"GPT_{''.join(c if c.isalnum() else '_' for c in name)}", (type(model),), {})


class _Bench:
    def __init__(self, name: str, steps: int, data: LocalData, costs: OpCosts, measure_cpu_s: float, log):
        self.name, self.steps, self.data, self.costs, self.log = name, steps, data, costs, log
        self.measure_cpu_s = measure_cpu_s
        self.variants: list[Variant] = []
        self.infeasible: list[dict] = []

    def start(
        self, vname, planner, mode, fraction, compiled, overrides=(), torch_budget=None, budget=None, wrap_blocks=False
    ) -> Variant | None:
        extra = [*overrides, *(["compile.mode=default"] if compiled else [])]
        if budget is not None:
            extra += [f"recompute.budget_mb={budget / 2**20!r}"]
        cfg = model_config(self.name, self.steps, extra)
        try:
            run = LocalRun.start(cfg, self.data, sample_steps=WARM_STEPS)
        except ConfigError as err:  # a budget below the minimum: the row says so
            self._infeasible(vname, planner, mode, fraction, compiled, budget, str(err))
            return None
        if wrap_blocks:
            for key, block in list(run.model.layers.items()):
                run.model.layers[key] = _TorchBlockCheckpoint(block)
        if compiled:
            _isolate(run, vname)
        if run.techniques.recompute.granularity == "op":
            run.techniques.recompute.costs = self.costs  # measured away from the allocator profiler
        v = Variant(vname, planner, mode, fraction, compiled, run, torch_budget, budget)
        t0 = time.perf_counter()
        clock = CompileClock()
        try:
            with clock:
                v.step(timed=False)
            for _ in range(WARM_STEPS - 1):
                v.step(timed=False)
        except ConfigError as err:
            self._infeasible(vname, planner, mode, fraction, compiled, budget, str(err))
            run.peak.finish()
            return None
        run.peak.finish()
        v.compile = clock.time
        level = run.techniques.recompute.level
        if run.techniques.recompute.granularity == "op":
            v.plan_source = "measured" if getattr(level, "recalled", None) is None else "cached"
            v.plan_cpu_s = self.measure_cpu_s if v.plan_source == "measured" else 0.0
        plan = "" if v.plan_source is None else f", plan {v.plan_source}"
        self.log(
            f"  {vname}: ready in {time.perf_counter() - t0:.1f}s (step 0: {v.compile.cpu_s:.1f}s CPU, "
            f"{v.compile.wall_s:.1f}s wall, inductor cache {v.compile.cache}{plan}), saved {_mib(v.saved)} MiB"
        )
        self.variants.append(v)
        return v

    def _infeasible(self, vname, planner, mode, fraction, compiled, budget, message: str) -> None:
        self.log(f"  {vname}: {message}")
        self.infeasible.append(
            {
                "model": self.name,
                "planner": planner,
                "mode": mode,
                "budget_fraction": fraction,
                "compiled": compiled,
                "saved_bytes": None,
                "peak_bytes": None,
                "time_ratio": None,
                "cpu_time_ratio": None,
                "variant": vname,
                "budget_bytes": budget,
                "predicted_bytes": None,
                "note": f"infeasible: {message}",
            }
        )


def run_model(
    name: str, fractions: Sequence[float], steps: int, compiled: bool, log=print, eager: bool = True
) -> list[dict]:
    """Every row of one model (``eager`` off: of the eager rows only ``none``, the reference)."""
    # one step more than is taken: the loop evaluates at its last step (a compiled model
    # would compile its eval graph there), which no timed step should include
    total = WARM_STEPS + steps + 1
    base = model_config(name, total)
    torch.set_num_threads(1)
    # a fresh dynamo per model: compiles of an earlier model's shapes would make this
    # model's shapes dynamic (automatic dynamic shapes), a different compile
    torch._dynamo.reset()
    data = LocalData.random(base, total)
    mc = base.model
    log(
        f"\n{name}: {mc.n_layer} layers, d_model {mc.d_model}, seq {mc.seq_len}, batch {base.train.batch_size}; "
        "measuring op costs"
    )
    probe = build_model(mc, seed=base.train.seed, device=torch.device("cpu"))
    tokens = data.train[0]
    c0 = tree_cpu_s()
    costs = measure_op_costs(probe.train(), tokens[:, :-1], tokens[:, 1:], sac_overheads=eager)
    measure_cpu_s = tree_cpu_s() - c0
    log(f"  op costs measured in {measure_cpu_s:.1f}s CPU")
    del probe
    b = _Bench(name, total, data, costs, measure_cpu_s, log)
    none = b.start("none", "torch", "none", None, False)
    op = ["recompute.granularity=op"]
    if eager:
        b.start("checkpoint/block", "torch", "full", None, False, wrap_blocks=True)
        b.start("full", "raydrat", "full", None, False, ["recompute.mode=full"])
        for f in fractions:
            budget = int(f * costs.none_bytes)
            b.start(f"budget{f:g}", "raydrat", "budget", f, False, ["recompute.mode=budget", *op], budget=budget)
            b.start(f"gated{f:g}", "raydrat", "gated", f, False, ["recompute.mode=gated", *op], budget=budget)
    if compiled:
        cnone = b.start("compile", "torch", "none", None, True)
        torch_rows = {}
        for f in fractions:
            torch_rows[f] = b.start(f"compile+amb{f:g}", "torch", "budget", f, True, torch_budget=f, budget=None)
            if torch_rows[f] is not None and cnone is not None:
                torch_rows[f].budget_bytes = int(f * cnone.saved)
        b.start("compile+full", "raydrat", "full", None, True, ["recompute.mode=full"])
        for f in fractions:
            targets = [(f"compile+budget{f:g}", int(f * cnone.saved))]
            if torch_rows.get(f) is not None:
                targets.append((f"compile+budget{f:g}@torch", torch_rows[f].saved))
            seen = set()
            for label, budget in targets:
                if budget in seen:
                    continue
                seen.add(budget)
                b.start(label, "raydrat", "budget", f, True, ["recompute.mode=budget", *op], budget=budget)

    variants = b.variants
    load_before = load_average()
    log(f"  timing {len(variants)} runs, {steps} interleaved rounds (load average {load_before})")
    forward = True
    for _ in range(steps):
        for v in variants if forward else variants[::-1]:
            v.step(timed=True)
        forward = not forward
    load_after = load_average()
    log(f"  timed (load average {load_after})")

    rows = []
    for v in variants:
        note = v.note
        pred = v.predicted
        if pred is not None and v.saved is not None and v.compiled and abs(v.saved - pred) > 4096:
            note = (note + "; " if note else "") + f"measured {v.saved - pred:+d} B off the plan's prediction"
        rows.append(
            {
                "model": name,
                "planner": v.planner,
                "mode": v.mode,
                "budget_fraction": v.fraction,
                "compiled": v.compiled,
                "saved_bytes": v.saved,
                "peak_bytes": v.peak_bytes,
                **timings(v, none),
                "variant": v.name,
                "budget_bytes": v.budget_bytes,
                "predicted_bytes": pred,
                "compile_s": v.compile.wall_s,
                "compile_cpu_s": v.compile.cpu_s,
                "inductor_cache": v.compile.cache,
                "plan": v.plan_source,
                "plan_cpu_s": v.plan_cpu_s,
                "note": note,
                "load_average": [load_before, load_after],
            }
        )
    return rows + b.infeasible


def spread(xs: Sequence[float]) -> tuple[float, float, float] | None:
    """Median, min and max over rounds (``None`` without rounds)."""
    return (statistics.median(xs), min(xs), max(xs)) if xs else None


def timings(v: Variant, reference: Variant) -> dict:
    """A row's step times over the timed rounds: its own (wall, and this thread's CPU time)
    and per round over ``reference``'s in the same round; medians, and min–max of the CPU ones."""
    wall = spread([a / r for a, r in zip(v.wall, reference.wall) if r > 0])
    cpu = spread([a / r for a, r in zip(v.cpu, reference.cpu) if r > 0])
    step = spread(v.cpu)
    return {
        "time_ratio": None if wall is None else wall[0],
        "cpu_time_ratio": None if cpu is None else cpu[0],
        "cpu_time_ratio_range": None if cpu is None else list(cpu[1:]),
        "step_s": statistics.median(v.wall),
        "cpu_step_s": step[0],
        "cpu_step_range_s": list(step[1:]),
        "round_cpu_s": v.cpu,
        "round_wall_s": v.wall,
    }


def _mib(b) -> str:
    return "-" if b is None else f"{b / 2**20:.2f}"


def _ratio(x) -> str:
    return "-" if x is None else f"{x:.3f}"


def _ratio_range(median, lo_hi) -> str:
    return "-" if median is None else f"{median:.3f} ({lo_hi[0]:.3f}-{lo_hi[1]:.3f})"


def _ms(median, lo_hi) -> str:
    return "-" if median is None else f"{1e3 * median:.0f} ({1e3 * lo_hi[0]:.0f}-{1e3 * lo_hi[1]:.0f})"


def _compile(r: dict) -> str:
    if r.get("compile_cpu_s") is None:
        return "-"
    plan = f" + {r['plan_cpu_s']:.1f}" if r.get("plan_cpu_s") else ""
    return f"{r['compile_cpu_s']:.1f}{plan} / {r['compile_s']:.1f}"


def _compile_cpu(r: dict) -> float:
    return r["compile_cpu_s"] + (r.get("plan_cpu_s") or 0.0)


def print_rows(rows: list[dict]) -> None:
    for model in dict.fromkeys(r["model"] for r in rows):
        mine = [r for r in rows if r["model"] == model]
        print_table(
            f"{model}: saved bytes (allocator, forward phase of step 1), step peak, step 0 (compile, planning), "
            "step time (this thread's CPU time) and step time / eager none (wall clock, and CPU time)",
            [
                "variant",
                "planner",
                "mode",
                "fraction",
                "compiled",
                "budget MiB",
                "predicted MiB",
                "saved MiB",
                "peak MiB",
                "step 0 s (cpu [+ plan] / wall)",
                "inductor cache",
                "plan",
                "cpu ms/step (min-max)",
                "time ratio",
                "cpu time ratio (min-max)",
                "note",
            ],
            [
                [
                    r["variant"],
                    r["planner"],
                    r["mode"],
                    "-" if r["budget_fraction"] is None else f"{r['budget_fraction']:g}",
                    "yes" if r["compiled"] else "no",
                    _mib(r["budget_bytes"]),
                    _mib(r["predicted_bytes"]),
                    _mib(r["saved_bytes"]),
                    _mib(r["peak_bytes"]),
                    _compile(r),
                    r.get("inductor_cache") or "-",
                    r.get("plan") or "-",
                    _ms(r.get("cpu_step_s"), r.get("cpu_step_range_s")),
                    _ratio(r["time_ratio"]),
                    _ratio_range(r["cpu_time_ratio"], r.get("cpu_time_ratio_range")),
                    r["note"],
                ]
                for r in mine
            ],
            "load average before and after the timed rounds: "
            + ", ".join(dict.fromkeys(" / ".join(r["load_average"]) for r in mine if r.get("load_average"))),
        )
        goal = [_goal_row(r, mine) for r in mine]
        goal = [g for g in goal if g is not None]
        if goal:
            print_table(
                f"{model}: raydrat compiled plan vs torch.compile activation_memory_budget at the same fraction "
                f"(goal: no more bytes, no slower, compiled within {COMPILE_GOAL:g}x torch's CPU time)",
                [
                    "raydrat variant",
                    "fraction",
                    "raydrat MiB",
                    "torch MiB",
                    "raydrat peak MiB",
                    "torch peak MiB",
                    "step 0 cpu s raydrat / torch",
                    "raydrat / torch step (paired, min-max)",
                    "goal",
                ],
                goal,
                "step 0: compile and planning, CPU seconds of this process and its compile workers (raydrat: "
                "with the cost measurement when the plan was not cached); paired: raydrat's step CPU time over "
                "torch's in the same round, median and min-max over rounds",
            )


def _goal_row(r: dict, rows: list[dict]) -> list | None:
    """The goal table's row for a raydrat compiled budget row (``None`` for any other row)."""
    if r["planner"] != "raydrat" or r["mode"] != "budget" or not r["compiled"] or r["saved_bytes"] is None:
        return None
    peer = next(
        (
            p
            for p in rows
            if p["planner"] == "torch"
            and p["mode"] == "budget"
            and p["compiled"]
            and p["budget_fraction"] == r["budget_fraction"]
            and p["saved_bytes"] is not None
        ),
        None,
    )
    if peer is None:
        return None
    paired = spread([a / b for a, b in zip(r["round_cpu_s"], peer["round_cpu_s"])])
    compile_ratio = _compile_cpu(r) / max(_compile_cpu(peer), 1e-9)
    checks = (
        ("more bytes", r["saved_bytes"] <= peer["saved_bytes"]),
        ("slower", paired[0] <= 1.0),
        ("slower to compile", compile_ratio <= COMPILE_GOAL),
    )
    verdict = "meets" if all(ok for _, ok in checks) else "short: " + ", ".join(w for w, ok in checks if not ok)
    return [
        r["variant"],
        f"{r['budget_fraction']:g}",
        _mib(r["saved_bytes"]),
        _mib(peer["saved_bytes"]),
        _mib(r["peak_bytes"]),
        _mib(peer["peak_bytes"]),
        f"{_compile_cpu(r):.1f} / {_compile_cpu(peer):.1f} ({compile_ratio:.2f}x)",
        _ratio_range(paired[0], paired[1:]),
        verdict,
    ]


def run_recompute(
    models: Sequence[str] = DEFAULT_MODELS,
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
    steps: int = 6,
    compiled: bool = True,
    json_path: str | None = None,
    eager: bool = True,
) -> list[dict]:
    """Run the benchmark for ``models``; print the tables; write JSON rows to ``json_path``."""
    bad = [f for f in fractions if not 0 < f <= 1]
    if bad:
        raise ConfigError(f"--fractions {bad}: budget fractions must be in (0, 1], e.g. 0.25 0.5 0.75")
    if steps < 1:
        raise ConfigError(f"--steps {steps}: at least 1 timed round")
    if not (compiled or eager):
        raise ConfigError("--no-compile with --no-eager leaves no rows: give at most one of them")
    old_threads = torch.get_num_threads()
    dyn = torch._dynamo.config
    old_limits = (dyn.cache_size_limit, dyn.accumulated_cache_size_limit)
    # every run compiles nn.Module._call_impl for its own class: one cache entry each
    dyn.cache_size_limit, dyn.accumulated_cache_size_limit = 256, 4096
    load_start = load_average()
    rows: list[dict] = []
    try:
        for name in models:
            rows += run_model(name, fractions, steps, compiled, eager=eager)
    finally:
        torch.set_num_threads(old_threads)
        dyn.cache_size_limit, dyn.accumulated_cache_size_limit = old_limits
    print_rows(rows)
    print(
        f"\nload average at start {load_start}, at end {load_average()}; 1 thread; torch {torch.__version__}; "
        f"{steps} timed rounds after {WARM_STEPS} untimed steps per run"
    )
    if json_path:
        write_json(json_path, rows)
    return rows
