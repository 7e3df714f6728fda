"""Op-level recomputation plans: exact, within their budget by the allocator, applied
from outside; the pseudo-polynomial knapsack is exact; impossible budgets name the minimum;
the techniques (``recompute.granularity: op``) run through the fit loop."""

from __future__ import annotations

import gc
import io
import itertools
import random

import pytest
import torch
import torch._dynamo
from oplevel import fresh
from torch.testing import assert_close

from raydrat.bench.local import LocalData, LocalRun
from raydrat.config import ConfigError, load_config
from raydrat.core import metrics as M
from raydrat.core.fit import Callback
from raydrat.core.memory.activations import activation_plan_bounds
from raydrat.core.memory.peak import PeakMemory
from raydrat.core.model.transformer import GPT
from raydrat.core.step import train_step
from raydrat.core.techniques.recompute import op_plan as P
from raydrat.core.techniques.recompute.branch_costs import measure_branch_costs
from raydrat.core.techniques.recompute.granularity import OpGranularity
from raydrat.core.techniques.recompute.knapsack import BudgetBelowMinimum, solve_groups
from raydrat.core.techniques.recompute.op_apply import PlanRegions
from raydrat.core.techniques.recompute.planners import BudgetRecompute, GatedRecompute
from raydrat.core.techniques.recompute.wrapper import CheckpointWrapper, apply_recompute, iter_branches, wrap_blocks

CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def planned(model, plan):
    """``model`` wrapped once from outside with ``plan`` applied: the module to train."""
    regions = PlanRegions(model, plan.compiled)
    regions.apply(plan)
    return regions.module


def loss_and_grads(model, tokens):
    model.zero_grad(set_to_none=True)
    _, loss = model(tokens[:, :-1], tokens[:, 1:])
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads


def saved_bytes(model, tokens):
    """Allocator-measured (profiler memory events, PeakMemory): bytes the forward phase of
    one training step leaves allocated for backward. The allocator's events are the whole
    process's: garbage an earlier test left is freed first, and the cyclic collector stays
    off during the step, so no unrelated tensor is freed inside the measurement."""
    gc.collect()
    gc.disable()
    try:
        peak = PeakMemory(CPU, first_steps=1)
        with peak.step(0):
            train_step(model, torch.optim.SGD(model.parameters(), lr=0.0), [tokens], 0.0)
        peak.finish()
    finally:
        gc.enable()
    return peak.steps[0].saved_bytes


def plans(costs):
    half = costs.none_bytes // 2
    every_other = [i % 2 == 0 for i in range(len(costs.items(True)))]
    return {
        "full": P.plan_full(costs),
        "eager_budget": P.plan_budget(costs, half),
        "compiled_budget": P.plan_budget(costs, half, compiled=True),
        "compiled_every_other": P.plan_from_stored(costs, every_other, compiled=True),
        "eager_gated": P.gate_plan(costs, half)[0],
    }


@pytest.mark.parametrize("kind", ["full", "eager_budget", "compiled_budget", "compiled_every_other", "eager_gated"])
def test_op_plan_gives_the_loss_and_gradients_of_no_recompute(op_setup, kind):
    mcfg, tokens, costs = op_setup
    plain = fresh(mcfg)
    plan = plans(costs)[kind]
    model = planned(fresh(mcfg), plan)
    assert list(model.state_dict()) == list(plain.state_dict())
    if kind == "eager_budget":  # a real mix: op-level regions that store some outputs and recompute others
        assert plan.saved and len(plan.plain_blocks) + len(plan.full_blocks) < mcfg.n_layer
        assert any(isinstance(b, CheckpointWrapper) and b.context_fn is not None for b in model.layers.values())
    loss, grads = loss_and_grads(plain, tokens)
    loss_p, grads_p = loss_and_grads(model, tokens)
    assert_close(loss_p, loss)
    for name in grads:
        assert_close(grads_p[name], grads[name], msg=name)


def test_costs_and_plans_predict_what_the_allocator_measures(op_setup):
    """Saved bytes from PyTorch's allocator: a plain forward equals the measured costs'
    total; each budget plan stays within its budget and leaves exactly the predicted bytes
    (a compiled plan run eagerly also keeps its one region's RNG state)."""
    mcfg, tokens, costs = op_setup
    none = saved_bytes(fresh(mcfg), tokens)
    assert costs.none_bytes == costs.outside_bytes + sum(costs.block_bytes)
    # the step's forward phase holds a few bytes the op recorder does not see (a 0-d
    # temporary of the loss): one constant offset, the same under every plan
    offset = none - costs.none_bytes
    assert 0 <= offset <= 64
    for fraction in (0.3, 0.5, 0.8):
        budget = int(fraction * none)
        for compiled in (False, True):
            plan = P.plan_budget(costs, budget, compiled=compiled)
            measured = saved_bytes(planned(fresh(mcfg), plan), tokens)
            assert plan.predicted_bytes <= budget, (fraction, compiled)
            assert measured == offset + plan.predicted_bytes + (costs.region_bytes if compiled else 0), (
                fraction,
                compiled,
            )
            assert measured < none


