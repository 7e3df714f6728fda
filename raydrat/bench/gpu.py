"""``raydrat bench gpu``: the CUDA figures, in one command that fits a short session on a GPU machine.

Every case runs raydrat's Ray-free core (the model, the techniques, the one ``fit`` loop
through :class:`~raydrat.bench.local.LocalRun`, the memory estimator), because the GPU
machine has no Ray or MLflow. The cases, in order (the most important first; a case that
would start after ``--deadline-s`` is recorded as skipped, and the JSON is rewritten after
each case, so a run cut short still leaves its figures):

``sdpa``
    Which SDPA kernels run raydrat's attention at the gpt2-small shape: each
    ``model.attention_backend`` tried on one training micro-batch (engaged or refused, ms),
    and the kernels the profiler sees under ``auto``.
``throughput``
    gpt2-small (124M, seq 1024), bf16, ``torch.compile``, flash SDPA: raydrat's loop and a
    nanoGPT-architecture reference (:class:`~raydrat.bench.peers.NanoGPT`, the same
    optimizer, clipping and autocast, in a plain loop), interleaved step by step. Tokens/s
    over the median step, and MFU = FLOPs per token x tokens/s / the stated peak, FLOPs per
    token = ``6 N + 12 L d T`` (``N`` the parameters that multiply, so a tied embedding
    counts once as the head; attention counted without its causal half, as nanoGPT and
    PaLM count it).
``memory``
    The estimator against ``torch.cuda.max_memory_allocated`` over whole steps
    (:func:`raydrat.bench.memory.measure`), for gpt2-small under recompute none / full /
    budget / gated, adamw / adamw8bit and three micro-batch sizes. Goal: <= 10% on each.
``precision``
    fp32, bf16 and fp16 with a GradScaler train the same seeded model on the same learnable
    token stream; the validation loss of each against fp32's.
``optim8bit``
    adamw against adamw8bit (bitsandbytes): optimizer state bytes as the allocator sees them
    (the lasting growth over the first step), and the validation loss after the same steps.
``recompute``
    gpt2-small, eager: none, full (per block), budget (half the stored bytes; per branch and
    op-level) and gated, interleaved:
    saved-activation bytes and peak (the allocator's) and step time, each as a ratio to none.
``layerdrop``
    All layers against layer dropping (keep 0.5), and fp16 + layer dropping against fp32
    (the slot-pruning claim's combination), interleaved: tokens/s ratio and peak ratio.
``largest``
    The largest gpt2-shaped model whose estimated peak fits ``--budget-gb``, as raydrat's
    estimator chooses it, then run: its measured peak against the budget.

``--dry-run`` prints the plan (shapes, parameters, FLOPs per token, the estimator's peaks,
the largest model it would choose) on any machine. ``--tiny`` runs every case at toy shapes
on any device (it checks the benchmark itself; ``torch.compile`` is off there, as inductor's
CPU path says nothing of its CUDA one). ``make gpu-check`` runs it on the GPU machine.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from raydrat.atomic import write_text
from raydrat.bench.local import LocalData, LocalRun, interleave
from raydrat.bench.memory import _measured_components, measure
from raydrat.bench.peers import NANOGPT_DIFFERENCES, NanoGPT, nanogpt_settings
from raydrat.bench.report import load_average
from raydrat.config import RaydratConfig, load_config
from raydrat.config.base import ConfigError
from raydrat.core import metrics as M
from raydrat.core.fit import Callback
from raydrat.core.memory.estimate import estimate_memory
from raydrat.core.model.build import build_model
from raydrat.core.model.transformer import sdpa_backend
from raydrat.core.optim import build_optimizer
from raydrat.core.techniques.precision import DTYPES
from raydrat.tables import format_table

GiB = 2**30
PEAK_TFLOPS = 790.0
"""Dense bf16 peak used for MFU unless ``--peak-tflops`` says otherwise: the H200's measured
dense bf16 rate (about 790 TFLOP/s) as the GPU machine's notes state it."""
CASES = ("sdpa", "throughput", "memory", "precision", "optim8bit", "recompute", "layerdrop", "largest")
GPT2_LADDER = (  # (name, n_layer, d_model, n_head): GPT-2's sizes and the steps between them
    ("gpt2-small", 12, 768, 12),
    ("gpt2-medium", 24, 1024, 16),
    ("gpt2-large", 36, 1280, 20),
    ("gpt2-1b", 40, 1536, 24),
    ("gpt2-xl", 48, 1600, 25),
    ("gpt2-2.7b", 32, 2560, 32),
    ("gpt2-4b", 40, 3072, 32),
    ("gpt2-6.7b", 32, 4096, 32),
)
TINY = [
    "model.n_layer=2",
    "model.d_model=64",
    "model.n_head=4",
    "model.seq_len=64",
    "model.vocab_size=512",
    "train.batch_size=2",
]


