"""Recomputation gates, the budget optimum, slots, precision and the refusals do what they claim."""

from __future__ import annotations

import itertools
import random

import pytest
import torch
from torch.testing import assert_close

from raydrat.config import ConfigError, load_config
from raydrat.core.evaluate import evaluate
from raydrat.core.model.build import build_model
from raydrat.core.optim import build_optimizer
from raydrat.core.runtime import UnsupportedCombination, resolve
from raydrat.core.step import train_step
from raydrat.core.techniques.bundle import apply_techniques, build_techniques
from raydrat.core.techniques.precision import Precision
from raydrat.core.techniques.recompute.branch_costs import BranchCost, measure_branch_costs
from raydrat.core.techniques.recompute.knapsack import solve_budget
from raydrat.core.techniques.recompute.measure import backward_flops, optimizer_state_bytes, saved_activation_bytes
from raydrat.core.techniques.recompute.wrapper import apply_recompute
from raydrat.core.techniques.slots import SlotSchedule

CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def _one_thread():
    """One intra-op thread: on a shared 2-core machine, two threads spin against each other
    (the conftest fixture restores the count)."""
    torch.set_num_threads(1)


def debug_cfg(*overrides):
    return load_config("debug", ["train.device=cpu", "model.n_layer=3", "train.batch_size=4", *overrides])


def built(cfg, device=CPU):
    """The model with the config's techniques applied, as a worker builds it."""
    model = build_model(cfg.model, seed=cfg.train.seed, device=device)
    techniques = build_techniques(cfg, resolve(cfg, gpus=int(device.type == "cuda")).precision, device)
    return apply_techniques(model, techniques), techniques


def drive(model, opt, t, step, tokens):
    """One step as ``fit`` takes it: plan slots and recomputation, the step, the updates."""
    t.before_step(step, tokens)
    loss, _ = train_step(model, opt, [tokens], 1.0, t)
    t.after_step(step, loss)
    return loss


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
        [
            "recompute.mode=gated",
            "recompute.gates.decision=sample",
            "model.dropout=0.1",
            "model.attention_backend=math",
        ],
        ["recompute.mode=budget", "recompute.budget_mb=2.5"],
    ],
    ids=["gated", "budget"],
)
def test_gated_and_budget_match_none_and_save_predicted_bytes(overrides):
    base_cfg = debug_cfg(*overrides[2:]) if "gated" in overrides[0] else debug_cfg()
    cfg = debug_cfg(*overrides)
    plain, _ = built(base_cfg)
    model, t = built(cfg)
    plain.train(), model.train()
    model.load_state_dict(plain.state_dict())
    tokens = tokens_for(cfg)
    torch.manual_seed(3)
    stored = t.recompute.plan(0, tokens)
    assert 0 < sum(stored) < len(stored), stored  # a real mix of store/recompute
    loss, grads = loss_and_grads(plain, tokens)
    loss_p, grads_p = loss_and_grads(model, tokens)
    assert_close(loss_p, loss)
    for name in grads:
        assert_close(grads_p[name], grads[name], msg=name)
    measured = saved_activation_bytes(model, tokens[:, :-1], tokens[:, 1:])
    assert measured == t.recompute.plan_bytes()
    assert measured < saved_activation_bytes(plain, tokens[:, :-1], tokens[:, 1:])
    if cfg.recompute.mode == "budget":
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
    model, _ = built(cfg)
    costs, _ = measure_branch_costs(model.train(), idx, targets)
    flops_none = backward_flops(model, idx, targets)
    per_branch = apply_recompute(build_model(cfg.model, seed=cfg.train.seed, device=CPU), "full")
    assert backward_flops(per_branch, idx, targets) - flops_none == sum(c.recompute_flops for c in costs) > 0
    # recompute.mode=full: one region per block, which also repeats the attention's output projection
    full, t = built(debug_cfg("recompute.mode=full"))
    t.recompute.plan(0, tokens)
    flops_full = backward_flops(full, idx, targets)
    assert flops_full - flops_none == t.recompute.plan_recompute_flops() > sum(c.recompute_flops for c in costs)


