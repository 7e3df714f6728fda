"""``raydrat bench combos``: every efficiency technique alone and in useful combinations,
against a baseline (fp32, no recomputation, AdamW, all layers) measured in the same run.

Every combination trains the same model on the same pre-tokenized batches for the same
steps in this process (the same ``fit`` as ``raydrat train``, with the combination's
techniques), **all of them interleaved**: one step of each in turn, the order reversed every
round (:func:`raydrat.bench.local.interleave`), so every tokens/s ratio is taken under the
same machine load. The speed against the baseline is :mod:`raydrat.bench.rounds`': the timed
steps grouped into rounds of consecutive steps, each combination's round paired with the
baseline's, median and min-max by CPU and wall time, and a verdict (faster, slower) only
where the spread is narrower than the margin. Each reports: steady tokens/s (the first step and the steps the
allocator profiler sampled left out), measured parameter / gradient / optimizer-state /
activation bytes (real tensors; activations as storages alive after forward), the peak
bytes PyTorch's allocator held in its worst sampled step (``peak_bytes``) against the
estimate for that step's plan (its active layers and stored branches: the worst step, not
an average) and the config's worst case, the recomputed FLOPs per step, train loss over the
last logging window and the validation loss, all also as ratios to the baseline. MLflow: one
parent run, one child run per combination.

The layer-dropping comparison trains layerdrop for N steps and the baseline at equal
FLOPs and at equal wall-clock, each with a learning rate that fully decays within its
own budget (the comparison under which published layer-dropping gains have vanished).
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch

from raydrat import tracking
from raydrat.bench import rounds as R
from raydrat.bench.layertime import LayerStackTimer
from raydrat.bench.local import LocalData, LocalRun, interleave
from raydrat.bench.report import print_table
from raydrat.config import RaydratConfig, config_from_dict
from raydrat.core import metrics as M
from raydrat.core.fit import Callback
from raydrat.core.memory.activations import activation_plan_bounds
from raydrat.core.memory.estimate import estimate_memory
from raydrat.core.model.build import build_model
from raydrat.core.techniques.recompute.measure import (
    flop_counter,
    grad_bytes,
    optimizer_state_bytes,
    param_bytes,
    saved_activation_bytes,
)
from raydrat.tables import write_json
from raydrat.tracking import Run


def combinations(cfg: RaydratConfig) -> list[tuple[str, list[str]]]:
    """The shipped list. The budget is set halfway between full recomputation and none, and
    (``_low``) at 35% of the way, where storing branches in their order (attention, MLP,
    attention, ...) is several percent worse than the optimum on the demo model: the gates
    have to learn which branches to store."""
    lo, hi = activation_plan_bounds(cfg, "cpu", "fp32")
    budget = f"{(lo + 0.5 * (hi - lo)) / 2**20:.4f}"
    budget_low = f"{(lo + 0.35 * (hi - lo)) / 2**20:.4f}"
    return [
        ("baseline", []),
        ("bf16", ["precision.mode=bf16"]),
        ("adamw_fused", ["optim.name=adamw_fused"]),
        ("adamw8bit", ["optim.name=adamw8bit"]),
        ("full_recompute", ["recompute.mode=full"]),
        ("adamw8bit+full", ["optim.name=adamw8bit", "recompute.mode=full"]),
        (
            "gated_lam0.01",
            ["recompute.mode=gated", "recompute.gates.memory_weight=0.01", "recompute.gates.recompute_weight=0.01"],
        ),
        (
            "gated_lam0.1",
            ["recompute.mode=gated", "recompute.gates.memory_weight=0.1", "recompute.gates.recompute_weight=0.01"],
        ),
        ("gated_at_budget", ["recompute.mode=gated", f"recompute.budget_mb={budget}"]),
        ("budget", ["recompute.mode=budget", f"recompute.budget_mb={budget}"]),
        ("gated_at_budget_low", ["recompute.mode=gated", f"recompute.budget_mb={budget_low}"]),
        ("budget_low", ["recompute.mode=budget", f"recompute.budget_mb={budget_low}"]),
        ("layerdrop0.5", ["slots.mode=layerdrop", "slots.keep=0.5"]),
        ("progressive", ["slots.mode=progressive"]),
        ("compile", ["compile.mode=default"]),
        (
            "bf16+8bit+full+layerdrop",
            [
                "precision.mode=bf16",
                "optim.name=adamw8bit",
                "recompute.mode=full",
                "slots.mode=layerdrop",
                "slots.keep=0.5",
            ],
        ),
    ]


class Session:
    """One combination trained through ``fit`` (:class:`LocalRun`), with the layer-stack
    timer hooked on its model from outside and the per-step figures it reports."""

    def __init__(self, cfg: RaydratConfig, data: LocalData, name: str = "", callbacks: Sequence[Callback] = ()):
        # evaluate only at the end: the steps are what is timed
        cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"eval_every": cfg.train.steps})})
        self.cfg = cfg
        self.name = name
        # the allocator peak: the first two steps and the last (the gates have learned by
        # then), when a step is left between them to time
        last = (cfg.train.steps - 1,) if cfg.train.steps >= 4 else ()
        self.run = LocalRun.start(cfg, data, callbacks, sample_at=last)
        model = self.run.model
        self.timer = LayerStackTimer(model) if not cfg.compile.enabled else None  # hooks break compiled graphs
        self.flops: list[float] = []
        self.active: list[float] = []
        self.cpu_s: list[float] = []
        """This process's CPU seconds in each optimizer step (beside ``run.step_s``, wall)."""

    def step(self) -> bool:
        """One training step; the layer timer skips the first (warm-up) and any step under
        the allocator profiler (slower), as the whole-step figures do."""
        if self.timer is not None:
            self.timer.enabled = len(self.run.step_s) > 0 and not self.run.peak.profiling
        c0 = time.process_time()
        more = self.run.step()
        cpu = time.process_time() - c0
        if self.timer is not None:
            self.timer.enabled = False
        if more:
            self.cpu_s.append(cpu)
            t = self.run.techniques
            planner = t.recompute
            self.flops.append(float(planner.plan_recompute_flops() or 0))
            self.active.append(float(self.cfg.model.n_layer if t.slots.active is None else len(t.slots.active)))
        return more

    def rounds(self) -> R.Series:
        """The timed steps (:meth:`LocalRun.timed_steps`) in :data:`ROUNDS` rounds of
        consecutive steps: every combination stepped in turn, so round ``i`` of each ran
        side by side with round ``i`` of the others."""
        timed = self.run.timed_steps()
        wall, cpu = [self.run.step_s[i] for i in timed], [self.cpu_s[i] for i in timed]
        return R.Series.from_steps(self.name, wall, cpu, rounds=ROUNDS)

    def throughput(self) -> dict:
        """Steady tokens/s of the whole step and of the layer stack, seconds per step of each,
        and the per-round seconds per step by wall and CPU time."""
        steady = len(self.run.timed_steps())
        tokens = self.run.state.tokens_per_step * steady
        steady_s = self.run.steady_s()
        layer_s = self.timer.total_s if self.timer is not None and steady > 0 else float("nan")
        nan = float("nan")
        series = self.rounds()
        return {
            "tokens_per_s": tokens / steady_s if steady_s > 0 else nan,
            "layer_tokens_per_s": tokens / layer_s if layer_s > 0 else nan,
            "layer_s_per_step": layer_s / steady if steady > 0 else nan,
            "outside_layers_s_per_step": (steady_s - layer_s) / steady if steady > 0 else nan,
            "timed_steps": steady,
            "round_wall_s": series.wall,
            "round_cpu_s": series.cpu,
        }

    def close(self) -> None:
        if self.timer is not None:
            self.timer.remove()