class NoCuda(ConfigError):
    """``raydrat bench gpu`` on a machine without a CUDA GPU (and without ``--dry-run``)."""


@dataclass
class Bench:
    """The settings of one ``bench gpu`` run and its rows so far."""

    quick: bool = False
    tiny: bool = False
    device: str = "cuda"
    budget_gib: float = 20.0
    peak_tflops: float = PEAK_TFLOPS
    deadline_s: float = 420.0
    out: Path | None = None
    json_path: Path | None = None
    only: tuple[str, ...] = CASES
    started: float = field(default_factory=time.perf_counter)
    rows: list[dict] = field(default_factory=list)
    log_lines: list[str] = field(default_factory=list)

    # ---- configs -----------------------------------------------------------------------

    def cfg(self, *overrides: str) -> RaydratConfig:
        """gpt2-small (``--tiny``: a toy of it) on this bench's device, eval once at the end."""
        base = [
            "train.eval_batches=1",
            "train.grad_accum=1",
            "train.checkpoint_every=0",
            "optim.warmup_steps=2",
            f"train.device={self.device}",
            f"scaling.use_gpu={str(self.device == 'cuda').lower()}",
            "tracking.enabled=false",
            "precision.mode=bf16",
            "model.attention_backend=auto",
        ]
        return load_config("gpt2-small", base + (TINY if self.tiny else []) + list(overrides))

    def steps(self, full: int, quick: int) -> int:
        return 4 if self.tiny else (quick if self.quick else full)

    @property
    def compile_mode(self) -> str:
        return "off" if self.tiny else "default"

    # ---- output ------------------------------------------------------------------------

    def say(self, text: str) -> None:
        print(text, flush=True)
        self.log_lines.append(text)
        if self.out:
            (self.out / "bench-gpu.log").write_text("\n".join(self.log_lines) + "\n")

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def add(self, rows: list[dict]) -> None:
        self.rows += rows
        self.write()

    def write(self) -> None:
        doc = {"environment": environment(self), "rows": self.rows}
        for path in filter(None, [self.json_path, self.out and self.out / "bench-gpu.json"]):
            path.parent.mkdir(parents=True, exist_ok=True)
            write_text(path, json.dumps(doc, indent=2, default=str))  # a reader never sees half a file


def environment(b: Bench) -> dict:
    cuda = torch.cuda.is_available() and b.device == "cuda"
    return {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "device": torch.cuda.get_device_name(0) if cuda else f"CPU ({torch.get_num_threads()} threads)",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "peak_tflops": b.peak_tflops,
        "quick": b.quick,
        "tiny": b.tiny,
        "elapsed_s": round(b.elapsed(), 1),
        "load_average": load_average(),
        "command": " ".join(sys.argv),
    }


# ---- shapes and FLOPs ------------------------------------------------------------------


def multiplying_params(model: nn.Module, tied: bool) -> int:
    """Parameters that take part in a matmul per token: all of them (a tied embedding once,
    as the head), less a position table and an untied input embedding (lookups, not products)."""
    n = sum(p.numel() for p in model.parameters())
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Embedding) and (name.endswith("wpe") or not tied):
            n -= mod.weight.numel()
    return n


def flops_per_token(n_multiplying: int, n_layer: int, d_model: int, seq_len: int) -> int:
    """Training FLOPs per token: ``6 N`` for the matmuls (forward 2, backward 4) plus
    ``12 L d T`` for attention's two ``T x T`` products (nanoGPT's and PaLM's count)."""
    return 6 * n_multiplying + 12 * n_layer * d_model * seq_len


