"""``raydrat bench combos``: every efficiency technique alone and in useful combinations,
against a baseline (fp32, no recomputation, AdamW, all layers) measured in the same run.

Each combination trains the same model on the same pre-tokenized batches for the same
steps in this process (``train_step`` with the combination's ``EfficiencyPolicy`` plan)
and reports: steady tokens/s, measured parameter / gradient / optimizer-state /
activation bytes (real tensors; activations as storages alive after forward), the
analytic estimate, the recomputed FLOPs per step, train loss over the last steps and the
validation loss, all also as ratios to the baseline. MLflow: one parent run, one child
run per combination. On a GPU it also reports peak CUDA memory.

The layer-dropping comparison trains layerdrop for N steps and the baseline at equal
FLOPs and at equal wall-clock, each with a learning rate that fully decays within its
own budget (the comparison under which published layer-dropping gains have vanished).
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass
from typing import Iterator

import torch

from raydrat import tracking
from raydrat.bench.layertime import LayerStackTimer
from raydrat.bench.overhead import _batches
from raydrat.bench.report import print_table, write_json
from raydrat.config import RaydratConfig, config_from_dict
from raydrat.core.data.blocks import iter_blocks_local
from raydrat.efficiency import resolve_runtime
from raydrat.memory import activation_plan_bounds, estimate_memory, flop_counter, grad_bytes, optimizer_state_bytes, param_bytes, saved_activation_bytes
from raydrat.model.budget import solve_budget
from raydrat.policy import EfficiencyPolicy
from raydrat.train import metrics as M
from raydrat.train.loop import build_model
from raydrat.train.optim import build_optimizer, lr_at, set_lr
from raydrat.train.step import evaluate, train_step


def combinations(cfg: RaydratConfig) -> list[tuple[str, list[str]]]:
    """The shipped list. The budget is set halfway between full recomputation and none, and
    (``_low``) at 35% of the way, where storing branches in their order (attention, MLP,
    attention, ...) is several percent worse than the optimum on the demo model: the gates
    have to learn which branches to store."""
    lo, hi = activation_plan_bounds(cfg.model_copy(update={"train": cfg.train.model_copy(update={"device": "cpu"})}))
    budget = f"{(lo + 0.5 * (hi - lo)) / 2**20:.4f}"
    budget_low = f"{(lo + 0.35 * (hi - lo)) / 2**20:.4f}"
    return [
        ("baseline", []),
        ("bf16", ["train.precision=bf16"]),
        ("adamw_fused", ["optim.name=adamw_fused"]),
        ("adamw8bit", ["optim.name=adamw8bit"]),
        ("full_recompute", ["train.checkpointing=full"]),
        ("adamw8bit+full", ["optim.name=adamw8bit", "train.checkpointing=full"]),
        ("gated_lam0.01", ["train.checkpointing=gated", "gates.lam=0.01", "gates.mu=0.01"]),
        ("gated_lam0.1", ["train.checkpointing=gated", "gates.lam=0.1", "gates.mu=0.01"]),
        ("gated_at_budget", ["train.checkpointing=gated", f"gates.memory_budget_mb={budget}"]),
        ("budget", ["train.checkpointing=budget", f"recompute.budget_mb={budget}"]),
        ("gated_at_budget_low", ["train.checkpointing=gated", f"gates.memory_budget_mb={budget_low}"]),
        ("budget_low", ["train.checkpointing=budget", f"recompute.budget_mb={budget_low}"]),
        ("layerdrop0.5", ["slots.mode=layerdrop", "slots.keep=0.5"]),
        ("progressive", ["slots.mode=progressive"]),
        ("compile", ["train.compile=default"]),
        ("bf16+8bit+full+layerdrop", ["train.precision=bf16", "optim.name=adamw8bit", "train.checkpointing=full", "slots.mode=layerdrop", "slots.keep=0.5"]),
    ]


@dataclass
class Data:
    train: list[torch.Tensor]
    val: list[torch.Tensor]


def load_data(cfg: RaydratConfig, steps: int) -> Data:
    tc = cfg.train
    need = steps * tc.grad_accum * tc.batch_size
    blocks = iter_blocks_local(cfg.data, cfg.model.seq_len, cfg.model.vocab_size, "train")
    train = _batches(list(itertools.islice(blocks, need)), tc.batch_size)
    val_blocks = iter_blocks_local(cfg.data, cfg.model.seq_len, cfg.model.vocab_size, "val")
    val = _batches(list(itertools.islice(val_blocks, tc.eval_batches * tc.batch_size)), tc.batch_size)
    if not train or not val:
        raise RuntimeError("corpus too small for the benchmark: lower train.batch_size")
    return Data(train, val)


@dataclass
class Session:
    """One combination's model, policy, optimizer, data stream and layer-stack timer."""

    cfg: RaydratConfig
    device: torch.device
    model: torch.nn.Module
    policy: EfficiencyPolicy
    optimizer: torch.optim.Optimizer
    stream: Iterator[torch.Tensor]
    timer: LayerStackTimer | None
    steady_s: float = 0.0
    """Wall seconds of the steps after the first (timed by :meth:`step`)."""

    @classmethod
    def start(cls, cfg: RaydratConfig, data: Data) -> "Session":
        tc = cfg.train
        torch.set_num_threads(max(1, int(cfg.scaling.cpus_per_worker)))
        device = torch.device("cuda" if torch.cuda.is_available() and tc.device != "cpu" else "cpu")
        runtime = resolve_runtime(cfg, device)
        model = build_model(cfg, device)
        policy = EfficiencyPolicy(cfg, model, device, runtime.precision)
        optimizer = build_optimizer(model, cfg.optim)
        timer = LayerStackTimer(model) if tc.compile == "off" else None  # hooks break compiled graphs
        return cls(cfg, device, model, policy, optimizer, itertools.cycle(data.train), timer)

    def step(self, step: int) -> tuple[torch.Tensor, dict]:
        """One training step (plan, train_step, record); the first is warm-up, untimed."""
        tc = self.cfg.train
        t0 = time.perf_counter()
        set_lr(self.optimizer, lr_at(step, self.cfg.optim, tc.steps))
        micro = [next(self.stream).to(self.device) for _ in range(tc.grad_accum)]
        plan = self.policy.plan(step, micro[0])
        if self.timer is not None:
            self.timer.enabled = step > 0
        loss, _ = train_step(self.model, self.optimizer, micro, self.cfg.optim.grad_clip, hooks=plan)
        if self.timer is not None:
            self.timer.enabled = False
        values = self.policy.record(step, loss)
        if step > 0:
            self.steady_s += time.perf_counter() - t0
        return loss, values

    def throughput(self) -> dict:
        """Steady tokens/s of the whole step and of the layer stack, seconds per step of each."""
        tc = self.cfg.train
        steady = tc.steps - 1
        tokens = tc.batch_size * tc.grad_accum * self.cfg.model.seq_len * steady
        layer_s = self.timer.total_s if self.timer is not None and steady > 0 else float("nan")
        nan = float("nan")
        return {
            "tokens_per_s": tokens / self.steady_s if self.steady_s > 0 else nan,
            "layer_tokens_per_s": tokens / layer_s if layer_s > 0 else nan,
            "layer_s_per_step": layer_s / steady if steady > 0 else nan,
            "outside_layers_s_per_step": (self.steady_s - layer_s) / steady if steady > 0 else nan,
        }


