"""The combinations benchmark: every shipped combination builds; one run reports the
layer-stack time and, at a budget, the gates' plan next to the exact optimum."""

from __future__ import annotations

import time

import pytest
import torch

from raydrat.bench.combos import combinations, run_interleaved, run_one, speed_vs_baseline
from raydrat.bench.layertime import LayerStackTimer
from raydrat.bench.local import LocalData
from raydrat.config import config_from_dict, load_config
from raydrat.core.fit import Callback
from raydrat.core.model.build import build_model
from raydrat.core.optim import build_optimizer
from raydrat.core.runtime import resolve
from raydrat.core.step import train_step


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def small_cfg(*overrides):
    return load_config(
        "debug",
        [
            "train.device=cpu",
            "train.batch_size=4",
            "train.steps=3",
            "optim.warmup_steps=1",
            "tracking.enabled=false",
            "scaling.cpus_per_worker=1",
            *overrides,
        ],
    )


def test_every_shipped_combination_builds():
    cfg = small_cfg()
    names = []
    for name, overrides in combinations(cfg):
        c = config_from_dict(cfg.to_dict(), overrides, origin=f"combination {name}")
        names.append(name)
        resolve(c, gpus=0)  # every combination runs on this machine
        build_model(c.model)
    assert {"baseline", "gated_at_budget", "budget", "layerdrop0.5", "compile"} <= set(names)


def test_layer_stack_timer_brackets_the_layers_only_when_enabled():
    cfg = small_cfg("train.grad_accum=2")
    model = build_model(cfg.model, seed=0)
    opt = build_optimizer(model, cfg.optim)
    tokens = torch.randint(0, cfg.model.vocab_size, (4, cfg.model.seq_len + 1))
    timer = LayerStackTimer(model)
    train_step(model, opt, [tokens, tokens], 1.0)
    assert timer.total_s == 0.0  # disabled: nothing recorded
    timer.enabled = True
    t0 = time.perf_counter()
    train_step(model, opt, [tokens, tokens], 1.0)
    step_s = time.perf_counter() - t0
    assert timer.forward_s > 0 and timer.backward_s > 0
    assert timer.total_s < step_s
    timer.remove()
    assert not model._forward_pre_hooks and not any(b._forward_hooks for b in model.layers.values())


def test_gated_at_budget_row_reports_the_optimum_and_the_layer_throughput():
    cfg = small_cfg()
    budget_row = dict(combinations(cfg))["gated_at_budget"]
    c = config_from_dict(cfg.to_dict(), budget_row)
    rec = run_one(c, LocalData.load(cfg, 3))
    assert rec["activation_bytes_max"] <= rec["budget_bytes"]  # measured on real tensors
    assert rec["plan_activation_bytes"] <= rec["budget_bytes"]
    assert rec["plan_recompute_flops"] <= 1.05 * rec["optimum_recompute_flops"]
    assert rec["optimum_recompute_flops"] <= rec["recompute_flops_per_step"] <= 1.05 * rec["optimum_recompute_flops"]
    assert rec["layer_tokens_per_s"] > rec["tokens_per_s"] > 0
    # the estimate's worst case for gates at a budget is the fullest plan that fits it
    assert rec["activation_bytes_max"] <= rec["estimated_activation_bytes"] <= rec["budget_bytes"]
    # the allocator's peak in the worst sampled step: predicted for that step's plan, bounded by the worst case
    assert abs(rec["estimate_error_peak"]) <= 0.10
    assert rec["peak_bytes"] <= 1.01 * rec["estimated_worst_case_bytes"]


@pytest.mark.slow
def test_combinations_train_in_turn_and_each_estimate_predicts_its_worst_step():
    """Interleaved: every combination's steps alternate with the others' (each step's
    order is recorded by the training loop's clock), and the estimate for the worst sampled
    step's plan (layer dropping draws layers, gates learn) is within 10% of the allocator."""
    cfg = small_cfg("train.steps=4")
    names = ["baseline", "layerdrop0.5", "gated_lam0.1", "full_recompute"]
    shipped = dict(combinations(cfg))
    cfgs = [config_from_dict(cfg.to_dict(), shipped[n]) for n in names]
    data = LocalData.load(cfg, 4)
    order = []

    class Order(Callback):
        def on_step_end(self, state):
            order.append(id(state))

    recs = run_interleaved(cfgs, data, names, [Order()])
    ids = list(dict.fromkeys(order))
    assert len(ids) == 4
    first_round, second_round = order[:4], order[4:8]
    assert first_round == ids and second_round == ids[::-1]  # one step each, order reversed every round
    for name, rec in zip(names, recs):
        assert rec["timed_steps"] == 1  # 4 steps: the first two and the last sampled, one timed
        assert abs(rec["estimate_error_peak"]) <= 0.10, (name, rec["estimated_bytes"], rec["peak_bytes"])
        assert rec["peak_bytes"] <= 1.01 * rec["estimated_worst_case_bytes"], name  # a few scalars are not modelled


@pytest.mark.slow
def test_speed_against_the_baseline_is_paired_by_round_with_a_verdict():
    """Timed steps grouped into rounds of consecutive steps: each combination's round i
    against the baseline's round i, median and min-max by CPU and wall time."""
    cfg = small_cfg("train.steps=8")
    shipped = dict(combinations(cfg))
    names = ["baseline", "full_recompute"]
    cfgs = [config_from_dict(cfg.to_dict(), shipped[n]) for n in names]
    base, full = ({"name": n, **r} for n, r in zip(names, run_interleaved(cfgs, LocalData.load(cfg, 8), names)))
    assert len(base["round_cpu_s"]) == len(full["round_cpu_s"]) == 5  # 8 steps: 3 sampled, 5 timed
    got = speed_vs_baseline(full, base)
    paired = sorted(b / f for f, b in zip(full["round_cpu_s"], base["round_cpu_s"]))
    assert got["speed_vs_baseline"]["cpu"] == pytest.approx(
        {"median": paired[2], "min": paired[0], "max": paired[-1], "rounds": 5}
    )
    assert got["verdict"] in (True, False, None)
    assert got["verdict_text"].startswith(("faster", "slower", "no verdict"))
    short = speed_vs_baseline({**full, "round_cpu_s": [1.0], "round_wall_s": [1.0]}, base)
    assert short["speed_vs_baseline"] is None and "a ratio needs 5" in short["verdict_text"]