def describe(cfg: RaydratConfig) -> dict:
    """Shape, parameters and FLOPs per token of ``cfg``'s model (built on the meta device)."""
    mc = cfg.model
    with torch.device("meta"):
        model = build_model(mc, seed=0, device=torch.device("meta"))
    n_total = sum(p.numel() for p in model.parameters())
    n_mul = multiplying_params(model, mc.tie_embeddings)
    return {
        "n_layer": mc.n_layer,
        "d_model": mc.d_model,
        "n_head": mc.n_head,
        "n_kv_head": mc.kv_heads,
        "seq_len": mc.seq_len,
        "vocab_size": mc.vocab_size,
        "batch_size": cfg.train.batch_size,
        "params": n_total,
        "multiplying_params": n_mul,
        "flops_per_token": flops_per_token(n_mul, mc.n_layer, mc.d_model, mc.seq_len),
    }


def estimate(cfg: RaydratConfig) -> int:
    precision = cfg.precision.mode if cfg.precision.mode != "auto" else "bf16"
    return estimate_memory(cfg, "cuda", precision).total_bytes


# ---- data ------------------------------------------------------------------------------


def learnable_data(cfg: RaydratConfig, steps: int, seed: int = 0, noise: float = 0.1) -> LocalData:
    """Token blocks a model can learn (each token follows from the one before through a fixed
    random permutation, except a ``noise`` share drawn at random), so losses fall and
    precisions can be compared; one validation batch from the same process."""
    tc, mc = cfg.train, cfg.model
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(mc.vocab_size, generator=g)

    def block() -> torch.Tensor:
        x = torch.empty(tc.batch_size, mc.seq_len + 1, dtype=torch.long)
        x[:, 0] = torch.randint(0, mc.vocab_size, (tc.batch_size,), generator=g)
        for t in range(1, mc.seq_len + 1):
            rand = torch.randint(0, mc.vocab_size, (tc.batch_size,), generator=g)
            keep = torch.rand(tc.batch_size, generator=g) >= noise
            x[:, t] = torch.where(keep, perm[x[:, t - 1]], rand)
        return x

    return LocalData([block() for _ in range(steps * tc.grad_accum)], [block()])


class Losses(Callback):
    """The train loss of every step and the final validation loss."""

    def __init__(self):
        self.train: list[float] = []
        self.val: float | None = None

    def on_log(self, state, values: dict[str, float]) -> None:
        if M.TRAIN_LOSS in values:
            self.train.append(values[M.TRAIN_LOSS])
        if M.VAL_LOSS in values:
            self.val = values[M.VAL_LOSS]


def start(cfg: RaydratConfig, data: LocalData, steps: int, callbacks=()) -> LocalRun:
    c = cfg.model_copy(
        update={"train": cfg.train.model_copy(update={"steps": steps, "eval_every": steps, "log_every": 1})}
    )
    return LocalRun.start(c, data, callbacks, sample_steps=min(2, steps))


def median_tokens_per_s(run: LocalRun, skip: int) -> float:
    times = run.step_s[skip:] or run.step_s
    return run.state.tokens_per_step / statistics.median(times)


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


# ---- the cases -------------------------------------------------------------------------


def case_sdpa(b: Bench) -> list[dict]:
    cfg = b.cfg()
    rows = []
    x = torch.randint(0, cfg.model.vocab_size, (cfg.train.batch_size, cfg.model.seq_len + 1), device=b.device)

    def micro_batch(model: nn.Module) -> None:
        with torch.autocast(b.device, dtype=torch.bfloat16):
            _, loss = model(x[:, :-1], x[:, 1:])
        loss.backward()
        sync(b.device)

    for backend in ("flash", "efficient", "math", "auto"):
        mc = cfg.model.model_copy(update={"attention_backend": backend})
        row = {"case": "sdpa", "backend": backend}
        try:
            model = build_model(mc, seed=0, device=torch.device(b.device))
            micro_batch(model)  # warm-up
            t0 = time.perf_counter()
            micro_batch(model)
            row.update(engaged=True, ms=(time.perf_counter() - t0) * 1e3)
            if backend == "auto":
                row["kernels"] = attention_kernels(model, x[:, :-1], b.device)
        except RuntimeError as exc:  # a kernel this device or dtype refuses
            row.update(engaged=False, reason=str(exc).splitlines()[0][:200])
        rows.append(row)
    b.say(
        format_table(
            ["backend", "engaged", "ms (fwd+bwd)", "kernels / reason"],
            [
                [
                    r["backend"],
                    r["engaged"],
                    f"{r.get('ms', 0):.1f}",
                    ", ".join(r.get("kernels", [])) or r.get("reason", ""),
                ]
                for r in rows
            ],
        )
    )
    return rows


