"""``raydrat bench model``: raydrat's model against its peers, in eager training steps.

The peers are built here from their published architectures (written for this benchmark,
not copied from their repositories):

``torchtitan``
    torchtitan's Llama 3 (``torchtitan/models/llama3/model.py``): ``nn.RMSNorm``; RoPE as a
    complex multiply (``view_as_complex`` on adjacent feature pairs, a ``freqs_cis`` buffer);
    grouped-query attention with the key/value heads repeated (``expand`` + ``reshape``)
    before ``scaled_dot_product_attention``; SwiGLU ``w2(silu(w1(x)) * w3(x))``. Built at
    raydrat's shape: the same widths, heads, MLP width and (as raydrat's recipes) a head
    tied to the embedding, so the two models have the same parameters and the same function
    (``tests/test_bench_model.py`` maps raydrat's weights into it and compares logits).
``nanogpt``
    nanoGPT's GPT-2 (``model.py``): learned position embeddings, LayerNorm, one fused
    ``c_attn`` projection for q/k/v, multi-head SDPA, a 4x GELU MLP, tied head. raydrat is
    configured as close as it goes (``norm: layernorm``, ``activation: gelu``, plain
    multi-head attention, no biases, as nanoGPT's ``train.py``); what still differs is listed
    in :data:`NANOGPT_DIFFERENCES`.

Every model trains the same seeded random token batches (speed does not depend on the
text) with the same step: forward, cross-entropy, backward, gradient clipping at 1.0 and
AdamW (torch's foreach implementation; weight decay on matrices), in this process on the
training workers' thread count (``scaling.cpus_per_worker``), on the GPU when there is one
(and ``train.device`` is not ``cpu``). After a warm-up the models take turns one step at a
time (round-robin, the order rotated each round), so every model sees the same machine load;
tokens/s is the tokens per step over the median step time. On CPU the ratio is also given
from CPU seconds per step, which other processes on a shared machine disturb less.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from raydrat.bench.peers import NANOGPT_DIFFERENCES, NanoGPT, TitanLlama, nanogpt_settings, recipe_settings
from raydrat.bench.report import load_average, print_table
from raydrat.config.model import ModelConfig
from raydrat.config.run import RaydratConfig
from raydrat.core.model.transformer import GPT
from raydrat.core.optim import param_groups
from raydrat.tables import write_json

LARGE_SHAPE = dict(n_layer=6, d_model=384, n_head=6, seq_len=256)
"""The second shape: nanoGPT's shakespeare-char model (6 layers, 6 heads, d_model 384, 256 tokens)."""
LARGE_BATCH = 8
CLIP = 1.0


# --------------------------------------------------------------------------------------
# measurement
# --------------------------------------------------------------------------------------


@dataclass
class Trainee:
    """One model with its optimizer and a record of its step times."""

    name: str
    model: nn.Module
    optimizer: torch.optim.Optimizer
    times: list[float]
    """Wall-clock seconds of each timed step."""
    cpu_times: list[float]
    """CPU seconds of this process in each timed step (all its threads): the work done,
    whatever else the machine runs meanwhile."""

    @classmethod
    def build(
        cls, name: str, make: Callable[[], nn.Module], seed: int = 0, device: torch.device = torch.device("cpu")
    ) -> Trainee:
        torch.manual_seed(seed)
        model = make().to(device).train()
        optimizer = torch.optim.AdamW(param_groups(model, 0.1), lr=1e-3, betas=(0.9, 0.95), foreach=True)
        return cls(name, model, optimizer, [], [])

    def step(self, idx: torch.Tensor, targets: torch.Tensor) -> tuple[float, float]:
        """One training step; returns its wall-clock and CPU seconds (on a GPU, the step
        is waited for)."""
        t0, c0 = time.perf_counter(), time.process_time()
        _, loss = self.model(idx, targets)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), CLIP)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if idx.is_cuda:
            torch.cuda.synchronize(idx.device)
        return time.perf_counter() - t0, time.process_time() - c0

    def params(self) -> int:
        return sum(p.numel() for p in self.model.parameters())


