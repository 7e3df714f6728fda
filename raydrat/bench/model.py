"""``raydrat bench model``: raydrat's model against the real peers, in training steps.

The peers (:mod:`raydrat.bench.peers`) are transformers' Llama, torchtitan's llama3 and
litgpt's GPT, installed packages built at raydrat's shape, and the nanoGPT reference. At
each shape and mode (eager, or every model under ``torch.compile``) all of them train the
same seeded random token batches (speed does not depend on the text) with the same step:
forward, the peer's own cross-entropy, backward, gradient clipping at 1.0 and AdamW
(torch's foreach implementation, weight decay on matrices), in this process on the training
workers' thread count (``scaling.cpus_per_worker``), on the GPU when there is one (and
``train.device`` is not ``cpu``).

The timing is :mod:`raydrat.bench.rounds`': after a warm-up (which compiles), every model
runs in turn in each of ``rounds`` rounds, each round of a model long enough to dominate
timer noise; each ratio is raydrat's speed over the peer's, paired round by round, median
and min-max, by this process's CPU time (on CPU: what other load on a shared machine
disturbs least) and by wall time. A row's verdict (ahead of the peer, or behind) is printed
only when the ratio's spread is narrower than its margin from 1.0.

``--profile`` adds the PyTorch profiler's top operators of raydrat and of the fastest Llama
peer at each shape (eager; each operator's least time over five profiled steps).
``--ablate`` (:func:`run_ablation`) times the model with each of its speed changes reverted
alone; ``--learning`` is :mod:`raydrat.bench.learning`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from raydrat.bench import rounds as R
from raydrat.bench.peers import NANOGPT_DIFFERENCES, Peer, available, recipe_settings, settings_for
from raydrat.bench.report import print_table
from raydrat.config.model import ModelConfig
from raydrat.config.run import RaydratConfig
from raydrat.core.model.transformer import GPT
from raydrat.core.optim import param_groups
from raydrat.tables import write_json

CLIP = 1.0
MODES = ("eager", "compiled")


@dataclass(frozen=True)
class Shape:
    """A model shape and batch to time at; ``name`` is how ``--shapes`` picks it."""

    name: str
    model: ModelConfig
    batch_size: int

    def label(self) -> str:
        m = self.model
        return f"{m.n_layer}L d{m.d_model} h{m.n_head}/{m.kv_heads} T{m.seq_len} B{self.batch_size}"

    @property
    def tokens(self) -> int:
        return self.batch_size * self.model.seq_len


EXTRA_SHAPES = {
    "6l": (dict(n_layer=6, d_model=384, n_head=6, seq_len=256), 8),
    "12l": (dict(n_layer=12, d_model=768, n_head=12, seq_len=512), 2),
}
"""Beside the recipe's own shape: nanoGPT's shakespeare-char model (6 layers, d_model 384,
256 tokens, batch 8) and the gpt2-small width and depth with fewer tokens (512, batch 2:
one step is seconds on one CPU thread)."""


def shapes(cfg: RaydratConfig, names: list[str] | None = None) -> list[Shape]:
    """The recipe's shape (``recipe``) and :data:`EXTRA_SHAPES`, with the recipe's
    vocabulary and its ratio of query heads to key/value heads."""
    m = cfg.model
    out = [Shape("recipe", m, cfg.train.batch_size)]
    for name, (update, batch) in EXTRA_SHAPES.items():
        kv = max(1, update["n_head"] * m.kv_heads // m.n_head)
        while update["n_head"] % kv:
            kv -= 1
        out.append(Shape(name, m.model_copy(update={**update, "n_kv_head": kv, "d_ff": None}), batch))
    if names:
        unknown = sorted(set(names) - {s.name for s in out})
        if unknown:
            raise ValueError(f"unknown shape(s) {unknown}: choose from {[s.name for s in out]}")
        out = [s for s in out if s.name in names]
    return out


def random_batch(cfg: ModelConfig, batch_size: int, device: torch.device, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, cfg.vocab_size, (batch_size, cfg.seq_len + 1), generator=g).to(device)
    return tokens[:, :-1], tokens[:, 1:]


# --------------------------------------------------------------------------------------
# one model's training step
# --------------------------------------------------------------------------------------


class Trainee:
    """A model (its ``forward(idx, targets)`` returns ``(logits, loss)``), compiled or not,
    with AdamW; :meth:`step` is one training step."""

    def __init__(self, name: str, model: nn.Module, compiled: bool, batch):
        self.name, self.model, self.batch = name, model, batch
        self.optimizer = torch.optim.AdamW(param_groups(model, 0.1), lr=1e-3, betas=(0.9, 0.95), foreach=True)
        self.forward = torch.compile(model) if compiled else model

    def step(self) -> None:
        _, loss = self.forward(*self.batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), CLIP)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def params(self) -> int:
        return sum(p.numel() for p in self.model.parameters())


def build(make: Callable[[], nn.Module], device: torch.device, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return make().to(device).train()


# --------------------------------------------------------------------------------------
# one shape, one mode
# --------------------------------------------------------------------------------------


def bench_shape(
    shape: Shape,
    peers: list[Peer],
    mode: str,
    rounds: int,
    round_s: float,
    device: torch.device,
    log: Callable[[str], None] = print,
) -> list[dict]:
    """Every peer and raydrat at each peer's settings, timed together; one row per peer."""
    batch = random_batch(shape.model, shape.batch_size, device)
    ours_cfg = {p.settings: settings_for(p, shape.model) for p in peers}
    trainees: dict[str, Trainee] = {}
    for settings, mc in ours_cfg.items():
        trainees[f"raydrat@{settings}"] = Trainee(
            "raydrat", build(lambda mc=mc: GPT(mc), device), mode == "compiled", batch
        )
    for p in peers:
        mc = ours_cfg[p.settings]
        trainees[p.name] = Trainee(p.name, build(lambda p=p, mc=mc: p.build(mc), device), mode == "compiled", batch)
    t0 = time.perf_counter()
    load = R.Load()
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else None
    series = R.run_rounds(
        {k: t.step for k, t in trainees.items()}, rounds=rounds, round_s=round_s, warmup=2, sync=sync, log=log
    )
    load.finish()
    log(f"  {shape.label()} {mode}: {time.perf_counter() - t0:.0f}s with the warm-up, {load.text()}")
    clock = "wall" if device.type == "cuda" else "cpu"
    rows = []
    for p in peers:
        ours, ref = series[f"raydrat@{p.settings}"], series[p.name]
        ratio = {c: R.speed_ratio(ours, ref, c) for c in R.CLOCKS}
        v = R.verdict(ratio[clock], 1.0)
        rows.append(
            {
                "shape": shape.label(),
                "mode": mode,
                "settings": p.settings,
                "reference": p.name,
                "reference_package": p.package(),
                "tokens_per_s": ours.rate(shape.tokens, "wall").median,
                "reference_tokens_per_s": ref.rate(shape.tokens, "wall").median,
                "cpu_tokens_per_s": ours.rate(shape.tokens, "cpu").median,
                "reference_cpu_tokens_per_s": ref.rate(shape.tokens, "cpu").median,
                "ratio": ratio["wall"].median,
                "cpu_ratio": ratio["cpu"].median,
                "ratio_range": [ratio["wall"].low, ratio["wall"].high],
                "cpu_ratio_range": [ratio["cpu"].low, ratio["cpu"].high],
                "verdict_clock": clock,
                "verdict": v.holds,
                "verdict_text": v.text,
                "step_s": ours.spread("wall").as_dict(),
                "reference_step_s": ref.spread("wall").as_dict(),
                "cpu_step_s": ours.spread("cpu").as_dict(),
                "reference_cpu_step_s": ref.spread("cpu").as_dict(),
                "params": trainees[f"raydrat@{p.settings}"].params(),
                "reference_params": trainees[p.name].params(),
                "rounds": rounds,
                "batch_size": shape.batch_size,
                "seq_len": shape.model.seq_len,
                "device": device.type,
                "load_average": load.as_list(),
            }
        )
    return rows