def run_one(cfg: RaydratConfig, data: Data) -> dict:
    """Train ``cfg`` for ``cfg.train.steps`` on ``data``; measure everything."""
    tc = cfg.train
    s = Session.start(cfg, data)
    device, model, policy, optimizer = s.device, s.model, s.policy, s.optimizer
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    losses, flops, active = [], [], []
    t0 = time.perf_counter()
    for step in range(tc.steps):
        loss, values = s.step(step)
        losses.append(loss)
        flops.append(values.get(M.RECOMPUTE_FLOPS, 0.0))
        active.append(values.get(M.ACTIVE_SLOTS, cfg.model.n_layer))
    wall = time.perf_counter() - t0
    speed = s.throughput()  # timed before evaluation and the memory measurements below
    if s.timer is not None:
        s.timer.remove()
    val_loss = evaluate(model, [b.to(device) for b in data.val], tc.eval_batches)
    # memory, measured on real tensors: activations averaged over a few plans
    tokens = data.train[0].to(device)
    idx, targets = tokens[:, :-1], tokens[:, 1:]
    acts = []
    last_plan = policy.last_plan
    for k in range(4):
        plan = policy.plan(tc.steps + k)
        acts.append(saved_activation_bytes(model, idx, targets, plan.autocast(), **plan.forward_kwargs))
        model.zero_grad(set_to_none=True)
    with policy.plan(tc.steps).autocast():
        _, loss = model(idx, targets)
    loss.backward()
    grads = grad_bytes(model)
    model.zero_grad(set_to_none=True)
    est = estimate_memory(cfg, device=device.type)
    rec = {
        **speed,
        "wall_s": wall,
        "param_bytes": param_bytes(model),
        "grad_bytes": grads,
        "optimizer_bytes": optimizer_state_bytes(optimizer),
        "activation_bytes": int(sum(acts) / len(acts)),
        "estimated_bytes": est.total_bytes,
        "estimated_activation_bytes": est.saved_bytes,
        "recompute_flops_per_step": sum(flops) / len(flops),
        "mean_active_layers": sum(active) / len(active),
        "loss": float(torch.stack(losses[-5:]).mean()),
        "val_loss": val_loss,
        "steps": tc.steps,
    }
    rec["activation_bytes_max"] = max(acts)
    rec.update(budget_record(cfg, policy, last_plan))
    if device.type == "cuda":
        rec["cuda_peak_bytes"] = torch.cuda.max_memory_allocated()
    return rec