def measure(trainees: list[Trainee], batches: list[tuple[torch.Tensor, torch.Tensor]], steps: int, warmup: int) -> None:
    """``warmup`` untimed steps each, then ``steps`` timed rounds of one step per model,
    the starting model rotated every round."""
    for t in trainees:
        for i in range(warmup):
            t.step(*batches[i % len(batches)])
    n = len(trainees)
    for r in range(steps):
        idx, targets = batches[r % len(batches)]
        for j in range(n):
            t = trainees[(r + j) % n]
            wall, cpu = t.step(idx, targets)
            t.times.append(wall)
            t.cpu_times.append(cpu)


def shapes(cfg: RaydratConfig) -> list[tuple[str, ModelConfig, int]]:
    """``(name, model config, batch size)``: the recipe's shape and nanoGPT's shakespeare-char shape."""
    m = cfg.model
    kv = max(1, LARGE_SHAPE["n_head"] * m.kv_heads // m.n_head)
    while LARGE_SHAPE["n_head"] % kv:
        kv -= 1
    large = m.model_copy(update={**LARGE_SHAPE, "n_kv_head": kv, "d_ff": None})
    recipe = f"{cfg.name}: {m.n_layer}L d{m.d_model} h{m.n_head}/{m.kv_heads} T{m.seq_len} B{cfg.train.batch_size}"
    big = f"6L d384 h6/{kv} T256 B{LARGE_BATCH}"
    return [(recipe, m, cfg.train.batch_size), (big, large, LARGE_BATCH)]


def random_batches(
    cfg: ModelConfig, batch_size: int, n: int = 4, seed: int = 0, device: torch.device = torch.device("cpu")
):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, cfg.vocab_size, (n, batch_size, cfg.seq_len + 1), generator=g).to(device)
    return [(t[:, :-1], t[:, 1:]) for t in tokens]