# --------------------------------------------------------------------------------------
# profile: where the time goes, per operator
# --------------------------------------------------------------------------------------


def top_ops(trainee: Trainee, steps: int = 5, top: int = 12) -> list[dict]:
    """The operators with the most self time in a training step (PyTorch profiler): each
    step profiled on its own, each operator's time the least over the steps (an operator
    preempted by another process on a shared machine reads long once, not every step)."""
    from torch.profiler import ProfilerActivity, profile

    trainee.step()
    per_step: list[dict[str, tuple[float, int]]] = []
    for _ in range(steps):
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            trainee.step()
        per_step.append({e.key: (e.self_cpu_time_total, e.count) for e in prof.key_averages()})
    ops = {k for step in per_step for k in step}
    least = {k: min(step.get(k, (0.0, 0))[0] for step in per_step) for k in ops}
    total = sum(least.values())
    ranked = sorted(ops, key=lambda k: -least[k])[:top]
    return [
        {
            "op": k,
            "ms_per_step": least[k] / 1e3,
            "share": least[k] / total if total else 0.0,
            "calls_per_step": per_step[-1].get(k, (0.0, 0))[1],
        }
        for k in ranked
    ]


def profile_shape(shape: Shape, peer: Peer, device: torch.device) -> dict:
    batch = random_batch(shape.model, shape.batch_size, device)
    mc = settings_for(peer, shape.model)
    ours = Trainee("raydrat", build(lambda: GPT(mc), device), False, batch)
    ref = Trainee(peer.name, build(lambda: peer.build(mc), device), False, batch)
    return {"shape": shape.label(), "raydrat": top_ops(ours), peer.name: top_ops(ref), "peer": peer.name}