def budget_record(cfg: RaydratConfig, policy: EfficiencyPolicy, plan) -> dict:
    """For a run with an activation budget (gated at a budget, or the budget optimum): the
    budget, the last plan's bytes and recompute FLOPs (from the measured costs) and the
    exact optimum at the same budget (``solve_budget`` over the same costs)."""
    mode = cfg.train.checkpointing
    budget_mb = cfg.gates.memory_budget_mb if mode == "gated" else cfg.recompute.budget_mb if mode == "budget" else None
    if budget_mb is None or policy.costs is None or plan is None:
        return {}
    budget = int(budget_mb * 2**20)
    best = solve_budget(policy.costs, budget - policy.outside_bytes)
    return {
        "budget_bytes": budget,
        "plan_activation_bytes": policy.plan_bytes(plan),
        "plan_recompute_flops": policy.plan_recompute_flops(plan),
        "optimum_activation_bytes": policy.outside_bytes + best.stored_bytes,
        "optimum_recompute_flops": best.recompute_flops,
    }


def interleaved_throughput(cfg: RaydratConfig, data: Data, name: str, overrides: list[str]) -> dict:
    """The baseline and one combination trained step by step in turn (order alternating
    every step), so both see the same machine load: whole-step and layer-stack tokens/s of
    each, and their ratios. The side-by-side figure for a noisy, shared machine."""
    base = Session.start(cfg, data)
    other = Session.start(config_from_dict(cfg.to_dict(), overrides, origin=f"combination {name}"), data)
    for step in range(cfg.train.steps):
        for s in (base, other) if step % 2 == 0 else (other, base):
            s.step(step)
    b, o = base.throughput(), other.throughput()
    for s in (base, other):
        if s.timer is not None:
            s.timer.remove()
    return {"name": name, "baseline": b, name: o,
            "tokens_per_s_ratio": o["tokens_per_s"] / b["tokens_per_s"],
            "layer_tokens_per_s_ratio": o["layer_tokens_per_s"] / b["layer_tokens_per_s"]}


def layer_flops(cfg: RaydratConfig) -> tuple[float, float]:
    """(FLOPs of one training step outside the layers, FLOPs per active layer)."""
    model = build_model(cfg.model_copy(update={"train": cfg.train.model_copy(update={"compile": "off"})}), torch.device("cpu"))
    tokens = torch.randint(0, cfg.model.vocab_size, (cfg.train.batch_size, cfg.model.seq_len + 1))

    def step_flops(slots):
        counter = flop_counter()
        with counter:
            _, loss = model(tokens[:, :-1], tokens[:, 1:], active_slots=slots)
            loss.backward()
        return counter.get_total_flops()

    outside = step_flops([])
    return outside, (step_flops(None) - outside) / cfg.model.n_layer


