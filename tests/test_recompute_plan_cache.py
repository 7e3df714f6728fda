"""Op-level budget plans kept on disk (:mod:`raydrat.core.techniques.recompute.plan_cache`):
a second run with the same model, micro-batch and budget uses the first run's plan without
measuring (and says so), anything that changes the graph or the costs is another entry, a
corrupt or foreign entry is ignored with one log line and replaced, writes are atomic, and
the cache can be turned off."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from oplevel import fresh
from torch.testing import assert_close

from raydrat.bench.local import LocalData, LocalRun
from raydrat.config import ConfigError, load_config
from raydrat.core import metrics as M
from raydrat.core.fit import Callback
from raydrat.core.techniques.recompute import op_plan as P
from raydrat.core.techniques.recompute import plan_cache as C
from raydrat.core.techniques.recompute.granularity import OpGranularity
from raydrat.core.techniques.recompute.planners import BudgetRecompute

CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def planner(mcfg, cache, budget, compiled=False, costs=None):
    p = BudgetRecompute(mcfg.n_layer, OpGranularity(compiled, costs=costs, plans=cache), budget / 2**20)
    p.apply(fresh(mcfg))
    return p


def key_for(mcfg, tokens, budget, compiled=False, dtype="float32"):
    return C.plan_key(mcfg.model_dump(mode="json"), tuple(tokens[:, :-1].shape), budget, compiled, dtype, CPU)


def cache_lines(caplog):
    return [r.getMessage() for r in caplog.records if "cached op-level plan" in r.getMessage()]


@pytest.mark.parametrize("compiled", [False, True])
def test_a_second_run_uses_the_first_runs_plan_without_measuring(op_setup, tmp_path, caplog, compiled):
    mcfg, tokens, costs = op_setup
    cache = C.PlanCache(tmp_path)
    budget = costs.none_bytes // 2
    first = planner(mcfg, cache, budget, compiled, costs)
    with caplog.at_level(logging.INFO, logger="raydrat"):
        first.plan(0, tokens)
    assert first.level.recalled is None and not cache_lines(caplog)
    entry = cache.path(key_for(mcfg, tokens, budget, compiled))
    assert entry.is_file() and [p.name for p in tmp_path.iterdir()] == [entry.name]  # no temporary file left

    second = planner(mcfg, cache, budget, compiled)  # no costs: it would have to measure
    with caplog.at_level(logging.INFO, logger="raydrat"):
        second.plan(0, tokens)
    assert second.costs is None and second.level.recalled == entry
    assert second.current == first.current and second.current.counts == first.current.counts
    assert second.metrics() == first.metrics()
    (line,) = cache_lines(caplog)
    assert str(entry) in line and "RAYDRAT_PLAN_CACHE=off" in line


def test_the_plan_reads_back_as_it_was_written(op_setup):
    _, _, costs = op_setup
    half = costs.none_bytes // 2
    for plan in (P.plan_budget(costs, half), P.plan_budget(costs, half, compiled=True)):
        back = P.plan_from_json(json.loads(json.dumps(P.plan_to_json(plan))))
        assert back == plan and back.counts == plan.counts and back.stored_fraction == plan.stored_fraction


def test_whatever_changes_the_graph_or_the_costs_is_another_entry(op_setup, tmp_path, monkeypatch):
    mcfg, tokens, costs = op_setup
    cache = C.PlanCache(tmp_path)
    budget = costs.none_bytes // 2
    base = cache.path(key_for(mcfg, tokens, budget))
    wider = mcfg.model_copy(update={"d_model": mcfg.d_model * 2})
    others = [
        key_for(mcfg, tokens, budget + 1),
        key_for(mcfg, tokens[:2], budget),
        key_for(mcfg, tokens[:, :-2], budget),
        key_for(mcfg, tokens, budget, compiled=True),
        key_for(mcfg, tokens, budget, dtype="bfloat16"),
        key_for(wider, tokens, budget),
    ]
    torch.set_num_threads(2)
    others.append(key_for(mcfg, tokens, budget))
    torch.set_num_threads(1)
    monkeypatch.setattr(C.torch, "__version__", "0.0.0")
    others.append(key_for(mcfg, tokens, budget))
    monkeypatch.undo()
    monkeypatch.setattr(C, "code_digest", lambda: "another version of the model or planner code")
    others.append(key_for(mcfg, tokens, budget))
    paths = [cache.path(k) for k in others]
    assert base not in paths and len(set(paths)) == len(paths)


def test_the_key_reads_the_runs_autocast_dtype():
    assert C.autocast_dtype(torch.autocast("cpu", dtype=torch.bfloat16), CPU) == "bfloat16"
    assert C.autocast_dtype(torch.autocast("cpu", enabled=False), CPU) == "float32"


@pytest.mark.parametrize(
    "damage",
    [
        lambda text: text[: len(text) // 2],  # a torn write
        lambda text: "not json",
        lambda text: json.dumps({**json.loads(text), "plan": {"mode": "budget"}}),
        lambda text: json.dumps({**json.loads(text), "key": {**json.loads(text)["key"], "budget_bytes": 1}}),
        lambda text: text.replace('"predicted_bytes": ', '"predicted_bytes": 1'),  # over its budget
    ],
    ids=["truncated", "not-json", "malformed-plan", "another-key", "over-budget"],
)
def test_a_corrupt_or_foreign_entry_is_ignored_with_one_line_and_replaced(op_setup, tmp_path, caplog, damage):
    mcfg, tokens, costs = op_setup
    cache = C.PlanCache(tmp_path)
    budget = costs.none_bytes // 2
    good = planner(mcfg, cache, budget, costs=costs)
    good.plan(0, tokens)
    entry = cache.path(key_for(mcfg, tokens, budget))
    damaged = damage(entry.read_text())
    entry.write_text(damaged)
    again = planner(mcfg, cache, budget, costs=costs)
    with caplog.at_level(logging.INFO, logger="raydrat"):
        again.plan(0, tokens)
    (line,) = cache_lines(caplog)
    assert line.startswith(f"recompute: ignoring the cached op-level plan {entry}") and "planning anew" in line
    assert again.level.recalled is None and again.current == good.current
    assert json.loads(entry.read_text())["plan"] == P.plan_to_json(good.current)  # replaced


def test_an_entry_naming_ops_this_forward_does_not_run_is_refused_by_the_first_step(op_setup, tmp_path):
    """A well-formed entry for this key that names other ops (only a hand-edited file can:
    the key holds the model and planner code's digest) is recalled, and its first forward
    refuses it, as it refuses any plan measured for another forward."""
    mcfg, tokens, costs = op_setup
    cache = C.PlanCache(tmp_path)
    budget = costs.none_bytes // 2
    planner(mcfg, cache, budget, costs=costs).plan(0, tokens)
    entry = cache.path(key_for(mcfg, tokens, budget))
    entry.write_text(entry.read_text().replace('"aten.', '"aten_'))
    again = BudgetRecompute(mcfg.n_layer, OpGranularity(plans=cache), budget / 2**20)
    model = again.apply(fresh(mcfg))
    again.plan(0, tokens)
    assert again.level.recalled == entry
    with pytest.raises(RuntimeError, match="op plan does not match this forward"):
        model(tokens[:, :-1], tokens[:, 1:])[1].backward()


def test_a_folder_that_cannot_be_written_is_one_line_not_an_error(op_setup, tmp_path, caplog):
    mcfg, tokens, costs = op_setup
    blocked = tmp_path / "a-file"
    blocked.write_text("")
    p = planner(mcfg, C.PlanCache(blocked / "plans"), costs.none_bytes // 2, costs=costs)
    with caplog.at_level(logging.INFO, logger="raydrat"):
        p.plan(0, tokens)
    assert p.current.mode == "budget"
    (line,) = [r.getMessage() for r in caplog.records if "could not cache" in r.getMessage()]


def test_the_cache_is_turned_off_by_the_env_or_the_config(tmp_path, monkeypatch):
    monkeypatch.setenv(C.ENV, str(tmp_path))
    assert C.plan_cache().folder == tmp_path
    assert C.plan_cache(enabled=False) is None
    for off in ("off", "0", "false", "OFF"):
        monkeypatch.setenv(C.ENV, off)
        assert C.plan_cache() is None
    monkeypatch.delenv(C.ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert C.plan_cache().folder == tmp_path / "raydrat" / "plans"


def test_plan_cache_without_an_op_budget_is_refused():
    with pytest.raises(ConfigError, match=r"recompute\.plan_cache=false has no effect with recompute\.mode=none"):
        load_config("debug", ["recompute.plan_cache=false"])
    cfg = load_config(
        "debug",
        ["recompute.mode=budget", "recompute.granularity=op", "recompute.budget_mb=1", "recompute.plan_cache=false"],
    )
    assert cfg.recompute.plan_cache is False


class _Losses(Callback):
    def __init__(self):
        self.losses = []

    def on_log(self, state, values):
        self.losses.append(values[M.TRAIN_LOSS])


def test_training_twice_recalls_the_plan_and_trains_the_same(tmp_path, monkeypatch, caplog):
    """Through the fit loop: the first run measures, plans and keeps its plan; the second
    recalls it (no measurement), says so, and trains to the same losses."""
    monkeypatch.setenv(C.ENV, str(tmp_path))
    cfg = load_config(
        "debug",
        [
            "model.n_layer=2",
            "train.batch_size=4",
            "train.steps=2",
            "train.eval_every=100",
            "train.log_every=1",
            "optim.warmup_steps=0",
            "train.device=cpu",
            "recompute.mode=budget",
            "recompute.granularity=op",
            "recompute.budget_mb=1.2",
        ],
    )
    data = LocalData.random(cfg, steps=2)
    runs = []
    for _ in range(2):
        losses = _Losses()
        with caplog.at_level(logging.INFO, logger="raydrat"):
            run = LocalRun.start(cfg, data, [losses], sample_steps=0).run()
        runs.append((run.techniques.recompute, losses.losses))
    (first, first_losses), (second, second_losses) = runs
    assert first.costs is not None and first.level.recalled is None
    assert second.costs is None and second.level.recalled is not None
    assert second.current == first.current
    assert len(cache_lines(caplog)) == 1
    assert_close(torch.tensor(second_losses), torch.tensor(first_losses))
