"""``raydrat bench memory`` and ``raydrat estimate --measure``: the memory estimate against
PyTorch's allocator.

A configuration trains a few steps on this machine's device through the one training loop
(:class:`~raydrat.bench.local.LocalRun`, random tokens: the allocator's figures do not
depend on them), every step measured by :class:`~raydrat.core.memory.peak.PeakMemory`
(CPU: the profiler's allocator events; CUDA: the caching allocator's statistics). The
measured peak is the highest step's; the estimate it is compared with is
:func:`~raydrat.core.memory.estimate.estimate_memory` for that step's plan (its active
layers and stored branches: layer dropping draws them, gates learn them), beside the
config's worst case (what the runtime resolution and a sweep's admission use).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

import torch

from raydrat.bench.local import LocalData, LocalRun
from raydrat.bench.report import load_average, print_table
from raydrat.config import RaydratConfig, load_config
from raydrat.core.memory.activations import activation_plan_bounds
from raydrat.core.memory.estimate import MemoryEstimate, estimate_memory
from raydrat.core.memory.peak import BACKWARD, FORWARD, OPTIMIZER, ZERO_GRAD, PeakMemory, StepMemory
from raydrat.core.runtime import Runtime, UnsupportedCombination, resolve
from raydrat.tables import write_json

STEPS = 4
"""Steps per measurement: the first creates the optimizer states, the rest are steady."""
MiB = 2**20


class CannotMeasure(UnsupportedCombination):
    """This machine cannot run the configuration to measure it; the message says why."""


def available_bytes(runtime: Runtime) -> int | None:
    """Free memory of the device the run resolved to (CUDA: the driver's; CPU:
    ``MemAvailable``), ``None`` when unknown."""
    if runtime.use_gpu:
        free, _ = torch.cuda.mem_get_info()
        return int(free)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def check_measurable(cfg: RaydratConfig, runtime: Runtime, device: str | None = None) -> None:
    """Refuse, naming why, a measurement this machine cannot run: the estimate asked for a
    device this machine lacks, the 8-bit optimizers without bitsandbytes, or a predicted
    peak above the device's free memory."""
    if device == "cuda" and not torch.cuda.is_available():
        raise CannotMeasure(
            "--measure runs the config on this machine, which has no CUDA GPU (torch sees none): "
            "drop --device cuda to measure on CPU, or run it on a machine with a GPU"
        )
    if cfg.optim.name in ("adamw8bit", "paged_adamw8bit"):
        try:
            import bitsandbytes  # noqa: F401  optional heavy dependency: only the 8-bit optimizers need it
        except ImportError:
            raise CannotMeasure(
                f"--measure: optim.name={cfg.optim.name} needs bitsandbytes, which is not installed here: "
                "pip install bitsandbytes, or measure with optim.name=adamw"
            ) from None
    free = available_bytes(runtime)
    need = runtime.estimate.total_bytes
    if free is not None and need > 0.9 * free:
        raise CannotMeasure(
            f"--measure would run {cfg.name} on this machine's {runtime.device_type}, whose free memory is "
            f"{free / 2**30:.2f} GiB, but its predicted peak is {need / 2**30:.2f} GiB: lower train.batch_size "
            "or model.seq_len, or measure on a machine with more memory"
        )


@dataclass
class Measurement:
    """One configuration measured: the allocator's figures and the estimates beside them."""

    name: str
    cfg: RaydratConfig
    runtime: Runtime
    peak: PeakMemory
    worst: StepMemory
    step_estimate: MemoryEstimate
    """The estimate for the measured worst step's plan."""
    seconds: float
    measured: dict[str, int | None] = field(default_factory=dict)
    estimated: dict[str, int] = field(default_factory=dict)

    @property
    def worst_case(self) -> MemoryEstimate:
        """The config's estimate (its worst case), as the runtime resolution makes it."""
        return self.runtime.estimate

    @property
    def error(self) -> float:
        return self.step_estimate.total_bytes / self.worst.peak - 1

    def record(self) -> dict:
        plan = self.worst.plan
        return {
            "name": self.name,
            "estimated_peak_bytes": self.step_estimate.total_bytes,
            "measured_peak_bytes": self.worst.peak,
            "error": self.error,
            "estimated_worst_case_bytes": self.worst_case.total_bytes,
            "worst_case_covers_measured": self.worst_case.total_bytes >= self.worst.peak,
            "peak_phase": self.step_estimate.detail["peak_phase"],
            "device": self.runtime.device_type,
            "precision": self.runtime.precision,
            "step": self.worst.step,
            "active_layers": None if plan is None or plan.active is None else len(plan.active),
            "stored_branches": None if plan is None or plan.stored is None else sum(plan.stored),
            "branches": None if plan is None or plan.stored is None else len(plan.stored),
            "planning_peak_bytes": (
                max(self.peak.plan_peaks.values(), default=None) if self.cfg.recompute.mode != "none" else None
            ),
            "estimated_planning_peak_bytes": self.worst_case.detail.get("planning_peak_bytes"),
            "measured_components": self.measured,
            "estimated_components": self.estimated,
            "seconds": self.seconds,
        }