def layerdrop_comparison(cfg: RaydratConfig, data: Data, ld: dict, base: dict) -> list[dict]:
    """Val loss of layerdrop vs the baseline at equal FLOPs and equal wall-clock, each
    baseline's LR schedule decaying fully within its own (shorter) budget."""
    steps = cfg.train.steps
    outside, per_layer = layer_flops(cfg)
    ld_flops = steps * (outside + per_layer * ld["mean_active_layers"])
    full_step = outside + per_layer * cfg.model.n_layer
    equal_flops = max(2, round(ld_flops / full_step))
    equal_wall = max(2, min(steps, round(ld["wall_s"] / (base["wall_s"] / steps))))
    rows = [{"name": "layerdrop0.5", "steps": steps, "val_loss": ld["val_loss"], "flops": ld_flops, "wall_s": ld["wall_s"]},
            {"name": "baseline, same steps", "steps": steps, "val_loss": base["val_loss"], "flops": steps * full_step, "wall_s": base["wall_s"]}]
    for label, n in (("baseline, equal FLOPs", equal_flops), ("baseline, equal wall-clock", equal_wall)):
        c = cfg.model_copy(deep=True)
        c.train.steps = n
        c.optim.warmup_steps = min(cfg.optim.warmup_steps, max(0, n - 1)) * n // steps
        r = run_one(c, data)
        rows.append({"name": label, "steps": n, "val_loss": r["val_loss"], "flops": n * full_step, "wall_s": r["wall_s"]})
    return rows