def attention_kernels(model: nn.Module, x: torch.Tensor, device: str) -> list[str]:
    """Names of the attention kernels the profiler sees in one forward."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with (
        torch.no_grad(),
        torch.autocast(device, dtype=torch.bfloat16),
        torch.profiler.profile(activities=activities) as prof,
    ):
        model(x)
        sync(device)
    keys = {e.key for e in prof.key_averages()}
    return sorted(
        k
        for k in keys
        if any(
            s in k.lower() for s in ("flash", "efficient_attention", "cudnn_attention", "fmha", "_scaled_dot_product")
        )
    )[:8]


class Reference:
    """The nanoGPT-architecture reference in a plain loop with raydrat's optimizer settings:
    autocast to the run's dtype, clip, step; ``torch.compile`` as the run has it."""

    def __init__(self, cfg: RaydratConfig, data: LocalData, compile_mode: str):
        torch.manual_seed(cfg.train.seed)
        self.device = torch.device(cfg.train.device)
        self.model = NanoGPT.like(nanogpt_settings(cfg.model).model_copy(update={"bias": cfg.model.bias})).to(
            self.device
        )
        if compile_mode != "off":
            self.model.compile(mode=compile_mode)
        self.optimizer = build_optimizer(self.model, cfg.optim)
        self.cfg, self.data, self.step_s, self.i = cfg, data, [], 0
        self.dtype = DTYPES[cfg.precision.mode]
        self.tokens_per_step = cfg.train.batch_size * cfg.model.seq_len

    def step(self) -> bool:
        if self.i >= len(self.data.train):
            return False
        batch = self.data.train[self.i].to(self.device)
        self.i += 1
        sync(self.device.type)
        t0 = time.perf_counter()
        with (
            torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32),
            sdpa_backend(self.cfg.model.attention_backend),
        ):
            _, loss = self.model(batch[:, :-1], batch[:, 1:])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.optim.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        sync(self.device.type)
        self.step_s.append(time.perf_counter() - t0)
        return True


def case_throughput(b: Bench) -> list[dict]:
    steps, warm = b.steps(40, 20), (1 if b.tiny else 5)
    cfg = b.cfg(
        f"compile.mode={b.compile_mode}",
        f"model.attention_backend={'auto' if b.tiny else 'flash'}",
        "train.batch_size=16" if not b.tiny else "train.batch_size=2",
    )
    data = LocalData.random(cfg, steps)
    shape = describe(cfg)
    b.say(
        f"[throughput] {shape['params'] / 1e6:.1f}M params, {steps} steps each, compile={b.compile_mode} "
        "(the first steps compile)"
    )
    ours = start(cfg, data, steps)
    ref = Reference(ours.cfg, data, b.compile_mode)
    interleave([ours, ref])  # anything with step() -> bool
    rows = []
    ref_flops = flops_per_token(
        multiplying_params(ref.model, True), cfg.model.n_layer, cfg.model.d_model, cfg.model.seq_len
    )
    for name, run, flops in (("raydrat", ours, shape["flops_per_token"]), ("nanogpt", ref, ref_flops)):
        times = run.step_s[warm:] or run.step_s
        tps = ref.tokens_per_step / statistics.median(times)  # the same batches for both
        rows.append(
            {
                "case": "throughput",
                "model": name,
                "tokens_per_s": tps,
                "flops_per_token": flops,
                "mfu": tps * flops / (b.peak_tflops * 1e12),
                "step_s_median": statistics.median(times),
                "first_step_s": run.step_s[0],
                "steps_timed": len(times),
                **{k: shape[k] for k in ("params", "n_layer", "d_model", "seq_len", "batch_size")},
            }
        )
    rows[0]["ratio_to_reference"] = rows[0]["tokens_per_s"] / rows[1]["tokens_per_s"]
    rows[0]["peak_bytes"] = ours.peak.peak()
    b.say(
        format_table(
            ["model", "tokens/s", "MFU", "median step s", "first step s"],
            [
                [
                    r["model"],
                    f"{r['tokens_per_s']:,.0f}",
                    f"{r['mfu']:.1%}",
                    f"{r['step_s_median']:.4f}",
                    f"{r['first_step_s']:.1f}",
                ]
                for r in rows
            ],
        )
        + f"\nraydrat / nanoGPT tokens/s: {rows[0]['ratio_to_reference']:.3f}x. Differences: {NANOGPT_DIFFERENCES}."
    )
    return rows