def _measured_components(peak: PeakMemory, worst: StepMemory) -> dict[str, int | None]:
    """What the allocator says the step holds: the build's bytes (parameters), the first
    step's lasting growth (optimizer states), the bytes ``zero_grad`` frees (gradients),
    the first micro-batch's forward (saved activations), and each phase's peak."""
    steps = sorted(peak.steps)
    optimizer = peak.steps[steps[1]].persistent - peak.steps[steps[0]].persistent if len(steps) > 1 else None
    ph = worst.phases

    def phase_peak(name: str) -> int | None:
        spans = ph.get(name) or []
        return worst.persistent + max(p for _, _, p in spans) if spans else None

    return {
        "params": peak.region_bytes.get("build"),
        "optimizer": optimizer,
        "grads": ph[ZERO_GRAD][0][0] - ph[ZERO_GRAD][0][1] if ph.get(ZERO_GRAD) else None,
        "saved_activations": ph[FORWARD][0][1] - ph[FORWARD][0][0] if ph.get(FORWARD) else None,
        "forward": phase_peak(FORWARD),
        "backward": phase_peak(BACKWARD),
        "optimizer_step": phase_peak(OPTIMIZER),
        "peak": worst.peak,
    }


def _estimated_components(est: MemoryEstimate) -> dict[str, int]:
    ph = est.detail["phases"]
    return {
        "params": est.components["params"],
        "optimizer": est.components["optimizer"],
        "grads": est.detail["grads_bytes"],
        "saved_activations": est.saved_bytes,
        "forward": ph["forward"],
        "backward": max(ph["loss_backward"], ph.get("layers_backward", 0)),
        "optimizer_step": ph["optimizer"],
        "peak": est.total_bytes,
    }


def measurable(cfg: RaydratConfig, device: str | None = None) -> tuple[RaydratConfig, Runtime]:
    """``cfg`` on ``device`` (``cpu`` | ``cuda``; ``None``: the config's choice) and its
    runtime on this machine; refused (:class:`CannotMeasure`, one line) when it cannot run here."""
    if cfg.sync.mode == "fsdp" and cfg.scaling.num_workers > 1:
        raise CannotMeasure(
            f"--measure with sync.mode=fsdp (scaling.num_workers={cfg.scaling.num_workers}): the "
            "measurement trains one process, which holds the whole model, not one worker's shard: "
            "drop --measure, or measure with sync.mode=ddp"
        )
    if device == "cuda" and not torch.cuda.is_available():
        check_measurable(cfg, None, device)  # type: ignore[arg-type]  (refuses before resolving)
    if device is not None:
        cfg = cfg.model_copy(
            update={
                "train": cfg.train.model_copy(update={"device": device}),
                "scaling": cfg.scaling.model_copy(update={"use_gpu": device == "cuda"}),
            }
        )
    runtime = resolve(cfg)
    check_measurable(cfg, runtime, device)
    return cfg, runtime


def measure(cfg: RaydratConfig, name: str | None = None, steps: int = STEPS, device: str | None = None) -> Measurement:
    """Train ``cfg`` for ``steps`` steps on this machine's device (or ``device``), every step measured."""
    cfg, runtime = measurable(cfg, device)
    tc = cfg.train.model_copy(
        update={
            "steps": steps,
            "eval_every": steps,
            "log_every": steps,
            "checkpoint_every": 0,
            "eval_batches": 1,
            "auto_microbatch": False,
        }
    )
    optim = cfg.optim.model_copy(update={"warmup_steps": min(cfg.optim.warmup_steps, steps - 1)})
    c = cfg.model_copy(
        update={"train": tc, "optim": optim, "tracking": cfg.tracking.model_copy(update={"enabled": False})}
    )
    t0 = time.perf_counter()
    run = LocalRun.start(c, LocalData.random(c, steps), runtime=runtime, sample_steps=steps)
    run.run()
    worst = run.peak.worst_step()
    step_est = estimate_memory(c, runtime.device_type, runtime.precision, worst.plan)
    m = Measurement(name or cfg.name, c, runtime, run.peak, worst, step_est, time.perf_counter() - t0)
    m.measured = _measured_components(run.peak, worst)
    m.estimated = _estimated_components(step_est)
    return m


def print_measurement(m: Measurement) -> None:
    """``raydrat estimate --measure``'s table: estimated against measured, per component and phase."""
    rows = []
    labels = {
        "params": "parameters",
        "optimizer": "optimizer states",
        "grads": "gradients (all)",
        "saved_activations": "saved activations (after forward)",
        "forward": "peak of the forward",
        "backward": "peak of the backward",
        "optimizer_step": "peak of the optimizer step",
        "peak": "peak of the step",
    }
    for key, label in labels.items():
        est, meas = m.estimated.get(key), m.measured.get(key)
        err = f"{est / meas - 1:+.1%}" if meas else "-"
        rows.append([label, f"{est / MiB:.2f}", "-" if meas is None else f"{meas / MiB:.2f}", err])
    plan = m.worst.plan
    plan_text = (
        ""
        if plan is None or plan.active is None
        else (
            f", {len(plan.active)}/{m.cfg.model.n_layer} layers, {sum(plan.stored or ())}/{len(plan.stored or ())} branches stored"
        )
    )
    source = "CUDA caching allocator statistics" if m.runtime.use_gpu else "profiler allocator events (CPU)"
    print_table(
        f"measured on this machine ({m.runtime.device_type}, {m.runtime.precision}): {STEPS} steps, worst step "
        f"{m.worst.step}{plan_text}; source: {source}",
        ["component", "estimated MiB", "measured MiB", "error"],
        rows,
        footer=f"the config's worst case (the estimate above): {m.worst_case.total_bytes / MiB:.2f} MiB; "
        f"estimate for the measured step's plan: {m.step_estimate.total_bytes / MiB:.2f} MiB" + _planning_note(m),
    )