ROUNDS = 10
"""Rounds the timed steps of ``bench combos`` are grouped into (fewer with fewer steps)."""


def speed_vs_baseline(rec: dict, base: dict) -> dict:
    """Each combination's speed over the baseline's, paired round by round, by CPU and wall
    time, and the verdict by CPU time (faster, slower, or none where the spread is wider
    than the margin, or there are too few rounds)."""
    ours = R.Series(rec["name"], rec["round_wall_s"], rec["round_cpu_s"])
    ref = R.Series(base["name"], base["round_wall_s"], base["round_cpu_s"])
    if len(ours.wall) != len(ref.wall) or len(ours.wall) < R.MIN_ROUNDS:
        return {
            "speed_vs_baseline": None,
            "verdict": None,
            "verdict_text": f"no verdict: {len(ours.wall)} rounds, a ratio needs {R.MIN_ROUNDS} (more train.steps)",
        }
    ratio = {c: R.speed_ratio(ours, ref, c) for c in R.CLOCKS}
    v = R.verdict(ratio["cpu"], 1.0, "faster", "slower")
    return {
        "speed_vs_baseline": {c: r.as_dict() for c, r in ratio.items()},
        "verdict": v.holds,
        "verdict_text": v.text if rec is not base else "",
    }


def run_one(cfg: RaydratConfig, data: LocalData) -> dict:
    """Train ``cfg`` for ``cfg.train.steps`` on ``data`` alone; measure everything."""
    return run_interleaved([cfg], data)[0]


