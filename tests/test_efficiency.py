"""Recomputation gates, the budget optimum, slots, precision and the refusals do what they claim."""

from __future__ import annotations

import itertools
import random

import pytest
import torch
from torch.testing import assert_close

from raydrat.config import ConfigError, load_config
from raydrat.efficiency import UnsupportedCombination, resolve_runtime
from raydrat.memory import BranchCost, backward_flops, measure_branch_costs, optimizer_state_bytes, saved_activation_bytes
from raydrat.model.budget import solve_budget
from raydrat.model.slots import SlotController
from raydrat.policy import EfficiencyPolicy
from raydrat.train.loop import build_model
from raydrat.train.optim import build_optimizer
from raydrat.train.precision import PrecisionPolicy
from raydrat.train.step import evaluate, train_step

CPU = torch.device("cpu")

@pytest.fixture(autouse=True)
def _one_thread():
    """One intra-op thread: on a shared 2-core machine, two threads spin against each other
    (the conftest fixture restores the count)."""
    torch.set_num_threads(1)



def debug_cfg(*overrides):
    return load_config("debug", ["train.device=cpu", "model.n_layer=3", "train.batch_size=4", *overrides])


def tokens_for(cfg, seed=0, B=None):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, cfg.model.vocab_size, (B or cfg.train.batch_size, cfg.model.seq_len + 1), generator=g)


def loss_and_grads(model, tokens, **kw):
    torch.manual_seed(7)
    model.zero_grad(set_to_none=True)
    _, loss = model(tokens[:, :-1], tokens[:, 1:], **kw)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize(
    "overrides",
    [
        ["train.checkpointing=gated", "gates.decision=sample", "model.dropout=0.1", "model.attention_backend=math"],
        ["train.checkpointing=budget", "recompute.budget_mb=2.5"],
    ],
    ids=["gated", "budget"],
)
def test_gated_and_budget_match_none_and_save_predicted_bytes(overrides):
    base_cfg = debug_cfg(*overrides[2:]) if "gated" in overrides[0] else debug_cfg()
    cfg = debug_cfg(*overrides)
    plain = build_model(base_cfg, CPU).train()
    model = build_model(cfg, CPU).train()
    model.load_state_dict(plain.state_dict())
    policy = EfficiencyPolicy(cfg, model, CPU)
    tokens = tokens_for(cfg)
    torch.manual_seed(3)
    plan = policy.plan(0, tokens)
    assert 0 < sum(plan.stored) < len(plan.stored), plan.stored  # a real mix of store/recompute
    loss, grads = loss_and_grads(plain, tokens)
    loss_p, grads_p = loss_and_grads(model, tokens)
    assert_close(loss_p, loss)
    for name in grads:
        assert_close(grads_p[name], grads[name], msg=name)
    measured = saved_activation_bytes(model, tokens[:, :-1], tokens[:, 1:])
    assert measured == policy.plan_bytes(plan)
    assert measured < saved_activation_bytes(plain, tokens[:, :-1], tokens[:, 1:])
    if cfg.train.checkpointing == "budget":
        assert measured <= cfg.recompute.budget_mb * 2**20


def brute_force(costs, budget):
    best = None
    for choice in itertools.product([False, True], repeat=len(costs)):
        w = sum(c.stored_bytes for c, s in zip(costs, choice) if s)
        if w > budget:
            continue
        r = sum(c.recompute_flops for c, s in zip(costs, choice) if not s)
        if best is None or r < best:
            best = r
    return best


def test_budget_solver_matches_brute_force():
    rng = random.Random(0)
    for _ in range(60):
        n = rng.randint(1, 9)
        costs = [BranchCost(i, "attn", 0, rng.randint(1, 50), rng.randint(0, 80)) for i in range(n)]
        budget = rng.randint(0, sum(c.stored_bytes for c in costs))
        plan = solve_budget(costs, budget)
        assert plan.stored_bytes <= budget
        assert plan.stored_bytes == sum(c.stored_bytes for c, s in zip(costs, plan.stored) if s)
        assert plan.recompute_flops == brute_force(costs, budget)
    with pytest.raises(ValueError, match="below the minimum"):
        solve_budget(costs, -1)