def test_both_granularities_measure_through_one_recorder_and_agree_with_the_allocator(op_setup):
    """The branch costs and the op costs come from the same recorder, so they count the
    same storages: in total, and per block (the block's op-level bytes are its two
    branches' stored bytes plus the two residual streams it writes: the MLP branch's input
    and the block's output). Both agree with PyTorch's allocator: recomputing one branch
    frees exactly its stored bytes, recomputing one block exactly its op-level bytes beyond
    what a region keeps (each region also keeps the CPU RNG state it replays)."""
    mcfg, tokens, costs = op_setup
    idx, targets = tokens[:, :-1], tokens[:, 1:]
    branches, outside = measure_branch_costs(fresh(mcfg), idx, targets)
    assert outside + sum(b.stored_bytes for b in branches) == costs.none_bytes
    for layer in range(mcfg.n_layer):
        attn, mlp = branches[2 * layer], branches[2 * layer + 1]
        assert (attn.layer, attn.kind, mlp.layer, mlp.kind) == (layer, "attn", layer, "mlp")
        assert (
            attn.stored_bytes + mlp.stored_bytes + mlp.input_bytes + costs.anchor_bytes[layer]
            == (costs.block_bytes[layer])
        )
    plain = saved_bytes(fresh(mcfg), tokens)
    for i, (layer, kind, _) in enumerate(iter_branches(fresh(mcfg))):
        model = apply_recompute(fresh(mcfg), "full")
        for j, (*_, wrapper) in enumerate(iter_branches(model)):
            wrapper.enabled = i == j
        assert plain - saved_bytes(model, tokens) == branches[i].stored_bytes - costs.region_bytes, (layer, kind)
    for layer in range(mcfg.n_layer):
        model = fresh(mcfg)
        wrap_blocks(model, enabled=False)[layer].enabled = True
        assert plain - saved_bytes(model, tokens) == costs.block_bytes[layer] - costs.region_keep(layer), layer


class _Checkpointed(torch.nn.Module):
    def __init__(self, block):
        super().__init__()
        self.block = block

    def forward(self, x):
        return torch.utils.checkpoint.checkpoint(self.block, x, use_reentrant=False)


def test_full_is_one_region_per_block(op_setup):
    """``full`` keeps what torch.utils.checkpoint per block keeps, less than per-branch
    checkpointing (which keeps both branch inputs)."""
    mcfg, tokens, costs = op_setup
    per_block = fresh(mcfg)
    for key, block in list(per_block.layers.items()):
        per_block.layers[key] = _Checkpointed(block)
    full = saved_bytes(planned(fresh(mcfg), P.plan_full(costs)), tokens)
    assert full == saved_bytes(per_block, tokens)
    assert 0 <= full - P.plan_full(costs).predicted_bytes <= 64  # the step's constant offset (above)
    assert full < saved_bytes(apply_recompute(fresh(mcfg), "full"), tokens)


def test_plans_are_applied_from_outside_and_removable(op_setup):
    """Plans switch wrappers put around the blocks (and, compiled, around the model) once:
    names, ``state_dict`` keys and attributes read through, nothing of the model replaced."""
    mcfg, tokens, costs = op_setup
    model = fresh(mcfg)
    blocks = list(model.layers.values())
    keys = list(model.state_dict())
    for compiled in (False, True):
        regions = PlanRegions(model, compiled)
        for plan in plans(costs).values():
            if plan.compiled and not compiled:
                with pytest.raises(ValueError, match="compiled=True"):
                    regions.apply(plan)
                continue
            regions.apply(plan)
            module = regions.module
            assert regions.plan is plan and list(module.state_dict()) == keys
            assert module.cfg is model.cfg and "forward" not in model.__dict__
            assert [n for n, _ in module.named_parameters()] == [n for n, _ in model.named_parameters()]
        assert regions.remove() is model
        assert list(model.layers.values()) == blocks
    apply_recompute(model, "full")
    with pytest.raises(ValueError, match="apply_recompute"):
        PlanRegions(model)