def run_interleaved(
    cfgs: list[RaydratConfig], data: LocalData, names: list[str] | None = None, callbacks: Sequence[Callback] = ()
) -> list[dict]:
    """Train every config for its ``train.steps`` on ``data``, one step of each in turn;
    then measure each (not timed). ``callbacks``: given to every run's ``fit``."""
    sessions = [Session(c, data, n, callbacks) for c, n in zip(cfgs, names or [c.name for c in cfgs])]
    interleave(sessions)  # duck-typed: a Session steps like a LocalRun
    records = []
    for s in sessions:
        speed = s.throughput()  # timed before the evaluation and memory measurements below
        s.close()
        records.append({**speed, **measure_session(s)})
    return records


def measure_session(s: Session) -> dict:
    """After training: the run's figures, its allocator peak against the estimate, and
    memory measured on real tensors (activations averaged over a few plans)."""
    cfg, tc = s.cfg, s.cfg.train
    device = s.run.runtime.device()
    model, t = s.run.model, s.run.techniques
    report = s.run.state.last_report
    val_loss = report["val_loss"]
    last_plan_bytes = t.recompute.plan_bytes()
    last_plan_flops = t.recompute.plan_recompute_flops()
    worst = s.run.peak.worst_step()
    est = s.run.runtime.estimate
    step_est = estimate_memory(cfg, s.run.runtime.device_type, s.run.runtime.precision, worst.plan) if worst else est
    tokens = s.run.data.train[0].to(device)
    idx, targets = tokens[:, :-1], tokens[:, 1:]
    acts = []
    for k in range(4):
        t.recompute.plan(tc.steps + k, None, t.slots.plan(tc.steps + k))
        acts.append(saved_activation_bytes(model, idx, targets, t.precision.autocast(), **t.slots.forward_kwargs()))
        model.zero_grad(set_to_none=True)
    with t.precision.autocast():
        _, loss = model(idx, targets)
    loss.backward()
    grads = grad_bytes(model)
    model.zero_grad(set_to_none=True)
    plan = worst.plan if worst else None
    rec = {
        "wall_s": sum(s.run.step_s),
        "param_bytes": param_bytes(model),
        "grad_bytes": grads,
        "optimizer_bytes": optimizer_state_bytes(s.run.state.optimizer),
        "activation_bytes": int(sum(acts) / len(acts)),
        "peak_bytes": worst.peak if worst else None,
        "peak_step": worst.step if worst else None,
        "peak_step_layers": None if plan is None or plan.active is None else len(plan.active),
        "peak_step_stored": None if plan is None or plan.stored is None else sum(plan.stored),
        "estimated_bytes": step_est.total_bytes,
        "estimated_worst_case_bytes": est.total_bytes,
        "estimated_activation_bytes": est.saved_bytes,
        "planning_peak_bytes": max(s.run.peak.plan_peaks.values(), default=None),
        "recompute_flops_per_step": sum(s.flops) / len(s.flops),
        "mean_active_layers": sum(s.active) / len(s.active),
        "loss": report["train_loss"],
        "val_loss": val_loss,
        "steps": tc.steps,
    }
    rec["estimate_error_peak"] = rec["estimated_bytes"] / rec["peak_bytes"] - 1 if rec["peak_bytes"] else float("nan")
    rec["activation_bytes_max"] = max(acts)
    rec.update(budget_record(cfg, t.recompute, last_plan_bytes, last_plan_flops))
    return rec