def bench_shape(
    name: str,
    model_cfg: ModelConfig,
    batch_size: int,
    steps: int,
    warmup: int,
    device: torch.device = torch.device("cpu"),
) -> list[dict]:
    recipe, nano = recipe_settings(model_cfg), nanogpt_settings(model_cfg)
    trainees = [
        Trainee.build("raydrat", lambda: GPT(recipe), device=device),
        Trainee.build("torchtitan", lambda: TitanLlama(recipe), device=device),
        Trainee.build("raydrat_nanogpt", lambda: GPT(nano), device=device),
        Trainee.build("nanogpt", lambda: NanoGPT.like(nano), device=device),
    ]
    measure(trainees, random_batches(model_cfg, batch_size, device=device), steps, warmup)
    tokens = batch_size * model_cfg.seq_len
    rows = []
    for settings, ours, ref in (("recipe", trainees[0], trainees[1]), ("nanogpt", trainees[2], trainees[3])):
        wall, ref_wall = statistics.median(ours.times), statistics.median(ref.times)
        cpu, ref_cpu = statistics.median(ours.cpu_times), statistics.median(ref.cpu_times)
        rows.append(
            {
                "shape": name,
                "settings": settings,
                "reference": ref.name,
                "tokens_per_s": tokens / wall,
                "reference_tokens_per_s": tokens / ref_wall,
                "ratio": ref_wall / wall,
                "cpu_tokens_per_s": tokens / cpu,
                "reference_cpu_tokens_per_s": tokens / ref_cpu,
                "cpu_ratio": ref_cpu / cpu,
                "step_s_median": wall,
                "reference_step_s_median": ref_wall,
                "step_s_range": [min(ours.times), max(ours.times)],
                "reference_step_s_range": [min(ref.times), max(ref.times)],
                "params": ours.params(),
                "reference_params": ref.params(),
                "steps": steps,
                "batch_size": batch_size,
                "seq_len": model_cfg.seq_len,
                "device": device.type,
            }
        )
    return rows


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
grouped heads, the loss's in-place backward. (A gated-unit/activation backward writing into
its saved tensors was measured too and dropped: 0.996x / 1.000x CPU time reverted, no gain,
and a backward that overwrites saved tensors is unsafe under op-level recomputation.)"""


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


def run_ablation(cfg: RaydratConfig, steps: int = 30, warmup: int = 3, json_path: str | None = None) -> list[dict]:
    """Interleaved steps of raydrat's model, of it with each change reverted alone, and with
    all reverted, at each shape; tokens/s relative to the model with every change."""
    threads = max(1, int(cfg.scaling.cpus_per_worker))
    torch.set_num_threads(threads)
    load_before = load_average()
    rows = []
    variants = [("all changes", ()), *((f"without {c}", (c,)) for c in ABLATIONS), ("none (before)", ABLATIONS)]
    for name, model_cfg, batch_size in shapes(cfg):
        mc = recipe_settings(model_cfg)
        trainees = [Trainee.build(v, lambda ch=ch, mc=mc: reverted(mc, ch)) for v, ch in variants]
        print(f"[bench model ablation] {name}: {steps} interleaved steps per variant", flush=True)
        measure(trainees, random_batches(mc, batch_size), steps, warmup)
        base = statistics.median(trainees[0].times)
        base_cpu = statistics.median(trainees[0].cpu_times)
        for t in trainees:
            wall, cpu = statistics.median(t.times), statistics.median(t.cpu_times)
            rows.append(
                {
                    "shape": name,
                    "variant": t.name,
                    "tokens_per_s": batch_size * mc.seq_len / wall,
                    "speed_vs_all": base / wall,
                    "cpu_speed_vs_all": base_cpu / cpu,
                }
            )
    load_after = load_average()
    print_table(
        f"each speed change reverted alone (eager training step, fp32, CPU {threads} thread(s))",
        ["shape", "variant", "tok/s", "speed vs all changes", "(CPU time)"],
        [
            [
                r["shape"],
                r["variant"],
                f"{r['tokens_per_s']:,.0f}",
                f"{r['speed_vs_all']:.3f}x",
                f"{r['cpu_speed_vs_all']:.3f}x",
            ]
            for r in rows
        ],
        footer=f"below 1.000x: reverting the change is slower, so it pays. load average {load_before} (start), "
        f"{load_after} (end)",
    )
    if json_path:
        write_json(json_path, {"rows": rows, "threads": threads, "load_average": [load_before, load_after]})
    return rows


def run_model_bench(
    cfg: RaydratConfig, json_path: str | None = None, steps: int = 30, warmup: int = 3, only_recipe: bool = False
) -> list[dict]:
    """Measure every shape, print the table, write ``json_path``; returns the rows."""
    threads = max(1, int(cfg.scaling.cpus_per_worker))
    torch.set_num_threads(threads)
    use_cuda = torch.cuda.is_available() and cfg.train.device != "cpu"
    device = torch.device("cuda" if use_cuda else "cpu")
    load_before = load_average()
    rows: list[dict] = []
    for name, model_cfg, batch_size in shapes(cfg)[: 1 if only_recipe else None]:
        print(f"[bench model] {name}: {steps} interleaved steps per model after {warmup} warm-up", flush=True)
        rows += bench_shape(name, model_cfg, batch_size, steps, warmup, device)
    load_after = load_average()
    where = torch.cuda.get_device_name(device) if use_cuda else f"CPU, {threads} thread(s)"
    print_table(
        f"eager training step (forward + backward + AdamW), fp32, {where}",
        ["shape", "settings", "reference", "raydrat tok/s", "reference tok/s", "ratio", "ratio (CPU time)"],
        [
            [
                r["shape"],
                r["settings"],
                r["reference"],
                f"{r['tokens_per_s']:,.0f}",
                f"{r['reference_tokens_per_s']:,.0f}",
                f"{r['ratio']:.3f}x",
                f"{r['cpu_ratio']:.3f}x",
            ]
            for r in rows
        ],
        footer=(
            f"tok/s: tokens per step / median wall-clock step time; ratio (CPU time): the same from the "
            f"process's CPU seconds per step, which other load on the machine disturbs less.\n"
            f"load average {load_before} (start), {load_after} (end). "
            f"At nanogpt settings: {NANOGPT_DIFFERENCES}."
        ),
    )
    if json_path:
        write_json(
            json_path,
            {
                "rows": rows,
                "threads": threads,
                "load_average": [load_before, load_after],
                "nanogpt_differences": NANOGPT_DIFFERENCES,
                "torch": torch.__version__,
            },
        )
    return rows