def test_a_plan_refuses_a_forward_it_was_not_measured_for(op_setup):
    mcfg, tokens, costs = op_setup
    plan = P.plan_budget(costs, costs.none_bytes // 2, compiled=True)
    model = planned(fresh(mcfg), plan)
    with pytest.raises(RuntimeError, match="measure the costs again"):
        model(tokens[:2, :-1], tokens[:2, 1:])


def test_a_compiled_plans_measurement_leaves_out_eager_sacs_own_time(op_setup):
    """Only eager plans weigh SAC's per-op time: a compiled granularity does not measure it."""
    mcfg, tokens, _ = op_setup
    for compiled in (False, True):
        level = OpGranularity(compiled)
        level.wrap(fresh(mcfg))
        level.measure(0, tokens)
        overheads = level.costs.sac_op_overhead_s + level.costs.sac_save_overhead_s
        assert (overheads > 0) is not compiled


def test_a_budget_below_the_minimum_names_the_minimum(op_setup):
    _, _, costs = op_setup
    for compiled in (False, True):
        minimum = P.minimum_bytes(costs, compiled)
        with pytest.raises(BudgetBelowMinimum, match=f"{minimum / 2**20:.3f} MiB") as err:
            P.plan_budget(costs, minimum - 1, compiled=compiled)
        assert err.value.minimum_bytes == minimum
        assert P.plan_budget(costs, minimum, compiled=compiled).predicted_bytes == minimum


def brute_force(groups, budget):
    best = None
    for choice in itertools.product(*(range(len(g)) for g in groups)):
        if sum(g[k][0] for g, k in zip(groups, choice)) <= budget:
            cost = sum(g[k][1] for g, k in zip(groups, choice))
            best = cost if best is None else min(best, cost)
    return best


def test_knapsack_agrees_with_brute_force_on_random_instances():
    rng = random.Random(0)
    for trial in range(150):
        groups = [
            [(rng.randint(0, 60), rng.randint(0, 50)) for _ in range(rng.randint(1, 3))]
            for _ in range(rng.randint(1, 6))
        ]
        lo = sum(min(b for b, _ in g) for g in groups)
        hi = sum(max(b for b, _ in g) for g in groups)
        budget = rng.randint(lo, hi)
        exact = solve_groups(groups, budget, resolution=1)
        assert exact.cost == brute_force(groups, budget), (trial, groups, budget)
        assert exact.nbytes == sum(g[k][0] for g, k in zip(groups, exact.choices)) <= budget
        coarse = solve_groups(groups, budget, resolution=8)  # bytes rounded up to 8-byte buckets
        assert coarse.nbytes <= budget
        slack = budget - 8 * len(groups)
        if slack >= lo:
            assert coarse.cost <= brute_force(groups, slack), (trial, groups, budget)
    with pytest.raises(BudgetBelowMinimum, match="minimum 7 bytes"):
        solve_groups([[(3, 0.0), (9, 1.0)], [(4, 2.0)]], 6)


# --------------------------------------------------------------------------------------
# the technique (recompute.granularity: op) through the fit loop
# --------------------------------------------------------------------------------------


def op_cfg(*overrides):
    return load_config(
        "debug",
        [
            "train.device=cpu",
            "model.n_layer=2",
            "train.batch_size=4",
            "train.steps=2",
            "train.eval_every=100",
            "train.log_every=1",
            "optim.warmup_steps=0",
            *overrides,
        ],
    )


class _Losses(Callback):
    def __init__(self):
        self.losses = []

    def on_log(self, state, values):
        self.losses.append(values[M.TRAIN_LOSS])


def run_two_steps(cfg, data):
    losses = _Losses()
    run = LocalRun.start(cfg, data, [losses], sample_steps=2).run()
    return run, losses.losses


@pytest.mark.parametrize("mode", ["budget", "gated"])
def test_op_technique_trains_like_none_within_its_budget(mode):
    """Through iter_fit: the same losses as no recompute (recomputation is exact), and the
    allocator-measured saved bytes of each step within recompute.budget_mb."""
    base = op_cfg()
    data = LocalData.random(base, steps=2)
    none_run, none_losses = run_two_steps(base, data)
    none_saved = none_run.peak.steps[1].saved_bytes
    budget_mb = 0.5 * none_saved / 2**20
    run, losses = run_two_steps(
        op_cfg(f"recompute.mode={mode}", "recompute.granularity=op", f"recompute.budget_mb={budget_mb!r}"), data
    )
    planner = run.techniques.recompute
    plan = planner.current
    assert planner.granularity == "op" and plan.predicted_bytes <= budget_mb * 2**20
    assert len(plan.plain_blocks) < base.model.n_layer  # something is recomputed
    assert_close(torch.tensor(losses), torch.tensor(none_losses))
    for step in (0, 1):
        assert run.peak.steps[step].saved_bytes <= budget_mb * 2**20 < none_saved


def test_op_budget_below_the_minimum_names_it(op_setup):
    """Refused twice over: before the run by the analytic floor (every block recomputed),
    and by the planner against the measured minimum; each names the minimum, and a budget
    at the measured minimum plans."""
    mcfg, tokens, costs = op_setup
    cfg = op_cfg("recompute.mode=budget", "recompute.granularity=op", "recompute.budget_mb=0.2")
    with pytest.raises(
        ConfigError, match=r"recompute\.budget_mb=0\.2 is below the minimum achievable (\d+\.\d+) MB"
    ) as err:
        LocalRun.start(cfg, LocalData.random(cfg, steps=2), sample_steps=0)
    analytic = float(err.value.args[0].split("minimum achievable ")[1].split(" MB")[0]) * 2**20
    measured = P.minimum_bytes(costs, compiled=False)
    assert abs(analytic - measured) <= 0.10 * measured, (analytic, measured)
    compiled_floor, _ = activation_plan_bounds(
        op_cfg("recompute.mode=budget", "recompute.granularity=op", "recompute.budget_mb=1", "compile.mode=default"),
        "cpu",
        "fp32",
    )
    measured = P.minimum_bytes(costs, compiled=True)
    assert abs(compiled_floor - measured) <= 0.10 * measured, (compiled_floor, measured)
    for compiled in (False, True):
        minimum = P.minimum_bytes(costs, compiled)
        planner = BudgetRecompute(mcfg.n_layer, OpGranularity(compiled, costs=costs), (minimum - 1) / 2**20)
        planner.apply(fresh(mcfg))
        with pytest.raises(ConfigError, match=f"below the minimum achievable {minimum / 2**20:.3f} MB"):
            planner.plan(0, tokens)
        planner = BudgetRecompute(mcfg.n_layer, OpGranularity(compiled, costs=costs), minimum / 2**20)
        planner.apply(fresh(mcfg))
        planner.plan(0, tokens)
        assert planner.plan_bytes() <= minimum


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["recompute.budget_mb=2"], r"recompute\.budget_mb=2 has no effect with recompute\.mode=none"),
        (["recompute.granularity=op"], r"recompute\.granularity=op has no effect with recompute\.mode=none"),
        (["recompute.mode=gated", "recompute.granularity=op"], r"recompute\.mode=gated needs recompute\.budget_mb"),
    ],
)
def test_budget_settings_without_a_budgeted_mode_are_refused(overrides, message):
    with pytest.raises(ConfigError, match=message):
        op_cfg(*overrides)