def print_profile(prof: dict) -> None:
    peer = prof["peer"]
    a, b = prof["raydrat"], prof[peer]
    print_table(
        f"profile, {prof['shape']}, eager: self time per training step (least of 5 profiled steps), top operators",
        ["raydrat op", "ms", "calls", f"{peer} op", "ms", "calls"],
        [
            [
                x["op"][:48],
                f"{x['ms_per_step']:.1f}",
                x["calls_per_step"],
                y["op"][:48],
                f"{y['ms_per_step']:.1f}",
                y["calls_per_step"],
            ]
            for x, y in zip(a, b)
        ],
    )


# --------------------------------------------------------------------------------------
# the command
# --------------------------------------------------------------------------------------


def _ratio_text(r: dict, key: str) -> str:
    low, high = r[f"{key}_range"]
    return f"{r[key]:.3f}x ({low:.3f}-{high:.3f})"


def print_rows(rows: list[dict], where: str, load: R.Load) -> None:
    print_table(
        f"training step (forward + backward + AdamW), fp32, {where}: raydrat's speed over each peer's",
        ["shape", "mode", "peer", "raydrat tok/s", "peer tok/s", "ratio, CPU time", "ratio, wall", "verdict"],
        [
            [
                r["shape"],
                r["mode"],
                r["reference_package"],
                f"{r['cpu_tokens_per_s' if r['verdict_clock'] == 'cpu' else 'tokens_per_s']:,.0f}",
                f"{r['reference_cpu_tokens_per_s' if r['verdict_clock'] == 'cpu' else 'reference_tokens_per_s']:,.0f}",
                _ratio_text(r, "cpu_ratio"),
                _ratio_text(r, "ratio"),
                r["verdict_text"],
            ]
            for r in rows
        ],
        footer=(
            "ratio: median (min-max) over the rounds of the peer's seconds per step over raydrat's, in the same "
            "round; tok/s: tokens per step over the median seconds per step by the verdict's clock (CPU time on CPU: "
            "this process's, which other load on the machine disturbs least; wall time on a GPU).\n"
            f"raydrat is set as each peer: the Llama peers at the recipe's settings, nanogpt as close as raydrat goes "
            f"({NANOGPT_DIFFERENCES}).\n{R.VERDICT_RULE.format(goal=1)}.\n{load.text()}"
        ),
    )