@pytest.mark.parametrize("lam,mu,direction", [(1.0, 0.0, -1), (0.0, 1.0, +1)])
def test_gate_probabilities_move_the_way_lambda_and_mu_push(lam, mu, direction):
    cfg = debug_cfg(
        "recompute.mode=gated",
        f"recompute.gates.memory_weight={lam}",
        f"recompute.gates.recompute_weight={mu}",
        "train.steps=20",
    )
    model, t = built(cfg)
    opt = build_optimizer(model, cfg.optim)
    p0 = t.recompute.gates.probs().detach().clone()
    for step in range(5):
        drive(model, opt, t, step, tokens_for(cfg, seed=step))
    p1 = t.recompute.gates.probs().detach()
    assert torch.all(direction * (p1 - p0) > 0), (p0, p1)


def test_gates_at_a_budget_converge_to_the_budget_optimum():
    """A budget where storing in branch order is >5% worse than the optimum (it fits one
    attention and one MLP branch; the optimum stores all three attention branches): the
    gates end within the budget and within 5% of solve_budget's recompute FLOPs, and stay
    there while training."""
    probe = debug_cfg()
    tokens = tokens_for(probe)
    costs, outside = measure_branch_costs(built(probe)[0].train(), tokens[:, :-1], tokens[:, 1:])
    attn, mlp = costs[0], costs[1]
    assert 3 * attn.stored_bytes < attn.stored_bytes + mlp.stored_bytes  # the instance is what the docstring says
    budget = outside + attn.stored_bytes + mlp.stored_bytes + 4096
    optimum = solve_budget(costs, budget - outside)

    def gated(*extra):
        cfg = debug_cfg("recompute.mode=gated", f"recompute.budget_mb={budget / 2**20!r}", *extra)
        return (cfg, *built(cfg))

    _, _, untrained = gated("recompute.gates.warmup_steps=0")
    untrained.recompute.plan(0, tokens)  # every p = 0.5: fills in branch order
    assert untrained.recompute.plan_recompute_flops() > 1.05 * optimum.recompute_flops

    cfg, model, t = gated()
    opt = build_optimizer(model, cfg.optim)
    for step in range(3):
        stored = t.recompute.plan(step, tokens)
        assert t.recompute.plan_bytes() <= budget
        assert t.recompute.plan_recompute_flops() <= 1.05 * optimum.recompute_flops, (stored, optimum.stored)
        train_step(model, opt, [tokens], 1.0, t)
        t.recompute.after_step()
    assert saved_activation_bytes(model, tokens[:, :-1], tokens[:, 1:]) <= budget  # measured on real tensors
    assert t.recompute.gates.multiplier > 0  # the constraint is active: the multiplier holds the gates at the budget


def _technique_steps(t, tokens, steps, losses):
    """Drive the techniques as ``fit`` does, without the model's forward: plan slots and
    recomputation, the gates' update, the slots' feedback."""
    out = []
    for step in steps:
        t.before_step(step, tokens)
        active, stored = t.slots.active, list(t.recompute.stored)
        t.after_step(step, losses[step])
        gates = t.recompute.gates
        out.append((active, stored, gates.probs().tolist(), float(gates.multiplier)))
    return out