@pytest.mark.slow
def test_compiled_plan_is_honoured_by_torch_compile(op_setup):
    """The compiled plan under ``model.compile()``: the loss and gradients of no recompute
    (to compiled numerics), every stored op call met while tracing, and the compiled graph
    keeps exactly the predicted bytes (the allocator's), within the budget."""
    mcfg, tokens, costs = op_setup
    budget = costs.none_bytes // 2
    plan = P.plan_budget(costs, budget, compiled=True)
    model = fresh(mcfg)
    model.__class__ = type("GPT_compiled_plan_test", (GPT,), {})  # its own dynamo cache entry
    regions = PlanRegions(model, compiled=True)
    model = regions.module
    model.compile()
    regions.apply(plan)  # after compile, as the planner does at step 0
    offset = saved_bytes(fresh(mcfg), tokens) - costs.none_bytes
    try:
        loss, grads = loss_and_grads(fresh(mcfg), tokens)
        loss_c, grads_c = loss_and_grads(model, tokens)
        regions.verify()
        assert_close(loss_c, loss, rtol=1e-4, atol=1e-5)
        for name in grads:
            assert_close(grads_c[name], grads[name], rtol=1e-3, atol=1e-5, msg=name)
        assert saved_bytes(model, tokens) - offset == plan.predicted_bytes <= budget
    finally:
        torch._dynamo.reset()


def test_op_gates_resume_where_they_were(op_setup):
    """The op-level gates' state (logits, multiplier, their Adam) survives a checkpoint: a
    fresh planner loaded with it makes the same plan and the same next update."""
    mcfg, tokens, costs = op_setup
    cfg = op_cfg(
        "recompute.mode=gated",
        "recompute.granularity=op",
        f"recompute.budget_mb={0.5 * costs.none_bytes / 2**20!r}",
        "recompute.gates.warmup_steps=20",
    )

    def planner():
        p = GatedRecompute(mcfg.n_layer, OpGranularity(costs=costs), cfg.recompute, CPU)
        return p, p.apply(fresh(mcfg))

    a, model_a = planner()
    for step in range(3):
        a.plan(step, tokens)
        loss_and_grads(model_a, tokens)
        a.after_step()
    state = torch.load(_roundtrip(a.state_dict()), weights_only=False)
    b, model_b = planner()
    b.load_state_dict(state)
    for p in (a, b):
        p.plan(3, tokens)
    assert b.current.saved == a.current.saved
    assert_close(b.gates.logits, a.gates.logits)
    for p, model in ((a, model_a), (b, model_b)):
        loss_and_grads(model, tokens)
        p.after_step()
        p.plan(4, tokens)
    assert_close(b.gates.logits, a.gates.logits)
    assert b.current.saved == a.current.saved


def _roundtrip(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return buf