def run_model_bench(
    cfg: RaydratConfig,
    json_path: str | None = None,
    rounds: int = R.MIN_ROUNDS,
    round_s: float = 1.0,
    shape_names: list[str] | None = None,
    modes: tuple[str, ...] = ("eager",),
    peer_names: list[str] | None = None,
    profile: bool = False,
    log: Callable[[str], None] = print,
) -> list[dict]:
    """Measure every shape and mode, print the table, write ``json_path``; returns the rows."""
    R.check_rounds(rounds)
    bad = sorted(set(modes) - set(MODES))
    if bad:
        raise ValueError(f"unknown mode(s) {bad}: choose from {list(MODES)}")
    threads = max(1, int(cfg.scaling.cpus_per_worker))
    torch.set_num_threads(threads)
    use_cuda = torch.cuda.is_available() and cfg.train.device != "cpu"
    device = torch.device("cuda" if use_cuda else "cpu")
    peers = available(peer_names, log)
    if not peers:
        raise ValueError("no peer to measure against: pip install 'raydrat[peers]', or name an installed one")
    chosen = shapes(cfg, shape_names)
    where = torch.cuda.get_device_name(device) if use_cuda else f"CPU, {threads} thread(s)"
    load = R.Load()
    rows: list[dict] = []
    profiles: list[dict] = []
    for shape in chosen:
        for mode in modes:
            log(f"[bench model] {shape.label()} {mode}: {', '.join(p.name for p in peers)}; {rounds} rounds")
            shape_load = R.Load()
            shape_rows = bench_shape(shape, peers, mode, rounds, round_s, device, log)
            rows += shape_rows
            if len(chosen) * len(modes) > 1:  # a long run shows each part as it ends
                print_rows(shape_rows, where, shape_load.finish())
            if profile and mode == "eager":
                fastest = max((r for r in shape_rows if r["settings"] == "recipe"), key=_peer_speed, default=None)
                if fastest is not None:
                    prof = profile_shape(shape, next(p for p in peers if p.name == fastest["reference"]), device)
                    profiles.append(prof)
                    print_profile(prof)
            if json_path:  # rewritten after each part: an interrupted run keeps what it measured
                write_json(
                    json_path,
                    {
                        "rows": rows,
                        "profiles": profiles,
                        "threads": threads,
                        "load_average": load.as_list(),
                        "nanogpt_differences": NANOGPT_DIFFERENCES,
                        "torch": torch.__version__,
                    },
                )
    load.finish()
    print_rows(rows, where, load)
    return rows


def _peer_speed(row: dict) -> float:
    return row["reference_cpu_tokens_per_s" if row["verdict_clock"] == "cpu" else "reference_tokens_per_s"]


# --------------------------------------------------------------------------------------
# ablation: each speed change of the model reverted on its own
# --------------------------------------------------------------------------------------


def _rope_before(rope: nn.Module):
    """The rotate-half RoPE as it was: halves rotated separately and concatenated (the same
    rotation from the full-width tables: cos repeats, sin carries the sign on its first half)."""
    half = rope.cos.shape[-1] // 2

    def forward(x: torch.Tensor, start: int = 0) -> torch.Tensor:
        T = x.shape[1]
        cos, sin = rope.cos[start : start + T, None, :half], rope.sin[start : start + T, None, half:]
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)

    return forward