def run_combos(cfg: RaydratConfig, json_path: str | None = None, only: list[str] | None = None) -> list[dict]:
    cfg = cfg.model_copy(deep=True)
    cfg.train.device = "cpu" if not torch.cuda.is_available() else cfg.train.device
    base_dict = cfg.to_dict()
    combos = [c for c in combinations(cfg) if not only or c[0] in only or c[0] == "baseline"]
    data = load_data(cfg, cfg.train.steps)
    uri = parent = None
    if cfg.tracking.enabled:
        uri = tracking.resolve_tracking_uri(cfg.tracking)
        parent = tracking.start_run(uri, "raydrat-bench", f"combos-{time.strftime('%Y%m%d-%H%M%S')}", params=cfg.flat())
    records = []
    try:
        for name, overrides in combos:
            c = config_from_dict(base_dict, overrides, origin=f"combination {name}")
            print(f"[combos] {name} ({', '.join(overrides) or 'baseline'})", flush=True)
            rec = {"name": name, "overrides": overrides, **run_one(c, data)}
            records.append(rec)
            if uri:
                child = tracking.start_run(uri, "raydrat-bench", name, params=c.flat(), parent_run_id=parent)
                tracking.log_metrics(uri, child, {k: v for k, v in rec.items() if isinstance(v, (int, float))}, c.train.steps)
                tracking.end_run(uri, child)
        base = records[0]
        for rec in records:
            for key in ("tokens_per_s", "layer_tokens_per_s", "param_bytes", "grad_bytes", "optimizer_bytes", "activation_bytes", "estimated_bytes", "loss", "val_loss"):
                rec[f"{key}_ratio"] = rec[key] / base[key] if base[key] else float("nan")
            rec["estimate_error_activations"] = rec["estimated_activation_bytes"] / rec["activation_bytes"] - 1
        by_name = {r["name"]: r for r in records}
        comparison, interleaved = [], None
        if "layerdrop0.5" in by_name:
            comparison = layerdrop_comparison(cfg, data, by_name["layerdrop0.5"], base)
            print("[combos] layerdrop0.5 and baseline interleaved step by step", flush=True)
            interleaved = interleaved_throughput(cfg, data, "layerdrop0.5", by_name["layerdrop0.5"]["overrides"])
    finally:
        if uri and parent:
            tracking.end_run(uri, parent)
    mib = 2**20
    print_table(
        f"combos: {cfg.name}, {cfg.train.steps} steps, batch {cfg.train.batch_size}x{cfg.model.seq_len}, ratios to baseline",
        ["combination", "tok/s", "x", "layer tok/s", "x", "params MiB", "grads MiB", "optim MiB", "x", "act MiB", "x", "est MiB", "est act err", "recompute GFLOP/step", "loss", "val"],
        [[r["name"], f"{r['tokens_per_s']:,.0f}", f"{r['tokens_per_s_ratio']:.2f}", f"{r['layer_tokens_per_s']:,.0f}",
          f"{r['layer_tokens_per_s_ratio']:.2f}", f"{r['param_bytes'] / mib:.2f}",
          f"{r['grad_bytes'] / mib:.2f}", f"{r['optimizer_bytes'] / mib:.2f}", f"{r['optimizer_bytes_ratio']:.2f}",
          f"{r['activation_bytes'] / mib:.2f}", f"{r['activation_bytes_ratio']:.2f}", f"{r['estimated_bytes'] / mib:.1f}",
          f"{r['estimate_error_activations']:+.1%}", f"{r['recompute_flops_per_step'] / 1e9:.3f}", f"{r['loss']:.4f}", f"{r['val_loss']:.4f}"]
         for r in records],
    )
    budgeted = [r for r in records if "budget_bytes" in r]
    if budgeted:
        print_table(
            "at a memory budget: the plan's saved activations and recompute FLOPs vs the exact optimum (solve_budget) at the same budget",
            ["run", "budget MiB", "act MiB measured (max)", "plan MiB", "optimum MiB", "recompute GFLOP/step (mean)", "plan GFLOP", "optimum GFLOP", "plan / optimum"],
            [[r["name"], f"{r['budget_bytes'] / mib:.2f}", f"{r['activation_bytes_max'] / mib:.2f}", f"{r['plan_activation_bytes'] / mib:.2f}",
              f"{r['optimum_activation_bytes'] / mib:.2f}", f"{r['recompute_flops_per_step'] / 1e9:.3f}", f"{r['plan_recompute_flops'] / 1e9:.3f}",
              f"{r['optimum_recompute_flops'] / 1e9:.3f}",
              f"{r['plan_recompute_flops'] / r['optimum_recompute_flops']:.3f}" if r["optimum_recompute_flops"] else "-"]
             for r in budgeted],
        )
    print_table(
        "time in the transformer layer stack (forward + backward, recomputation included) vs the rest of the step, steady steps",
        ["combination", "layer s/step", "other s/step", "layer share", "layer tok/s", "x base"],
        [[r["name"], f"{r['layer_s_per_step']:.3f}", f"{r['outside_layers_s_per_step']:.3f}",
          f"{r['layer_s_per_step'] / (r['layer_s_per_step'] + r['outside_layers_s_per_step']):.0%}",
          f"{r['layer_tokens_per_s']:,.0f}", f"{r['layer_tokens_per_s_ratio']:.2f}"] for r in records],
    )
    if interleaved:
        name = interleaved["name"]
        print_table(
            f"{name} vs baseline, trained in turn step by step (same load on both): tokens/s",
            ["run", "whole step tok/s", "layer stack tok/s", "layer s/step", "other s/step"],
            [[n, f"{interleaved[n]['tokens_per_s']:,.0f}", f"{interleaved[n]['layer_tokens_per_s']:,.0f}",
              f"{interleaved[n]['layer_s_per_step']:.3f}", f"{interleaved[n]['outside_layers_s_per_step']:.3f}"]
             for n in ("baseline", name)]
            + [["ratio", f"{interleaved['tokens_per_s_ratio']:.2f}x", f"{interleaved['layer_tokens_per_s_ratio']:.2f}x", "", ""]],
        )
    if comparison:
        print_table("layer dropping vs a baseline whose LR fully decays in the same budget",
                    ["run", "steps", "GFLOPs", "wall s", "val loss"],
                    [[c["name"], c["steps"], f"{c['flops'] / 1e9:.1f}", f"{c['wall_s']:.1f}", f"{c['val_loss']:.4f}"] for c in comparison])
    if json_path:
        write_json(json_path, {"combinations": records, "layerdrop_comparison": comparison, "layerdrop_interleaved": interleaved})
    return records