@pytest.mark.parametrize(
    "slots",
    [["slots.mode=layerdrop", "slots.keep=0.6"], ["slots.mode=adaptive", "slots.patience=2", "slots.plateau_tol=0.5"]],
    ids=["layerdrop", "adaptive"],
)
def test_technique_state_round_trips_through_a_checkpoint(tmp_path, slots):
    """Gate logits, multiplier and costs, the gates' Adam state and the slot schedule
    (RNG, adaptive counters) survive torch.save/torch.load: restored techniques plan the
    same steps as ones that never stopped, without re-measuring or re-warming."""
    cfg = debug_cfg(
        "recompute.mode=gated",
        "recompute.budget_mb=3.5",
        "recompute.gates.warmup_steps=20",
        "recompute.gates.refresh_every=4",
        *slots,
    )
    tokens = tokens_for(cfg)
    losses = [3.0, 2.9, 2.9, 2.9, 2.9, 2.9, 2.9, 2.9]
    _, ref = built(cfg)
    _technique_steps(ref, tokens, range(3), losses)
    torch.save(ref.state_dict(), tmp_path / "techniques.pt")
    expected = _technique_steps(ref, tokens, range(3, 8), losses)

    _, resumed = built(cfg)
    resumed.load_state_dict(torch.load(tmp_path / "techniques.pt", weights_only=False))
    assert resumed.recompute.costs == ref.recompute.costs and resumed.recompute.level.measured.measured_at == 0
    got = _technique_steps(resumed, tokens, range(3, 8), losses)
    assert got == expected
    assert [a for a, *_ in got] != [None] * 5  # slots really were planned (not all layers)
    assert resumed.slots.state_dict()["changes"] == ref.slots.state_dict()["changes"]
    for a, b in zip(
        resumed.recompute.optimizer.state_dict()["state"].values(),
        ref.recompute.optimizer.state_dict()["state"].values(),
    ):
        assert_close(a["exp_avg"], b["exp_avg"])


def test_layer_dropping_keeps_names_and_eval_runs_every_layer():
    cfg = debug_cfg("slots.mode=layerdrop", "slots.keep=0.5")
    model, t = built(cfg)
    names = [n for n, _ in model.named_parameters()]
    opt = build_optimizer(model, cfg.optim)
    calls = []
    for key, block in model.layers.items():
        block.register_forward_pre_hook(lambda *_, key=key: calls.append(key))
    seen = set()
    for step in range(8):
        drive(model, opt, t, step, tokens_for(cfg, step))
        seen.add(tuple(t.slots.active))
    assert len(seen) > 1 and any(len(s) < cfg.model.n_layer for s in seen)
    assert [n for n, _ in model.named_parameters()] == names
    calls.clear()
    evaluate(model, [tokens_for(cfg)], 1)
    assert sorted(calls) == [str(i) for i in range(cfg.model.n_layer)]


def test_slot_schedule_modes():
    prog = SlotSchedule(load_config("debug", ["slots.mode=progressive", "slots.floor=0.4"]).slots, 4, 100)
    early, late = prog.keep_probs(0), prog.keep_probs(100)
    assert early == pytest.approx([1.0] * 4)
    assert late == sorted(late, reverse=True) and late[-1] == pytest.approx(0.4, abs=0.01)
    cfg = load_config(
        "debug", ["model.n_layer=2", "slots.mode=adaptive", "slots.patience=3", "slots.memory_limit_mb=1"]
    ).slots
    ada = SlotSchedule(cfg, 2, 100)
    assert ada.plan(0) == [1]
    for _ in range(10):
        ada.observe(2.0, activation_bytes=0)  # flat loss: plateau
    assert ada.plan(10) == [0, 1]
    ada.observe(2.0, activation_bytes=2 * 2**20)  # memory pressure
    assert ada.plan(11) == [1]


@pytest.mark.parametrize("name", ["adamw", "adamw_fused", "adamw8bit", "paged_adamw8bit"])
def test_each_optimizer_trains_and_reports_its_state(name):
    cfg = debug_cfg(f"optim.name={name}", "optim.lr=3e-3")
    model, t = built(cfg)
    opt = build_optimizer(model, cfg.optim)
    tokens = tokens_for(cfg)
    losses = [float(drive(model, opt, t, s, tokens)) for s in range(12)]
    assert losses[-1] < losses[0] - 0.3, losses
    states = [v for st in opt.state.values() for v in st.values() if isinstance(v, torch.Tensor)]
    unique = {t.untyped_storage().data_ptr(): t.numel() * t.element_size() for t in states}  # shared maps once
    assert optimizer_state_bytes(opt) == sum(unique.values())
    eight_bit = any(t.dtype == torch.uint8 for t in states)
    assert eight_bit == name.endswith("8bit")