def test_measured_recompute_flops_are_what_backward_repeats():
    cfg = debug_cfg()
    tokens = tokens_for(cfg)
    idx, targets = tokens[:, :-1], tokens[:, 1:]
    model = build_model(cfg, CPU).train()
    costs, _ = measure_branch_costs(model, idx, targets)
    flops_none = backward_flops(model, idx, targets)
    full = build_model(debug_cfg("train.checkpointing=full"), CPU).train()
    flops_full = backward_flops(full, idx, targets)
    assert flops_full - flops_none == sum(c.recompute_flops for c in costs) > 0


@pytest.mark.parametrize("lam,mu,direction", [(1.0, 0.0, -1), (0.0, 1.0, +1)])
def test_gate_probabilities_move_the_way_lambda_and_mu_push(lam, mu, direction):
    cfg = debug_cfg("train.checkpointing=gated", f"gates.lam={lam}", f"gates.mu={mu}", "train.steps=20")
    model = build_model(cfg, CPU)
    policy = EfficiencyPolicy(cfg, model, CPU)
    opt = build_optimizer(model, cfg.optim)
    p0 = policy.gates.probs().detach().clone()
    for step in range(5):
        tokens = tokens_for(cfg, seed=step)
        train_step(model, opt, [tokens], 1.0, hooks=policy.plan(step, tokens))
        policy.record(step, 0.0)
    p1 = policy.gates.probs().detach()
    assert torch.all(direction * (p1 - p0) > 0), (p0, p1)


def test_gates_at_a_budget_converge_to_the_budget_optimum():
    """A budget where storing in branch order is >5% worse than the optimum (it fits one
    attention and one MLP branch; the optimum stores all three attention branches): the
    gates end within the budget and within 5% of solve_budget's recompute FLOPs, and stay
    there while training."""
    probe = debug_cfg()
    tokens = tokens_for(probe)
    costs, outside = measure_branch_costs(build_model(probe, CPU).train(), tokens[:, :-1], tokens[:, 1:])
    attn, mlp = costs[0], costs[1]
    assert 3 * attn.stored_bytes < attn.stored_bytes + mlp.stored_bytes  # the instance is what the docstring says
    budget = outside + attn.stored_bytes + mlp.stored_bytes + 4096
    optimum = solve_budget(costs, budget - outside)

    def gated(*extra):
        cfg = debug_cfg("train.checkpointing=gated", f"gates.memory_budget_mb={budget / 2**20!r}", *extra)
        model = build_model(cfg, CPU)
        return cfg, model, EfficiencyPolicy(cfg, model, CPU)

    _, _, untrained = gated("gates.warmup_steps=0")
    naive = untrained.plan(0, tokens)  # every p = 0.5: fills in branch order
    assert untrained.plan_recompute_flops(naive) > 1.05 * optimum.recompute_flops

    cfg, model, policy = gated()
    opt = build_optimizer(model, cfg.optim)
    for step in range(3):
        plan = policy.plan(step, tokens)
        assert policy.plan_bytes(plan) <= budget
        assert policy.plan_recompute_flops(plan) <= 1.05 * optimum.recompute_flops, (plan.stored, optimum.stored)
        train_step(model, opt, [tokens], 1.0, hooks=plan)
        policy.record(step, 0.0)
    assert saved_activation_bytes(model, tokens[:, :-1], tokens[:, 1:]) <= budget  # measured on real tensors
    assert policy.gates.multiplier > 0  # the constraint is active: the multiplier holds the gates at the budget


def _policy_steps(policy, tokens, steps, losses):
    """Drive ``policy`` as the loop does, without the model's forward: plan, resource loss,
    gate step, record."""
    dummy = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    out = []
    for step in steps:
        plan = policy.plan(step, tokens)
        plan.backward(plan.add_resource_loss(torch.zeros((), requires_grad=True)))
        plan.optimizer_step(dummy)
        policy.record(step, losses[step])
        out.append((plan.active_slots, plan.stored, policy.gates.probs().tolist(), float(policy.gates.multiplier)))
    return out