def memory_configs(b: Bench) -> list[tuple[str, list[str]]]:
    cfg = b.cfg("train.batch_size=8" if not b.tiny else "train.batch_size=2")
    saved = estimate_memory(cfg, "cuda", "bf16").saved_bytes
    half_mb = max(saved * 0.5 / 2**20, 0.01)
    mb = "train.batch_size=8" if not b.tiny else "train.batch_size=2"
    return [
        ("none", [mb]),
        ("full", [mb, "recompute.mode=full"]),
        ("budget-50%", [mb, "recompute.mode=budget", f"recompute.budget_mb={half_mb:.4f}"]),
        ("gated", [mb, "recompute.mode=gated"]),
        ("adamw8bit", [mb, "optim.name=adamw8bit"]),
        (
            "micro-batch-4" if not b.tiny else "micro-batch-1",
            ["train.batch_size=4" if not b.tiny else "train.batch_size=1"],
        ),
        (
            "micro-batch-16" if not b.tiny else "micro-batch-4",
            ["train.batch_size=16" if not b.tiny else "train.batch_size=4"],
        ),
        ("fp32", [mb, "precision.mode=fp32"]),
    ]


def case_memory(b: Bench) -> list[dict]:
    rows = []
    for name, overrides in memory_configs(b):
        try:
            m = measure(b.cfg(*overrides), name=name, steps=4, device=b.device)
        except ConfigError as exc:
            rows.append({"case": "memory", "name": name, "skipped": str(exc)})
            continue
        r = m.record()
        rows.append(
            {
                "case": "memory",
                **{
                    k: r[k]
                    for k in ("name", "estimated_peak_bytes", "measured_peak_bytes", "error", "peak_phase", "precision")
                },
                "within_10pct": abs(r["error"]) <= 0.10,
            }
        )
        del m
        if b.device == "cuda":
            torch.cuda.empty_cache()
    b.say(
        format_table(
            ["config", "estimated", "measured", "error", "peak phase"],
            [
                [
                    r["name"],
                    fmt(r.get("estimated_peak_bytes")),
                    fmt(r.get("measured_peak_bytes")),
                    f"{r['error']:+.1%}" if "error" in r else r.get("skipped", ""),
                    r.get("peak_phase", ""),
                ]
                for r in rows
            ],
        )
    )
    return rows


def fmt(n) -> str:
    return "" if n is None else f"{n / 2**20:,.1f} MiB"


SMALL = [
    "model.n_layer=6",
    "model.d_model=384",
    "model.n_head=6",
    "model.seq_len=256",
    "model.vocab_size=8192",
    "train.batch_size=16",
    "optim.lr=1e-3",
]


def trained(b: Bench, steps: int, *overrides: str) -> tuple[LocalRun, Losses]:
    cfg = b.cfg(*([] if b.tiny else SMALL), *overrides)
    losses = Losses()
    run = start(cfg, learnable_data(cfg, steps), steps, [losses])
    run.run()
    return run, losses


def case_precision(b: Bench) -> list[dict]:
    steps = b.steps(50, 30)
    rows, base = [], None
    for precision in ("fp32", "bf16", "fp16"):
        if precision == "fp16" and b.device != "cuda":
            rows.append({"case": "precision", "precision": precision, "skipped": "fp16 with a GradScaler needs CUDA"})
            continue
        run, losses = trained(b, steps, f"precision.mode={precision}")
        row = {
            "case": "precision",
            "precision": precision,
            "val_loss": losses.val,
            "first_train_loss": losses.train[0],
            "tokens_per_s": median_tokens_per_s(run, 1),
            "metrics": run.techniques.precision.metrics(),
        }
        base = base or row
        row["val_loss_vs_fp32"] = row["val_loss"] / base["val_loss"] - 1
        rows.append(row)
    b.say(
        format_table(
            ["precision", "first loss", f"val loss after {steps}", "vs fp32", "tokens/s"],
            [
                [
                    r["precision"],
                    f"{r['first_train_loss']:.3f}",
                    f"{r['val_loss']:.4f}",
                    f"{r['val_loss_vs_fp32']:+.2%}",
                    f"{r['tokens_per_s']:,.0f}",
                ]
                if "skipped" not in r
                else [r["precision"], "", "", r["skipped"], ""]
                for r in rows
            ],
        )
    )
    return rows