def _planning_note(m: Measurement) -> str:
    plan_peak = max(m.peak.plan_peaks.values(), default=None)
    if plan_peak is None or plan_peak <= m.worst.peak:
        return ""
    return (
        f"\nnote: the recompute planner's cost measurement (step 0, before training it) peaked at "
        f"{plan_peak / MiB:.2f} MiB, above the training step's peak"
    )


def configurations(overrides: list[str] | None = None) -> list[tuple[str, str, list[str]]]:
    """The shipped list: (name, recipe, overrides). Budgets sit halfway between full
    recomputation and none for the configuration's own bounds."""
    six = [
        "model.n_layer=6",
        "model.d_model=384",
        "model.n_head=6",
        "model.n_kv_head=2",
        "model.seq_len=512",
        "train.batch_size=4",
    ]
    demo = load_config("demo", overrides or [])
    rt = resolve(demo)
    lo, hi = activation_plan_bounds(demo, rt.device_type, rt.precision)
    budget = f"recompute.budget_mb={(lo + 0.5 * (hi - lo)) / MiB:.4f}"
    return [
        ("debug", "debug", []),
        ("demo", "demo", []),
        ("6L d384 s512", "demo", six),
        ("6L d384 s512 full", "demo", [*six, "recompute.mode=full"]),
        ("6L d384 s512 full, vocab 512", "demo", [*six, "recompute.mode=full", "model.vocab_size=512"]),
        ("demo full", "demo", ["recompute.mode=full"]),
        ("demo budget 50%", "demo", ["recompute.mode=budget", budget]),
        ("demo gated", "demo", ["recompute.mode=gated"]),
        ("demo gated at budget 50%", "demo", ["recompute.mode=gated", budget]),
        ("demo adamw8bit", "demo", ["optim.name=adamw8bit"]),
        ("demo grad_accum 4", "demo", ["train.grad_accum=4"]),
        ("demo layerdrop 0.5", "demo", ["slots.mode=layerdrop", "slots.keep=0.5"]),
        ("demo bf16", "demo", ["precision.mode=bf16"]),
    ]


def run_memory_bench(
    json_path: str | None = None, overrides: list[str] | None = None, only: list[str] | None = None
) -> list[dict]:
    """Measure every configuration (``overrides`` apply to all; ``only``: these names)."""
    records, skipped = [], []
    threads = torch.get_num_threads()
    for name, recipe, extra in configurations(overrides):
        if only and name not in only:
            continue
        try:
            cfg = load_config(recipe, [*extra, *(overrides or [])])
            print(f"[memory] {name} ({', '.join(extra) or recipe})", flush=True)
            m = measure(cfg, name)
        except UnsupportedCombination as exc:  # e.g. bf16 on a GPU without it: the row says why
            skipped.append({"name": name, "skipped": str(exc)})
            continue
        finally:
            torch.set_num_threads(threads)
        records.append(m.record())
    load = load_average()
    rows = [
        [
            r["name"],
            r["device"],
            r["precision"],
            f"{r['estimated_peak_bytes'] / MiB:.2f}",
            f"{r['measured_peak_bytes'] / MiB:.2f}",
            f"{r['error']:+.1%}",
            f"{r['estimated_worst_case_bytes'] / MiB:.2f}",
            f"{r['active_layers']}, {r['stored_branches']}/{r['branches']}",
            r["peak_phase"],
            "-" if r["planning_peak_bytes"] is None else f"{r['planning_peak_bytes'] / MiB:.2f}",
        ]
        for r in records
    ]
    within = sum(abs(r["error"]) <= 0.10 for r in records)
    print_table(
        f"memory: estimated vs measured peak per training step ({STEPS} steps each; CPU: profiler allocator events, "
        f"CUDA: max_memory_allocated); load average {load}",
        [
            "configuration",
            "device",
            "precision",
            "estimated MiB",
            "measured MiB",
            "error",
            "worst case MiB",
            "layers, stored (worst step)",
            "peak phase (estimate)",
            "planner measurement MiB",
        ],
        rows,
        footer=f"{within}/{len(records)} rows within 10% (goal: all)"
        + "".join(f"\nskipped {s['name']}: {s['skipped']}" for s in skipped),
    )
    if json_path:
        write_json(json_path, {"rows": records, "skipped": skipped, "loadavg": load})
    return records