def budget_record(cfg: RaydratConfig, planner, plan_bytes: int | None, plan_flops: int | None) -> dict:
    """For a run with an activation budget (gated at a budget, or the budget optimum): the
    budget, the last plan's bytes and recompute FLOPs (from the measured costs) and the
    exact optimum at the same budget (the budget planner's knapsack over the same costs)."""
    budget_mb = cfg.recompute.budget_mb
    if budget_mb is None or planner.granularity != "branch" or planner.costs is None or plan_bytes is None:
        return {}
    best = planner.level.budget_plan(budget_mb)
    return {
        "budget_bytes": int(budget_mb * 2**20),
        "plan_activation_bytes": plan_bytes,
        "plan_recompute_flops": plan_flops,
        "optimum_activation_bytes": planner.level.plan_bytes(best, None),
        "optimum_recompute_flops": planner.level.plan_recompute_flops(best, None),
    }


def _speed_text(r: dict) -> str:
    ratio = r.get("speed_vs_baseline")
    if not ratio:
        return "-"
    cpu = ratio["cpu"]
    return f"{cpu['median']:.3f} ({cpu['min']:.3f}-{cpu['max']:.3f})"


def layer_flops(cfg: RaydratConfig) -> tuple[float, float]:
    """(FLOPs of one training step outside the layers, FLOPs per active layer)."""
    model = build_model(cfg.model, seed=cfg.train.seed)
    tokens = torch.randint(0, cfg.model.vocab_size, (cfg.train.batch_size, cfg.model.seq_len + 1))

    def step_flops(slots):
        counter = flop_counter()
        with counter:
            _, loss = model(tokens[:, :-1], tokens[:, 1:], active_slots=slots)
            loss.backward()
        return counter.get_total_flops()

    outside = step_flops([])
    return outside, (step_flops(None) - outside) / cfg.model.n_layer


def layerdrop_comparison(cfg: RaydratConfig, data: LocalData, ld: dict, base: dict) -> list[dict]:
    """Val loss of layerdrop vs the baseline at equal FLOPs and equal wall-clock, each
    baseline's LR schedule decaying fully within its own (shorter) budget."""
    steps = cfg.train.steps
    outside, per_layer = layer_flops(cfg)
    ld_flops = steps * (outside + per_layer * ld["mean_active_layers"])
    full_step = outside + per_layer * cfg.model.n_layer
    equal_flops = max(2, round(ld_flops / full_step))
    equal_wall = max(2, min(steps, round(ld["wall_s"] / (base["wall_s"] / steps))))
    rows = [
        {"name": "layerdrop0.5", "steps": steps, "val_loss": ld["val_loss"], "flops": ld_flops, "wall_s": ld["wall_s"]},
        {
            "name": "baseline, same steps",
            "steps": steps,
            "val_loss": base["val_loss"],
            "flops": steps * full_step,
            "wall_s": base["wall_s"],
        },
    ]
    for label, n in (("baseline, equal FLOPs", equal_flops), ("baseline, equal wall-clock", equal_wall)):
        c = cfg.model_copy(deep=True)
        c.train.steps = n
        c.optim.warmup_steps = min(cfg.optim.warmup_steps, max(0, n - 1)) * n // steps
        r = run_one(c, data)
        rows.append(
            {"name": label, "steps": n, "val_loss": r["val_loss"], "flops": n * full_step, "wall_s": r["wall_s"]}
        )
    return rows