def case_optim8bit(b: Bench) -> list[dict]:
    steps = b.steps(50, 30)
    rows = []
    for name in ("adamw", "adamw8bit"):
        m = measure(b.cfg(*([] if b.tiny else SMALL), f"optim.name={name}"), name=name, steps=3, device=b.device)
        _, losses = trained(b, steps, f"optim.name={name}")
        rows.append(
            {
                "case": "optim8bit",
                "optim": name,
                "state_bytes": m.measured["optimizer"],
                "estimated_state_bytes": m.estimated["optimizer"],
                "val_loss": losses.val,
            }
        )
    rows[1]["state_ratio"] = rows[1]["state_bytes"] / rows[0]["state_bytes"]
    rows[1]["val_loss_vs_adamw"] = rows[1]["val_loss"] / rows[0]["val_loss"] - 1
    b.say(
        format_table(
            ["optimizer", "state (allocator)", "state (estimate)", f"val loss after {steps}"],
            [
                [r["optim"], fmt(r["state_bytes"]), fmt(r["estimated_state_bytes"]), f"{r['val_loss']:.4f}"]
                for r in rows
            ],
        )
        + f"\nadamw8bit / adamw state: {rows[1]['state_ratio']:.3f}x (goal <= 0.3x); val loss "
        f"{rows[1]['val_loss_vs_adamw']:+.2%} (goal within 1%)"
    )
    return rows


def compare_interleaved(b: Bench, case: str, variants: list[tuple[str, list[str]]], steps: int) -> list[dict]:
    """``variants`` of gpt2-small (eager), interleaved: peak, saved bytes, time against the first."""
    runs = []
    for name, overrides in variants:
        cfg = b.cfg("train.batch_size=8" if not b.tiny else "train.batch_size=2", *overrides)
        runs.append((name, start(cfg, LocalData.random(cfg, steps), steps)))
    interleave([r for _, r in runs])
    rows = []
    for name, run in runs:
        worst = run.peak.worst_step()
        comp = _measured_components(run.peak, worst)
        rows.append(
            {
                "case": case,
                "variant": name,
                "peak_bytes": worst.peak,
                "saved_bytes": comp["saved_activations"],
                "step_s_median": statistics.median(run.step_s[1:] or run.step_s),
                "tokens_per_s": median_tokens_per_s(run, 1),
            }
        )
    base = rows[0]
    for r in rows:
        r["time_ratio"] = r["step_s_median"] / base["step_s_median"]
        r["peak_ratio"] = r["peak_bytes"] / base["peak_bytes"]
        r["tokens_per_s_ratio"] = r["tokens_per_s"] / base["tokens_per_s"]
        if r["saved_bytes"] is not None and base["saved_bytes"]:
            r["saved_ratio"] = r["saved_bytes"] / base["saved_bytes"]
    b.say(
        format_table(
            ["variant", "saved", "peak", "saved ratio", "peak ratio", "time ratio", "tokens/s ratio"],
            [
                [
                    r["variant"],
                    fmt(r["saved_bytes"]),
                    fmt(r["peak_bytes"]),
                    f"{r.get('saved_ratio', 0):.3f}",
                    f"{r['peak_ratio']:.3f}",
                    f"{r['time_ratio']:.3f}",
                    f"{r['tokens_per_s_ratio']:.3f}",
                ]
                for r in rows
            ],
        )
    )
    return rows


def case_recompute(b: Bench) -> list[dict]:
    half = dict(memory_configs(b))["budget-50%"][1:]
    return compare_interleaved(
        b,
        "recompute",
        [
            ("none", []),
            ("full", ["recompute.mode=full"]),
            ("budget-50%", half),
            ("budget-50%, op-level", [*half, "recompute.granularity=op"]),
            ("gated", ["recompute.mode=gated"]),
        ],
        b.steps(12, 8),
    )


def case_layerdrop(b: Bench) -> list[dict]:
    drop = ["slots.mode=layerdrop", "slots.keep=0.5"]
    variants = [("all layers, bf16", []), ("layerdrop 0.5, bf16", drop), ("all layers, fp32", ["precision.mode=fp32"])]
    if b.device == "cuda":
        variants.append(("layerdrop 0.5, fp16", [*drop, "precision.mode=fp16"]))
    return compare_interleaved(b, "layerdrop", variants, b.steps(16, 10))