def test_each_technique_is_built_from_its_own_section():
    cfg = debug_cfg(
        "precision.mode=bf16",
        "precision.fallback=fp32",
        "precision.fallback_after=2",
        "precision.fallback_steps=5",
        "compile.mode=reduce-overhead",
        "slots.mode=layerdrop",
    )
    t = build_techniques(cfg, "bf16", CPU, world_size=2)
    p = t.precision
    assert (p.base, p.fallback, p.fallback_after, p.fallback_steps) == ("bf16", "fp32", 2, 5)
    assert t.compile.mode == "reduce-overhead" and t.slots.cfg.mode == "layerdrop"
    assert t.sync.mode == "ddp" and t.sync.cfg.find_unused_parameters  # slots skip layers: DDP must know
    assert build_techniques(debug_cfg(), "fp32", CPU, world_size=1).sync.mode == "none"


def test_fp16_overflow_falls_back_and_returns():
    pol = Precision("fp16", CPU, fallback="bf16", fallback_after=2, fallback_steps=3)
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
        (["recompute.mode=gated", "recompute.gates.memory_weight=-0.1"], r"recompute\.gates\.memory_weight"),
        (["slots.mode=fixed"], r"slots\.fixed"),
        (["slots.mode=fixed", "slots.fixed=[0,5]"], r"slots\.fixed has \[5\]"),
        (["recompute.budget_mb=2"], r"recompute\.budget_mb=2 has no effect with recompute\.mode=none"),
        (["recompute.mode=budget"], r"recompute\.mode=budget needs recompute\.budget_mb"),
        (["recompute.gates.lr=0.5"], r"recompute\.gates\.lr only apply to recompute\.mode=gated"),
        (["train.checkpointing=full"], r"train\.checkpointing: renamed; use recompute\.mode"),
        (["gates.lam=0.1"], r"gates\.lam: renamed; use recompute\.gates\.memory_weight"),
        (["gates.memory_budget_mb=3"], r"gates\.memory_budget_mb: renamed; use recompute\.budget_mb"),
    ],
)
def test_bad_config_is_refused_naming_the_key(overrides, match):
    with pytest.raises(ConfigError, match=match):
        load_config("debug", ["train.device=cpu", *overrides])


@pytest.mark.parametrize(
    "overrides,match",
    [
        (["precision.mode=fp16"], r"precision\.mode=fp16 needs a CUDA GPU"),
        (["model.attention_backend=efficient"], r"efficient has no CPU kernel"),
        (["model.attention_backend=flash", "model.dropout=0.1"], r"flash has no CPU kernel with attention dropout"),
        (
            ["recompute.mode=budget", "recompute.budget_mb=0.2"],
            r"recompute\.budget_mb=0\.2 is below the minimum achievable",
        ),
        (
            ["recompute.mode=gated", "recompute.budget_mb=0.2"],
            r"recompute\.budget_mb=0\.2 is below the minimum achievable",
        ),
        (["scaling.use_gpu=true"], r"scaling\.use_gpu=true but no GPU is available"),
    ],
)
def test_runtime_refuses_what_this_machine_cannot_run(overrides, match):
    """What needs the machine or the model is refused by the one runtime resolution (at the
    entry point, before any work), not by config validation."""
    cfg = load_config("debug", overrides)  # valid as a config
    with pytest.raises(UnsupportedCombination, match=match):
        resolve(cfg, gpus=0)


def test_runtime_resolves_auto_choices_once():
    rt = resolve(load_config("debug", ["precision.mode=auto"]), gpus=0)
    assert (rt.device_type, rt.precision) == ("cpu", "fp32")
    assert rt.estimate.total_bytes > 0 and rt.estimate.detail["precision"] == "fp32"
    assert resolve(load_config("debug"), gpus=2).device_type == "cuda"  # a cluster with GPUs: auto uses them
    with pytest.raises(UnsupportedCombination, match="attention_backend=flash cannot run on cpu"):
        rt.__class__("cpu", "fp32", "flash", rt.estimate).verify(CPU, dropout=0.1)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_fp16_and_flash_run_on_gpu():
    cfg = load_config("debug", ["precision.mode=fp16", "model.attention_backend=flash", "train.device=cuda"])
    dev = torch.device("cuda")
    model, t = built(cfg, dev)
    opt = build_optimizer(model, cfg.optim)
    loss = drive(model, opt, t, 0, tokens_for(cfg).to(dev))
    assert torch.isfinite(loss)