class LossBefore(nn.Module):
    """``F.cross_entropy`` on fp32 logits, as the model's loss was (autograd's backward)."""

    def __init__(self, model: GPT):
        super().__init__()
        self.model = model

    def forward(self, idx: torch.Tensor, targets: torch.Tensor):
        logits, _ = self.model(idx)
        return logits, F.cross_entropy(
            logits.float().view(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100
        )


ABLATIONS = ("rope", "gqa", "loss")
"""The speed changes that can be reverted one by one: RoPE's fused rotation, SDPA's
grouped heads, the loss's in-place backward. Measured and dropped (docs/efficiency.md):
a gated-unit backward writing into its saved tensors (no gain; unsafe under op-level
recomputation), and q/k/v and gate/up multiplied as one matrix each in training (no gain
beyond the spread at the demo and 6-layer shapes, and autograd keeps the concatenated
weights for backward: a copy of most of the layer weights as activation memory)."""


def reverted(cfg: ModelConfig, changes: tuple[str, ...]) -> nn.Module:
    """raydrat's model with ``changes`` (of :data:`ABLATIONS`) reverted to the plain implementation each replaces."""
    model: nn.Module = GPT(cfg)
    for block in model.layers.values():
        attn = block.attn_branch.layer
        if "rope" in changes:
            attn.rope.forward = _rope_before(attn.rope)
        if "gqa" in changes:
            attn.enable_gqa = False
    return LossBefore(model) if "loss" in changes else model


def run_ablation(
    cfg: RaydratConfig,
    rounds: int = R.MIN_ROUNDS,
    round_s: float = 1.0,
    shape_names: list[str] | None = None,
    json_path: str | None = None,
    log: Callable[[str], None] = print,
) -> list[dict]:
    """raydrat's model, it with each change reverted alone, and with all reverted, at each
    shape, timed together: each one's speed relative to the model with every change."""
    R.check_rounds(rounds)
    threads = max(1, int(cfg.scaling.cpus_per_worker))
    torch.set_num_threads(threads)
    device = torch.device("cpu")
    load = R.Load()
    rows = []
    variants = [("all changes", ()), *((f"without {c}", (c,)) for c in ABLATIONS), ("none (before)", ABLATIONS)]
    for shape in shapes(cfg, shape_names):
        mc = recipe_settings(shape.model)
        batch = random_batch(mc, shape.batch_size, device)
        trainees = {
            v: Trainee(v, build(lambda ch=ch, mc=mc: reverted(mc, ch), device), False, batch) for v, ch in variants
        }
        log(f"[bench model ablation] {shape.label()}: {rounds} rounds")
        series = R.run_rounds({k: t.step for k, t in trainees.items()}, rounds=rounds, round_s=round_s, log=log)
        base = series["all changes"]
        for name, _ in variants:
            ratio = R.speed_ratio(series[name], base, "cpu")
            rows.append(
                {
                    "shape": shape.label(),
                    "variant": name,
                    "cpu_tokens_per_s": series[name].rate(shape.tokens, "cpu").median,
                    "cpu_speed_vs_all": ratio.median,
                    "cpu_speed_vs_all_range": [ratio.low, ratio.high],
                    "verdict_text": "" if name == "all changes" else R.verdict(ratio, 1.0, "faster", "slower").text,
                }
            )
    load.finish()
    print_table(
        f"each speed change reverted alone (eager training step, fp32, CPU {threads} thread(s)), by CPU time",
        ["shape", "variant", "tok/s", "speed vs all changes", "verdict"],
        [
            [
                r["shape"],
                r["variant"],
                f"{r['cpu_tokens_per_s']:,.0f}",
                _ratio_text(r, "cpu_speed_vs_all"),
                r["verdict_text"],
            ]
            for r in rows
        ],
        footer=f"below 1.000x: reverting the change is slower, so it pays. {load.text()}",
    )
    if json_path:
        write_json(json_path, {"rows": rows, "threads": threads, "load_average": load.as_list()})
    return rows