def ladder(b: Bench) -> list[tuple[str, list[str]]]:
    if b.tiny:
        return [(f"tiny-{d}", [f"model.d_model={d}", "model.n_head=4", "model.n_layer=2"]) for d in (32, 64, 128, 256)]
    return [(name, [f"model.n_layer={n}", f"model.d_model={d}", f"model.n_head={h}"]) for name, n, d, h in GPT2_LADDER]


def choose_largest(b: Bench) -> tuple[list[dict], dict | None]:
    """Every ladder shape's estimate at batch 8 (bf16, adamw, no recompute, and full
    recompute), and the one with the most parameters that fits the budget."""
    budget = b.budget_gib * GiB
    rows, best = [], None
    for name, overrides in ladder(b):
        for mode in ("none", "full"):
            cfg = b.cfg(
                "train.batch_size=8" if not b.tiny else "train.batch_size=2", *overrides, f"recompute.mode={mode}"
            )
            est, shape = estimate(cfg), describe(cfg)
            row = {
                "case": "largest",
                "model": name,
                "recompute": mode,
                **shape,
                "estimated_peak_bytes": est,
                "fits": est <= budget,
                "overrides": overrides + [f"recompute.mode={mode}"],
            }
            rows.append(row)
            if row["fits"] and (
                best is None
                or row["params"] > best["params"]
                or (row["params"] == best["params"] and est < best["estimated_peak_bytes"])
            ):
                best = row
    return rows, best


def case_largest(b: Bench) -> list[dict]:
    rows, best = choose_largest(b)
    if best is None:
        b.say(f"[largest] no gpt2 shape fits {b.budget_gib} GiB")
        return rows
    m = measure(
        b.cfg("train.batch_size=8" if not b.tiny else "train.batch_size=2", *best["overrides"]),
        name=best["model"],
        steps=3,
        device=b.device,
    )
    best.update(
        chosen=True,
        measured_peak_bytes=m.worst.peak,
        error=m.error,
        measured_within_budget=m.worst.peak <= b.budget_gib * GiB,
    )
    b.say(
        f"[largest] {best['model']} ({best['params'] / 1e6:,.0f}M params, recompute {best['recompute']}) "
        f"is the largest gpt2 shape the estimator fits in {b.budget_gib:g} GiB: estimated "
        f"{best['estimated_peak_bytes'] / GiB:.2f} GiB, measured {m.worst.peak / GiB:.2f} GiB ({m.error:+.1%})"
    )
    return rows


RUNNERS: dict[str, Callable[[Bench], list[dict]]] = {
    "sdpa": case_sdpa,
    "throughput": case_throughput,
    "memory": case_memory,
    "precision": case_precision,
    "optim8bit": case_optim8bit,
    "recompute": case_recompute,
    "layerdrop": case_layerdrop,
    "largest": case_largest,
}


# ---- plan, run -------------------------------------------------------------------------


def plan(b: Bench) -> list[dict]:
    """What the run would do, from the configs and the estimator alone (no device needed)."""
    rows = []
    thr = b.cfg("train.batch_size=16" if not b.tiny else "train.batch_size=2")
    rows.append(
        {
            "case": "throughput",
            "plan": True,
            **describe(thr),
            "steps": b.steps(40, 20),
            "compile": b.compile_mode,
            "estimated_peak_bytes": estimate(thr),
        }
    )
    for name, overrides in memory_configs(b):
        cfg = b.cfg(*overrides)
        rows.append(
            {"case": "memory", "plan": True, "name": name, **describe(cfg), "estimated_peak_bytes": estimate(cfg)}
        )
    small = b.cfg(*([] if b.tiny else SMALL))
    rows.append(
        {
            "case": "precision",
            "plan": True,
            "name": "small" if not b.tiny else "tiny",
            **describe(small),
            "steps": b.steps(50, 30),
            "estimated_peak_bytes": estimate(small),
        }
    )
    ladder_rows, best = choose_largest(b)
    rows += [{**r, "plan": True, "chosen": r is best} for r in ladder_rows]
    return rows