RATIO_KEYS = (
    "tokens_per_s",
    "layer_tokens_per_s",
    "param_bytes",
    "grad_bytes",
    "optimizer_bytes",
    "activation_bytes",
    "estimated_bytes",
    "loss",
    "val_loss",
)


def _log_children(parent: Run, records: list[dict], configs: list[RaydratConfig]) -> None:
    """One child MLflow run per combination, its figures as metrics at its last step (byte
    figures in MiB, the unit in the name)."""
    for rec, c in zip(records, configs):
        child = Run.start(parent.uri, "raydrat-bench", rec["name"], params=c.flat(), parent=parent)
        child.log_metrics(
            {
                (f"{k.removesuffix('_bytes')}_mib" if k.endswith("_bytes") else k): (
                    v / M.MIB if k.endswith("_bytes") else v
                )
                for k, v in rec.items()
                if isinstance(v, (int, float)) and v is not None
            },
            c.train.steps,
        )
        child.end()


def _add_ratios(records: list[dict]) -> None:
    """Each record's ratios to the baseline (the first record) and its speed verdict."""
    base = records[0]
    for rec in records:
        for key in RATIO_KEYS:
            rec[f"{key}_ratio"] = rec[key] / base[key] if base[key] else float("nan")
        rec.update(speed_vs_baseline(rec, base))


def _print_records(cfg: RaydratConfig, records: list[dict], load: R.Load) -> None:
    """The main table: speed, memory by component against the estimate, loss."""
    mib = 2**20
    print_table(
        f"combos: {cfg.name}, {cfg.train.steps} steps, batch {cfg.train.batch_size}x{cfg.model.seq_len}, ratios to baseline",
        [
            "combination",
            "tok/s",
            "x (CPU time, per round)",
            "verdict",
            "layer tok/s",
            "x",
            "params MiB",
            "grads MiB",
            "optim MiB",
            "x",
            "act MiB",
            "x",
            "peak MiB (worst step)",
            "est MiB (that step)",
            "est err",
            "worst-case est MiB",
            "recompute GFLOP/step",
            "loss",
            "val",
        ],
        [
            [
                r["name"],
                f"{r['tokens_per_s']:,.0f}",
                _speed_text(r),
                r["verdict_text"],
                f"{r['layer_tokens_per_s']:,.0f}",
                f"{r['layer_tokens_per_s_ratio']:.2f}",
                f"{r['param_bytes'] / mib:.2f}",
                f"{r['grad_bytes'] / mib:.2f}",
                f"{r['optimizer_bytes'] / mib:.2f}",
                f"{r['optimizer_bytes_ratio']:.2f}",
                f"{r['activation_bytes'] / mib:.2f}",
                f"{r['activation_bytes_ratio']:.2f}",
                "-" if r["peak_bytes"] is None else f"{r['peak_bytes'] / mib:.1f}",
                f"{r['estimated_bytes'] / mib:.1f}",
                f"{r['estimate_error_peak']:+.1%}",
                f"{r['estimated_worst_case_bytes'] / mib:.1f}",
                f"{r['recompute_flops_per_step'] / 1e9:.3f}",
                f"{r['loss']:.4f}",
                f"{r['val_loss']:.4f}",
            ]
            for r in records
        ],
        footer=f"all combinations trained in turn, one step each (order reversed every round); tokens/s over the "
        f"{records[0]['timed_steps']} timed steps (first step and allocator-profiled steps left out); x: speed over "
        f"the baseline's, median (min-max) over {len(records[0]['round_cpu_s'])} rounds of consecutive timed steps "
        f"paired with the baseline's, by this process's CPU time (wall time in the JSON); "
        f"{R.VERDICT_RULE.format(goal=1)}; peak: PyTorch's allocator in the worst sampled step; {load.text()}",
    )