@pytest.mark.parametrize("slots", [["slots.mode=layerdrop", "slots.keep=0.6"],
                                   ["slots.mode=adaptive", "slots.patience=2", "slots.plateau_tol=0.5"]],
                         ids=["layerdrop", "adaptive"])
def test_policy_state_round_trips_through_a_checkpoint(tmp_path, slots):
    """Gate logits, multiplier and costs, the gates' Adam state and the slot controller
    (RNG, adaptive counters) survive torch.save/torch.load: a restored policy plans the
    same steps as one that never stopped, without re-measuring or re-warming."""
    cfg = debug_cfg("train.checkpointing=gated", "gates.memory_budget_mb=3.5", "gates.warmup_steps=20",
                    "gates.refresh_every=4", *slots)
    tokens = tokens_for(cfg)
    losses = [3.0, 2.9, 2.9, 2.9, 2.9, 2.9, 2.9, 2.9]
    ref = EfficiencyPolicy(cfg, build_model(cfg, CPU), CPU)
    _policy_steps(ref, tokens, range(3), losses)
    torch.save(ref.state_dict(), tmp_path / "policy.pt")
    expected = _policy_steps(ref, tokens, range(3, 8), losses)

    resumed = EfficiencyPolicy(cfg, build_model(cfg, CPU), CPU)
    resumed.load_state_dict(torch.load(tmp_path / "policy.pt", weights_only=False))
    assert resumed.costs == ref.costs and resumed._measured_at == 0
    got = _policy_steps(resumed, tokens, range(3, 8), losses)
    assert got == expected
    assert [a for a, *_ in got] != [None] * 5  # slots really were planned (not all layers)
    assert resumed.slots.state_dict()["changes"] == ref.slots.state_dict()["changes"]
    for a, b in zip(resumed.gate_optimizer.state_dict()["state"].values(), ref.gate_optimizer.state_dict()["state"].values()):
        assert_close(a["exp_avg"], b["exp_avg"])


def test_layer_dropping_keeps_names_and_eval_runs_every_layer():
    cfg = debug_cfg("slots.mode=layerdrop", "slots.keep=0.5")
    model = build_model(cfg, CPU)
    names = [n for n, _ in model.named_parameters()]
    policy = EfficiencyPolicy(cfg, model, CPU)
    opt = build_optimizer(model, cfg.optim)
    calls = []
    for key, block in model.layers.items():
        block.register_forward_pre_hook(lambda *_, key=key: calls.append(key))
    seen = set()
    for step in range(8):
        plan = policy.plan(step)
        seen.add(tuple(plan.active_slots))
        train_step(model, opt, [tokens_for(cfg, step)], 1.0, hooks=plan)
    assert len(seen) > 1 and any(len(s) < cfg.model.n_layer for s in seen)
    assert [n for n, _ in model.named_parameters()] == names
    calls.clear()
    evaluate(model, [tokens_for(cfg)], 1)
    assert sorted(calls) == [str(i) for i in range(cfg.model.n_layer)]


def test_slot_controller_modes():
    prog = SlotController(load_config("debug", ["slots.mode=progressive", "slots.floor=0.4"]).slots, 4, 100)
    early, late = prog.keep_probs(0), prog.keep_probs(100)
    assert early == pytest.approx([1.0] * 4)
    assert late == sorted(late, reverse=True) and late[-1] == pytest.approx(0.4, abs=0.01)
    cfg = load_config("debug", ["model.n_layer=2", "slots.mode=adaptive", "slots.patience=3", "slots.memory_limit_mb=1"]).slots
    ada = SlotController(cfg, 2, 100)
    assert ada.plan(0) == [1]
    for _ in range(10):
        ada.observe(2.0, activation_bytes=0)  # flat loss: plateau
    assert ada.plan(10) == [0, 1]
    ada.observe(2.0, activation_bytes=2 * 2**20)  # memory pressure
    assert ada.plan(11) == [1]