def print_plan(b: Bench, rows: list[dict]) -> None:
    b.say(
        f"bench gpu plan ({'tiny' if b.tiny else 'quick' if b.quick else 'full'}); cases: {', '.join(b.only)}; "
        f"MFU peak {b.peak_tflops:g} TFLOP/s; memory budget {b.budget_gib:g} GiB"
    )
    b.say(
        format_table(
            ["case", "model", "L", "d", "T", "B", "params", "FLOPs/token", "est. peak (cuda)", ""],
            [
                [
                    r["case"],
                    r.get("name") or r.get("model", "gpt2-small"),
                    r["n_layer"] if "n_layer" in r else "",
                    r.get("d_model", ""),
                    r.get("seq_len", ""),
                    r.get("batch_size", ""),
                    f"{r['params'] / 1e6:,.1f}M",
                    f"{r['flops_per_token'] / 1e9:.3f} G" if "flops_per_token" in r else "",
                    f"{r['estimated_peak_bytes'] / GiB:.2f} GiB",
                    ("<- largest that fits" if r.get("chosen") else ("" if r.get("fits", True) else "over budget"))
                    + (f" (recompute {r['recompute']})" if "recompute" in r else ""),
                ]
                for r in rows
            ],
        )
    )


def run_bench(b: Bench, dry_run: bool = False) -> list[dict]:
    if b.out:
        b.out.mkdir(parents=True, exist_ok=True)
    if dry_run:
        rows = plan(b)
        print_plan(b, rows)
        b.add(rows)
        return rows
    if b.device == "cuda" and not torch.cuda.is_available():
        raise NoCuda(
            "bench gpu needs a CUDA GPU and torch sees none here (torch.cuda.is_available() is False): "
            "run `raydrat bench gpu --dry-run` to print its plan, shapes, FLOPs and estimates on this machine"
        )
    if b.device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    b.say(f"bench gpu on {environment(b)['device']}, torch {torch.__version__}, load average {load_average()}")
    for case in b.only:
        if b.elapsed() > b.deadline_s:
            b.add([{"case": case, "skipped": f"time: {b.elapsed():.0f}s used of the {b.deadline_s:.0f}s deadline"}])
            b.say(f"[{case}] skipped: past the {b.deadline_s:.0f}s deadline")
            continue
        b.say(f"== {case} ({b.elapsed():.0f}s)")
        t0 = time.perf_counter()
        try:
            rows = RUNNERS[case](b)
        except (RuntimeError, ConfigError, ImportError) as exc:  # one case's failure is a row, not the end
            rows = [{"case": case, "failed": f"{type(exc).__name__}: {' '.join(str(exc).split())[:400]}"}]
            b.say(f"[{case}] failed: {rows[0]['failed']}")
        for r in rows:
            r.setdefault("case_s", round(time.perf_counter() - t0, 1))
        b.add(rows)
        if b.device == "cuda":
            torch.cuda.empty_cache()
    b.say(f"bench gpu done in {b.elapsed():.0f}s")
    return b.rows


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", type=Path, help="write the rows here")
    p.add_argument("--out", type=Path, help="a directory for bench-gpu.json and bench-gpu.log")
    p.add_argument("--quick", action="store_true", help="fewer steps per case")
    p.add_argument("--dry-run", action="store_true", help="print the plan (shapes, FLOPs, estimates); run nothing")
    p.add_argument("--tiny", action="store_true", help="every case at toy shapes on --device (checks the bench)")
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--only", nargs="+", choices=CASES, help="these cases only")
    p.add_argument("--budget-gib", type=float, default=20.0, help="memory budget of the largest-model case")
    p.add_argument("--peak-tflops", type=float, default=PEAK_TFLOPS, help="dense bf16 peak for MFU")
    p.add_argument("--deadline-s", type=float, default=420.0, help="start no case after this many seconds")


def from_args(args: argparse.Namespace) -> Bench:
    return Bench(
        quick=args.quick,
        tiny=args.tiny,
        device=args.device,
        budget_gib=args.budget_gib,
        peak_tflops=args.peak_tflops,
        deadline_s=args.deadline_s,
        out=args.out,
        json_path=args.json,
        only=tuple(args.only or CASES),
    )


def main(argv: list[str] | None = None, prog: str = "python -m raydrat.bench.gpu") -> int:
    """``raydrat bench gpu``, and ``python -m raydrat.bench.gpu`` on a machine without Ray
    (the GPU machine)."""
    p = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    add_arguments(p)
    args = p.parse_args(argv)
    try:
        run_bench(from_args(args), dry_run=args.dry_run)
    except ConfigError as exc:
        print(f"raydrat: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        sys.exit(main())