def _print_budgeted(records: list[dict]) -> None:
    """Runs at a memory budget: the plan against the exact optimum."""
    mib = 2**20
    budgeted = [r for r in records if "budget_bytes" in r]
    if budgeted:
        print_table(
            "at a memory budget: the plan's saved activations and recompute FLOPs vs the exact optimum (solve_budget) at the same budget",
            [
                "run",
                "budget MiB",
                "act MiB measured (max)",
                "plan MiB",
                "optimum MiB",
                "recompute GFLOP/step (mean)",
                "plan GFLOP",
                "optimum GFLOP",
                "plan / optimum",
            ],
            [
                [
                    r["name"],
                    f"{r['budget_bytes'] / mib:.2f}",
                    f"{r['activation_bytes_max'] / mib:.2f}",
                    f"{r['plan_activation_bytes'] / mib:.2f}",
                    f"{r['optimum_activation_bytes'] / mib:.2f}",
                    f"{r['recompute_flops_per_step'] / 1e9:.3f}",
                    f"{r['plan_recompute_flops'] / 1e9:.3f}",
                    f"{r['optimum_recompute_flops'] / 1e9:.3f}",
                    f"{r['plan_recompute_flops'] / r['optimum_recompute_flops']:.3f}"
                    if r["optimum_recompute_flops"]
                    else "-",
                ]
                for r in budgeted
            ],
        )


def _print_layer_time(records: list[dict]) -> None:
    """Time in the layer stack against the rest of the step."""
    print_table(
        "time in the transformer layer stack (forward + backward, recomputation included) vs the rest of the step, steady steps",
        ["combination", "layer s/step", "other s/step", "layer share", "layer tok/s", "x base"],
        [
            [
                r["name"],
                f"{r['layer_s_per_step']:.3f}",
                f"{r['outside_layers_s_per_step']:.3f}",
                f"{r['layer_s_per_step'] / (r['layer_s_per_step'] + r['outside_layers_s_per_step']):.0%}",
                f"{r['layer_tokens_per_s']:,.0f}",
                f"{r['layer_tokens_per_s_ratio']:.2f}",
            ]
            for r in records
        ],
    )


def run_combos(cfg: RaydratConfig, json_path: str | None = None, only: list[str] | None = None) -> list[dict]:
    cfg = cfg.model_copy(deep=True)
    base_dict = cfg.to_dict()
    combos = [c for c in combinations(cfg) if not only or c[0] in only or c[0] == "baseline"]
    data = LocalData.load(cfg)
    parent = Run.off()
    if cfg.tracking.enabled:
        parent = Run.start(
            tracking.resolve_tracking_uri(cfg.tracking),
            "raydrat-bench",
            f"combos-{time.strftime('%Y%m%d-%H%M%S')}",
            params=cfg.flat(),
        )
    configs = [config_from_dict(base_dict, overrides, origin=f"combination {name}") for name, overrides in combos]
    print(
        f"[combos] {len(configs)} combinations, {cfg.train.steps} steps each, trained in turn step by step: "
        + ", ".join(name for name, _ in combos),
        flush=True,
    )
    comparison = []
    load = R.Load()
    try:
        records = [
            {"name": name, "overrides": overrides, **rec}
            for (name, overrides), rec in zip(combos, run_interleaved(configs, data, [n for n, _ in combos]))
        ]
        if parent:
            _log_children(parent, records, configs)
        _add_ratios(records)
        by_name = {r["name"]: r for r in records}
        if "layerdrop0.5" in by_name:
            comparison = layerdrop_comparison(cfg, data, by_name["layerdrop0.5"], records[0])
    finally:
        parent.end()
    load.finish()
    _print_records(cfg, records, load)
    _print_budgeted(records)
    _print_layer_time(records)
    if comparison:
        print_table(
            "layer dropping vs a baseline whose LR fully decays in the same budget",
            ["run", "steps", "GFLOPs", "wall s", "val loss"],
            [
                [c["name"], c["steps"], f"{c['flops'] / 1e9:.1f}", f"{c['wall_s']:.1f}", f"{c['val_loss']:.4f}"]
                for c in comparison
            ],
        )
    if json_path:
        write_json(
            json_path, {"combinations": records, "layerdrop_comparison": comparison, "load_average": load.as_list()}
        )
    return records