@pytest.mark.parametrize("name", ["adamw", "adamw_fused", "adamw8bit", "paged_adamw8bit"])
def test_each_optimizer_trains_and_reports_its_state(name):
    cfg = debug_cfg(f"optim.name={name}", "optim.lr=3e-3")
    model = build_model(cfg, CPU)
    policy = EfficiencyPolicy(cfg, model, CPU)
    opt = build_optimizer(model, cfg.optim)
    tokens = tokens_for(cfg)
    losses = [float(train_step(model, opt, [tokens], 1.0, hooks=policy.plan(s))[0]) for s in range(12)]
    assert losses[-1] < losses[0] - 0.3, losses
    states = [v for st in opt.state.values() for v in st.values() if isinstance(v, torch.Tensor)]
    assert optimizer_state_bytes(opt) == sum(t.numel() * t.element_size() for t in states)
    eight_bit = any(t.dtype == torch.uint8 for t in states)
    assert eight_bit == name.endswith("8bit")


def test_fp16_overflow_falls_back_and_returns():
    pol = PrecisionPolicy("fp16", CPU, fallback="bf16", fallback_after=2, fallback_steps=3)
    w = torch.nn.Parameter(torch.ones(4))
    opt = torch.optim.SGD([w], lr=0.1)
    for step in range(2):
        pol.backward((w * float("inf")).sum())
        pol.optimizer_step(opt)
        opt.zero_grad()
        pol.after_step(step)
    assert pol.current == "bf16" and pol.switches == [(2, "fp16", "bf16")]
    assert torch.equal(w.detach(), torch.ones(4))  # overflow steps were skipped
    for step in range(2, 5):
        pol.after_step(step)
    assert pol.current == "fp16" and pol.switches[-1] == (5, "bf16", "fp16")


@pytest.mark.parametrize(
    "overrides,match",
    [
        (["slots.keep=0"], r"slots\.keep"),
        (["slots.keep=1.5"], r"slots\.keep"),
        (["gates.lam=-0.1"], r"gates\.lam"),
        (["train.precision=fp16"], r"train\.precision=fp16 needs a CUDA GPU"),
        (["model.attention_backend=efficient"], r"efficient has no CPU kernel"),
        (["slots.mode=fixed"], r"slots\.fixed"),
        (["slots.mode=fixed", "slots.fixed=[0,5]"], r"slots\.fixed has \[5\]"),
        (["train.checkpointing=budget", "recompute.budget_mb=0.2"], r"minimum achievable"),
        (["train.checkpointing=gated", "gates.memory_budget_mb=0.2"], r"gates\.memory_budget_mb=0\.2 is below the minimum"),
    ],
)
def test_bad_input_is_refused_before_training(overrides, match):
    with pytest.raises(ConfigError, match=match):
        load_config("debug", ["train.device=cpu", *overrides])


def test_runtime_refuses_what_the_device_cannot_run():
    with pytest.raises(UnsupportedCombination, match="fp16 needs a CUDA GPU"):
        resolve_runtime(load_config("debug", ["train.precision=fp16"]), CPU)
    with pytest.raises(UnsupportedCombination, match="attention_backend=flash cannot run on cpu"):
        resolve_runtime(load_config("debug", ["model.attention_backend=flash", "model.dropout=0.1"]), CPU)
    rt = resolve_runtime(load_config("debug", ["train.precision=auto"]), CPU)
    assert rt.precision == "fp32"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_fp16_and_flash_run_on_gpu():
    cfg = load_config("debug", ["train.precision=fp16", "model.attention_backend=flash", "train.device=cuda"])
    dev = torch.device("cuda")
    rt = resolve_runtime(cfg, dev)
    model = build_model(cfg, dev)
    policy = EfficiencyPolicy(cfg, model, dev, rt.precision)
    opt = build_optimizer(model, cfg.optim)
    loss, _ = train_step(model, opt, [tokens_for(cfg).to(dev)], 1.0, hooks=policy.plan(0))
    assert torch.isfinite(loss)
