"""Sweeps: space validation before anything runs (the sweep's own keys, searcher packages,
budgets), admission of each proposal and what a searcher learns from it, auto micro-batch on
OOM, and one real Optuna sweep of the debug recipe through Ray Tune (budget → infeasible,
OOM → oom, statuses, figures and child runs against checkpoints, Tune and the MLflow store)."""

from __future__ import annotations

import csv
import json
import math
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import ray
import torch
import yaml
from conftest import cli_env, faulty_raydrat_cmd, raydrat_cmd, run_cli
from faults import OOMAbove, oom_above
from mlflow.tracking import MlflowClient
from ray.tune.search import Searcher

from raydrat.cli import main
from raydrat.config import ConfigError, SweepConfig, load_config
from raydrat.core.checkpoint.state import checkpoint_step, load_state, verify_checkpoint
from raydrat.core.microbatch import MicroBatchStep
from raydrat.core.model.build import build_model
from raydrat.core.optim import build_optimizer
from raydrat.core.runtime import resolve
from raydrat.core.step import train_step
from raydrat.tracking import artifact_repo
from raydrat.tune.admission import SweepError, check_resources, screen, worker_resources
from raydrat.tune.search import AdmittingSearcher, build_searcher, missing_packages
from raydrat.tune.space import expand, load_space
from raydrat.tune.sweep import run_sweep
from raydrat.tune.trial import trial_fn


def estimated_bytes(cfg) -> int:
    """A trial's estimate as the sweep's admission makes it on this CPU machine."""
    return resolve(cfg, gpus=0).estimate.total_bytes


SHORT = {
    "train.steps": 6,
    "train.eval_every": 3,
    "train.log_every": 3,
    "train.eval_batches": 1,
    "optim.warmup_steps": 2,
    "scaling.cpus_per_worker": 0.25,
}


def _space(tmp: Path, **fields) -> Path:
    doc = {"name": "t", "base": "debug", "overrides": dict(SHORT), "space": {"optim.lr": {"choice": [1e-3]}}}
    doc.update(fields)
    p = tmp / "space.yaml"
    p.write_text(yaml.safe_dump(doc))
    return p


# ------------------------------------------------------------------ validation (no Ray)


SHIPPED_SPACES = sorted(p.stem for p in (Path(__file__).resolve().parents[1] / "tune_spaces").glob("*.yaml"))


@pytest.mark.parametrize("name", SHIPPED_SPACES)
def test_shipped_spaces_validate(name):
    assert expand(load_space(name))


def test_shipped_smoke_space_validates_and_has_four_trials():
    trials = expand(load_space("smoke"))
    assert len(trials) >= 4
    assert {t.params["model.d_model"] for t in trials} == {32, 48, 64, 512}
    assert len({t.params["optim.lr"] for t in trials}) == len(trials)  # sampled per trial


@pytest.mark.parametrize(
    "space, needle",
    [
        ({"optim.lrr": {"choice": [1e-3]}}, "optim.lrr: unknown key"),
        ({"modle.d_model": {"grid": [32]}}, "modle: unknown key"),
        ({"train.batch_size": {"choice": [8, 0]}}, "train.batch_size"),
        ({"optim.lr": {"uniform": [1e-2, 1e-3]}}, "lower bound 0.01 must be below upper bound 0.001"),
        ({"optim.lr": {"loguniform": [0, 1e-3]}}, "bounds must be positive"),
        ({"optim.lr": {"normal": [0, 1]}}, "needs exactly one of choice, grid"),
        ({}, "the space is empty"),
    ],
)
def test_bad_space_fails_before_any_trial_naming_the_culprit(tmp_path, capsys, space, needle):
    p = _space(tmp_path, space=space)
    with pytest.raises(ConfigError, match="(?s)" + needle.replace(".", r"\.").replace("(", r"\(")):
        load_space(p)
    # the CLI turns it into an error line and exit status 2, before Ray starts
    assert main(["tune", str(p)]) == 2
    assert needle.split(":")[0] in capsys.readouterr().err


def test_budget_below_every_estimate_fails_naming_the_smallest(tmp_path, capsys):
    p = _space(tmp_path, memory_budget_gb=1e-4, space={"model.d_model": {"grid": [32, 64]}})
    smallest = min(estimated_bytes(t.config) for t in expand(load_space(p)))
    assert smallest > 1e-4 * 1024**3
    assert main(["tune", str(p)]) == 2  # before Ray starts: no cluster is needed for this
    err = capsys.readouterr().err
    assert "is below every trial's estimate" in err and "t000" in err and "raise memory_budget_gb" in err
    assert f"{smallest / 1024**3:.4f} GB" in err


def test_unknown_sweep_key_lists_the_sweeps_own_keys_and_a_nested_sections(tmp_path, capsys):
    with pytest.raises(ConfigError) as top:
        load_space(_space(tmp_path, max_concurent=2))
    allowed = top.value.args[0].split("max_concurent: unknown key; allowed keys here: ")[1].split(", ")
    assert allowed == sorted(SweepConfig.model_fields)  # the sweep's keys, not the training config's sections
    assert "max_concurrent" in allowed and "model" not in allowed
    with pytest.raises(
        ConfigError, match="scheduler.grace: unknown key; allowed keys here: grace_period, reduction_factor, type"
    ):
        load_space(_space(tmp_path, scheduler={"type": "asha", "grace": 2}))
    assert main(["tune", str(_space(tmp_path, resources={"trial_cpus": 1}))]) == 2
    assert (
        "resources.trial_cpus: unknown key; allowed keys here: data_cpu_headroom, gpu_memory_gb, trial_cpu"
        in capsys.readouterr().err
    )


def test_a_searcher_whose_package_is_missing_is_named_before_ray_starts(tmp_path, capsys):
    missing = missing_packages("bohb")
    if not missing:
        pytest.skip("hpbandster and ConfigSpace are installed here")
    assert main(["tune", str(_space(tmp_path, search="bohb"))]) == 2
    err = capsys.readouterr().err
    assert (
        f"search: bohb needs the package(s) {', '.join(missing)}" in err and f"pip install {' '.join(missing)}" in err
    )
    assert not ray.is_initialized()


def test_a_searcher_space_with_no_corner_under_the_budget_is_refused_before_ray_starts(tmp_path, capsys):
    p = _space(
        tmp_path,
        search="optuna",
        memory_budget_gb=1e-4,
        space={"model.d_model": {"choice": [32, 64]}, "optim.lr": {"loguniform": [1e-3, 1e-2]}},
    )
    smallest = estimated_bytes(load_config("debug", [f"{k}={v}" for k, v in {**SHORT, "model.d_model": 32}.items()]))
    assert main(["tune", str(p)]) == 2
    err = capsys.readouterr().err
    assert "is below every corner of the space's estimate" in err and f"{smallest / 1024**3:.4f} GB" in err
    assert "model.d_model=32" in err and not ray.is_initialized()


def test_a_proposal_keeps_only_the_entries_whose_condition_holds(tmp_path):
    space = load_space(
        _space(
            tmp_path,
            search="optuna",
            space={
                "recompute.mode": {"choice": ["none", "gated"]},
                "recompute.gates.memory_weight": {"loguniform": [1e-3, 1e-1], "when": {"recompute.mode": "gated"}},
            },
        )
    )
    proposal = {"recompute.mode": "none", "recompute.gates.memory_weight": 0.01}
    assert space.params_from(proposal) == {"recompute.mode": "none"}
    assert space.params_from({**proposal, "recompute.mode": "gated"}) == {
        "recompute.mode": "gated",
        "recompute.gates.memory_weight": 0.01,
    }


def test_hyperopt_proposals_are_screened_too(tmp_path):
    space = load_space(
        _space(
            tmp_path,
            search="hyperopt",
            num_samples=6,
            seed=1,
            memory_budget_gb=0.05,
            space={"model.d_model": {"grid": [32, 512]}, "optim.lr": {"uniform": [1e-3, 1e-2]}},
        )
    )
    launched, refused = [], []
    s = AdmittingSearcher(
        build_searcher(space, None),
        6,
        lambda i, prop: screen(space, i, space.params_from(prop), 0),
        lambda v: {"trial": v},
        refused.append,
        "val_loss",
        "min",
    )
    while (out := s.suggest(f"x{len(launched)}")) != Searcher.FINISHED:
        launched.append(out["trial"])
        s.on_trial_complete(f"x{len(launched) - 1}", {"val_loss": 1.0, "status": "completed"})
    assert len(launched) + len(refused) == 6 and [v.index for v in launched + refused] != []
    assert {v.params["model.d_model"] for v in launched} <= {32} and {v.params["model.d_model"] for v in refused} <= {
        512
    }
    assert all(isinstance(v.params["model.d_model"], int) and 1e-3 <= v.params["optim.lr"] <= 1e-2 for v in launched)


class _Unlearned(Searcher):
    """A peer: the same searcher, told nothing of the refused proposals (reported as errors,
    which Optuna leaves out of its model)."""

    def __init__(self, inner):
        super().__init__(metric=inner.metric, mode=inner.mode)
        self.inner = inner

    def suggest(self, trial_id):
        return self.inner.suggest(trial_id)

    def on_trial_complete(self, trial_id, result=None, error=False):
        refused = bool(result) and result.get("val_loss") == math.inf
        self.inner.on_trial_complete(trial_id, None if refused else result, error=refused or error)


def test_the_searcher_learns_that_infeasible_proposals_are_bad_and_none_is_launched(tmp_path):
    """OptunaSearch under admission, with a synthetic score for what it launches: told the
    worst value for each infeasible proposal it stops proposing them; the same searcher,
    not told, goes on proposing them as often as at first."""
    est = {
        d: estimated_bytes(load_config("debug", [f"{k}={v}" for k, v in {**SHORT, "model.d_model": d}.items()]))
        for d in (32, 512)
    }
    space = load_space(
        _space(
            tmp_path,
            search="optuna",
            num_samples=24,
            seed=0,
            memory_budget_gb=(est[32] + est[512]) / 2 / 1024**3,
            space={"model.d_model": {"choice": [32, 512]}, "optim.lr": {"loguniform": [1e-3, 1e-2]}},
        )
    )

    def search(inner):
        launched, refused = [], []
        s = AdmittingSearcher(
            inner,
            space.sweep.num_samples,
            lambda i, proposal: screen(space, i, space.params_from(proposal), 0),
            lambda v: {"trial": v},
            refused.append,
            "val_loss",
            "min",
        )
        while (out := s.suggest(f"x{len(launched)}")) != Searcher.FINISHED:
            v = out["trial"]
            launched.append(v)
            s.on_trial_complete(f"x{len(launched) - 1}", {"val_loss": abs(math.log(v.params["optim.lr"] / 3e-3))})
        return launched, refused

    launched, refused = search(build_searcher(space, None))
    assert all(v.estimate <= v.budget for v in launched) and all(v.params["model.d_model"] == 32 for v in launched)
    assert refused and all(v.refused == "infeasible" and v.estimate > v.budget for v in refused)
    assert len(launched) + len(refused) == 24
    _, peer_refused = search(_Unlearned(build_searcher(space, None)))
    late = sum(v.index >= 12 for v in refused)
    peer_late = sum(v.index >= 12 for v in peer_refused)
    assert late < peer_late / 2, (late, peer_late)


def test_conditional_entries_expand_only_where_their_condition_holds(tmp_path):
    p = _space(
        tmp_path,
        space={
            "recompute.mode": {"grid": ["none", "full"]},
            "train.grad_accum": {"grid": [2, 4], "when": {"recompute.mode": "full"}},
        },
    )
    trials = expand(load_space(p))
    combos = sorted((t.params["recompute.mode"], t.params.get("train.grad_accum")) for t in trials)
    assert combos == [("full", 2), ("full", 4), ("none", None)]
    assert all(t.config.train.grad_accum == (t.params.get("train.grad_accum") or 1) for t in trials)


def test_resources_check_errors_when_one_trial_cannot_fit_and_warns_on_concurrency(tmp_path):
    space = load_space(_space(tmp_path, max_concurrent=8))
    trials = expand(space)
    n, warnings = check_resources(space, trials, {"CPU": 2.0})
    assert n == 2 and "only 2 trial(s) fit" in warnings[0]  # (2 - 1 headroom) // 0.35
    big = load_space(_space(tmp_path, overrides={**SHORT, "scaling.cpus_per_worker": 2}))
    with pytest.raises(SweepError, match="scaling.cpus_per_worker"):
        check_resources(big, expand(big), {"CPU": 2.0})


def test_packing_requests_a_gpu_fraction_or_cpu_memory_sized_by_the_estimate(tmp_path):
    trials = expand(load_space(_space(tmp_path, space={"model.d_model": {"grid": [32, 512]}})))
    small, large = (estimated_bytes(t.config) for t in trials)
    gpu = 4 * large  # a GPU four times the large trial's estimate
    frac_small = worker_resources(small, True, gpu)["GPU"]
    frac_large = worker_resources(large, True, gpu)["GPU"]
    assert frac_small < frac_large == 0.25  # several small trials share the GPU
    assert frac_small >= small / gpu and frac_small <= small / gpu + 0.01
    assert worker_resources(large, True, large // 2) == {"GPU": 1.0}  # capped: alone
    assert worker_resources(small, False, None) == {"memory": small}


# ------------------------------------------------------------------ auto micro-batch (no Ray)


def _model_and_opt():
    cfg = load_config("debug")
    model = build_model(cfg.model, seed=0)
    return cfg, model, build_optimizer(model, cfg.optim)


def test_auto_microbatch_halves_on_oom_and_keeps_the_global_batch():
    cfg, model, opt = _model_and_opt()
    _, ref_model, ref_opt = _model_and_opt()
    batches = [torch.randint(0, cfg.model.vocab_size, (8, cfg.model.seq_len + 1)) for _ in range(2)]
    ref_loss, _ = train_step(ref_model, ref_opt, batches, 1.0)

    oom_above(model, 2)  # any micro-batch above 2 sequences "runs out of memory"
    step = MicroBatchStep(cfg.train.model_copy(update={"auto_microbatch": True}))
    loss, _ = step(model, opt, batches, 1.0)
    assert step.micro_batch == 2 and step.retries == 2
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    for p, q in zip(model.parameters(), ref_model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-4)  # Adam amplifies float noise on ~0 grads


def test_oom_propagates_without_auto_microbatch_or_below_the_floor():
    cfg, model, opt = _model_and_opt()
    batches = [torch.randint(0, cfg.model.vocab_size, (8, cfg.model.seq_len + 1))]
    oom_above(model, 2)
    with pytest.raises(torch.OutOfMemoryError):
        MicroBatchStep(cfg.train)(model, opt, batches, 1.0)
    floor = MicroBatchStep(cfg.train.model_copy(update={"auto_microbatch": True, "min_micro_batch": 4}))
    with pytest.raises(torch.OutOfMemoryError):
        floor(model, opt, batches, 1.0)
    assert floor.micro_batch == 4


# ------------------------------------------------------------------ a real sweep


def _dominated(r, others):
    key = lambda x: (x["val_loss"], x["peak_bytes"], -x["tokens_per_s"])
    return any(all(a <= b for a, b in zip(key(o), key(r))) and key(o) != key(r) for o in others)


def _step_of(checkpoint: Path) -> int:
    return int(load_state(str(checkpoint))["step"])


@pytest.mark.slow
def test_optuna_sweep_statuses_figures_and_mlflow_runs_agree(
    ray_local, demo_dir: Path, tmp_path: Path, monkeypatch, capfd
):
    """One real sweep (OptunaSearch, ASHA, 2 at once) over a space with an infeasible region
    (d_model 512) and a trial that runs out of memory (d_model 48, micro-batches of 8 under
    an injected fault), checked against Ray Train's checkpoints, Tune's own results and the
    MLflow store read back through the MLflow client."""
    space = {
        "model.d_model": {"choice": [32, 48, 512]},
        "train.batch_size": {"choice": [8], "when": {"model.d_model": 48}},
        "optim.lr": {"loguniform": [1e-3, 1e-2]},
    }
    overrides = {**SHORT, "train.batch_size": 4, "data.demo_dir": str(demo_dir)}
    register = {"tracking.register_model": "sweep-best"}  # not in `overrides`: the estimates below ignore it
    est = {
        d: estimated_bytes(load_config("debug", [f"{k}={v}" for k, v in {**overrides, "model.d_model": d}.items()]))
        for d in (48, 512)
    }
    est[48] = estimated_bytes(
        load_config("debug", [f"{k}={v}" for k, v in {**overrides, "model.d_model": 48, "train.batch_size": 8}.items()])
    )
    budget = (est[48] + est[512]) // 2
    # seed 11: OptunaSearch proposes d_model 512, 48, 32, 32 (its first proposals are its random start)
    p = _space(
        tmp_path,
        name="sweeptest",
        search="optuna",
        seed=11,
        num_samples=4,
        space=space,
        overrides={**overrides, **register},
        max_concurrent=2,
        memory_budget_gb=budget / 1024**3,
        scheduler={"type": "asha", "grace_period": 3, "reduction_factor": 2},
    )
    monkeypatch.chdir(tmp_path)
    summary = run_sweep(p, json_path="sweep.json", fit_callbacks=[OOMAbove(4)])
    out = summary.report
    console = capfd.readouterr()
    sweep_dir = summary.path
    doc = json.loads((tmp_path / "sweep.json").read_text())
    records = {r["trial"]: r for r in doc["trials"]}
    assert sorted(records) == ["t000", "t001", "t002", "t003"]
    by_d = {}
    for r in records.values():
        by_d.setdefault(r["params"]["model.d_model"], []).append(r)
    assert set(by_d) == {32, 48, 512}, {t: r["params"] for t, r in records.items()}

    # statuses follow what happened
    assert {r["status"] for r in by_d[512]} == {"infeasible"}
    assert {r["status"] for r in by_d[48]} == {"oom"} and all("OutOfMemoryError" in r["error"] for r in by_d[48])
    trained = by_d[32]
    assert {r["status"] for r in trained} <= {"completed", "stopped_early"}
    for r in trained:  # the status is the steps trained; Ray Train's checkpoints say how far each got
        assert (r["status"] == "completed") == (r["steps"] == 6) and r["steps"] in (3, 6)
        run_dir = sweep_dir / "train" / f"{sweep_dir.name}-{r['trial']}"
        saved = [_step_of(c.parent) for c in run_dir.glob("checkpoint_*/state.pt")]
        assert max(saved) <= r["steps"] and (r["status"] != "completed" or max(saved) == 6), (r, saved)
    # infeasible: never launched (no Tune trial, no Ray Train run), recorded with estimate and budget
    grid_names = {Path(t).name for t in (sweep_dir.glob("t0*"))}
    for r in by_d[512]:
        assert r["estimated_bytes"] > budget == r["budget_bytes"] and r["peak_bytes"] is None and not r["launched"]
        assert r["trial"] not in grid_names and not list((sweep_dir / "train").glob(f"*-{r['trial']}"))
    # Tune's trial names and directories are raydrat's trial ids
    tune_state = json.loads(sorted(sweep_dir.glob("experiment_state-*.json"))[-1].read_text())
    tune_names = {json.loads(e[0])["relative_logdir"] for e in tune_state["trial_data"]}
    assert tune_names == {r["trial"] for r in records.values() if r["launched"]} == grid_names

    # one source of truth: the report's figures are each child run's last metrics
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlruns.db'}")
    exp = client.get_experiment_by_name("raydrat")
    runs = client.search_runs([exp.experiment_id])
    parent = client.get_run(summary.parent_run_id)
    children = {
        r.data.tags["raydrat.trial"]: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id
    }
    assert sorted(children) == sorted(records) and len(runs) == 5
    # every completed trial logged its model; the sweep registered its best trial's
    logged = {m.source_run_id for m in client.search_logged_models([exp.experiment_id])}
    completed = {children[t].info.run_id for t, r in records.items() if r["status"] == "completed"}
    assert completed and completed <= logged
    (version,) = client.search_model_versions("name='sweep-best'")
    assert version.run_id == summary.best.mlflow_run_id
    sweep_s = (parent.info.end_time - parent.info.start_time) / 1000
    for t, r in records.items():
        child, m = children[t], children[t].data.metrics
        assert child.data.tags["raydrat.status"] == r["status"]
        assert float(child.data.params["runtime.estimated_peak_mib"]) == round(r["estimated_bytes"] / 2**20, 3)
        if not r["launched"]:
            assert child.info.status == "KILLED" and child.info.end_time is None  # recorded, no duration
            assert not m and "memory_budget_gb" in child.data.tags["raydrat.refused_because"]
            continue
        duration = (child.info.end_time - child.info.start_time) / 1000
        assert 0 < duration < sweep_s
        assert abs(duration - r["wall_s"]) < 2, (t, duration, r["wall_s"])
        assert child.info.status == ("FAILED" if r["status"] == "oom" else "FINISHED")
        if r["status"] == "oom":
            assert "OutOfMemoryError" in child.data.tags["raydrat.error"]
            continue
        assert r["val_loss"] == m["val_loss"] and r["tokens_per_s"] == m["system/tokens_per_s_avg"]
        assert r["peak_bytes"] == round(m["system/peak_mib"] * 2**20) > 0 and r["metric_value"] == m["val_loss"]
        assert r["steps"] == client.get_metric_history(child.info.run_id, "val_loss")[-1].step
        # its loss curves, plotted by the trial, or by the driver when the scheduler killed it first
        plots = [a.path for a in client.list_artifacts(child.info.run_id, "plots")]
        assert plots == ["plots/loss_curve.png"], (t, r["status"], plots)
    # Tune's own clock: each launched trial's time in Tune is close to its child run's duration
    for result in summary_grid(sweep_dir):
        r = records[Path(result.path).name]
        child = children[r["trial"]]
        duration = (child.info.end_time - child.info.start_time) / 1000
        tune_s = result.metrics_dataframe["time_total_s"].iloc[-1]
        assert abs(duration - tune_s) < max(10, 0.15 * duration), (r["trial"], duration, tune_s)
        if "step" in result.metrics_dataframe:  # Tune's view of the steps may lag, not lead
            assert result.metrics_dataframe["step"].dropna().max() <= r["steps"], r

    # memory: estimate and measured peak per trial, the largest error, flags over the budget
    measured = [r for r in records.values() if r["estimate_error"] is not None]
    worst = max(measured, key=lambda r: abs(r["estimate_error"]))
    assert doc["memory"]["max_estimate_error_trial"] == worst["trial"]
    assert worst["estimate_error"] == pytest.approx(worst["peak_bytes"] / worst["estimated_bytes"] - 1)
    assert sorted(doc["memory"]["over_budget_trials"]) == sorted(
        t for t, r in records.items() if r["launched"] and r["peak_bytes"] and r["peak_bytes"] > budget
    )
    assert "Largest estimate error: " + worst["trial"] in out

    # report, Pareto front (completed trials, measured peak), CSV and plot in the parent run
    done = [r for r in records.values() if r["status"] == "completed"]
    for r in records.values():
        assert r["pareto"] == (r["status"] == "completed" and not _dominated(r, done)), r["trial"]
    with open(sweep_dir / "trials.csv") as f:
        rows = list(csv.DictReader(f))
    assert [row["trial"] for row in rows] == sorted(records)
    assert {row["trial"] for row in rows if row["pareto"] == "True"} == {t for t, r in records.items() if r["pareto"]}
    assert parent.data.params["sweep.search"] == "optuna"
    assert parent.data.params["sweep.memory_budget_gb"] == str(budget / 1024**3)
    assert parent.data.tags["raydrat.trials.infeasible"] == str(len(by_d[512]))
    if done:
        assert parent.data.params["best.trial"] in {r["trial"] for r in done} and "Train the best config" in out
    assert {a.path for a in client.list_artifacts(parent.info.run_id, "report")} == {
        "report/trials.csv",
        "report/pareto.png",
        "report/report.txt",
    }

    # the sweep's own view in the UI (a shared view: its trials ranked by val loss, loss charts first)
    view = json.loads(exp.tags[f"mlflow.sharedViewState.{sweep_dir.name}"])
    assert view["searchFilter"] == f"tags.`raydrat.sweep` = '{sweep_dir.name}'"
    assert [c["metricKey"] for c in view["compareRunCharts"]] == ["val_loss", "train_loss"]
    assert {r.info.run_id for r in client.search_runs([exp.experiment_id], view["searchFilter"])} == {
        r.info.run_id for r in runs
    }
    # the MLflow view: training experiment, source/git/user tags on every run, used sections as
    # params, data lineage as dataset inputs, measured peak on every run that trained
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    for run in runs:
        assert {"mlflow.source.name", "mlflow.source.git.commit", "mlflow.user"} <= set(run.data.tags), (
            run.info.run_name
        )
    for t, child in children.items():
        keys = set(child.data.params)
        assert "model.d_model" in keys and "runtime.device" in keys and "sweep.param.optim.lr" in keys
        assert not any(k.startswith(("sync.", "recompute.gates.", "tracking.", "slots.keep")) for k in keys), t
        if records[t]["launched"]:
            contexts = {i.tags[0].value for i in child.inputs.dataset_inputs}
            assert contexts == {"training", "validation"}
    # artifact locations are relative to the store: a copy of it reads its own artifacts
    copy = tmp_path / "copy"
    copy.mkdir()
    shutil.copy(tmp_path / "mlruns.db", copy / "mlruns.db")
    shutil.copytree(tmp_path / "mlartifacts", copy / "mlartifacts")
    shutil.rmtree(tmp_path / "mlartifacts")
    copy_uri = f"sqlite:///{copy / 'mlruns.db'}"
    assert {a.path for a in artifact_repo(copy_uri, parent.info.run_id).list_artifacts("report")} == {
        "report/trials.csv",
        "report/pareto.png",
        "report/report.txt",
    }
    monkeypatch.chdir(copy)  # where `mlflow ui` runs (raydrat prints `cd STORE && mlflow ui ...`)
    one = children[by_d[32][0]["trial"]].info.run_id
    assert "config.yaml" in {a.path for a in MlflowClient(copy_uri).list_artifacts(one)}

    # the console: one line per trial event, no Tune tables
    text = console.out + console.err
    for r in records.values():
        assert (f"{r['trial']} started: " in text) == r["launched"]
    assert f"{by_d[512][0]['trial']} infeasible, not launched: estimated peak" in text
    assert f"{by_d[48][0]['trial']} oom in " in text
    assert "Trial status:" not in text and "Configuration for experiment" not in text


def summary_grid(sweep_dir: Path):
    """Tune's own results of the sweep (read back from its experiment directory)."""
    return list(ray.tune.Tuner.restore(str(sweep_dir), trainable=trial_fn).get_results())


def _until(proc, what: str, ready, out_path: Path, timeout: float = 600) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, f"the sweep ended before {what}: {out_path.read_text()[-5000:]}"
        if ready():
            return
        time.sleep(0.5)
    raise AssertionError(f"no {what} in {timeout}s: {out_path.read_text()[-5000:]}")


def _interrupt_when(args: list[str], cwd: Path, log: Path, what: str, ready, faults_spec=None) -> str:
    """Run ``raydrat ARGS`` (with ``faults_spec``'s callbacks), send it SIGINT (Ctrl-C) once
    ``ready()``, and return its console."""
    cmd = faulty_raydrat_cmd(faults_spec, *args) if faults_spec else raydrat_cmd(*args)
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, cwd=cwd, env=cli_env(), stdout=out, stderr=subprocess.STDOUT, text=True)
        try:
            _until(proc, what, ready, log)
            proc.send_signal(signal.SIGINT)
            proc.wait(timeout=300)
        finally:
            if proc.poll() is None:
                proc.kill()
    text = log.read_text()
    assert proc.returncode == 2, text[-5000:]
    errors = [ln for ln in text.splitlines() if ln.startswith("raydrat: error:")]
    assert len(errors) == 1 and errors[0].endswith(" --resume"), text[-3000:]
    return text


@pytest.mark.slow
def test_a_sweep_survives_dead_trials_and_two_interrupts(demo_dir: Path, tmp_path: Path):
    """Four trials, one at a time: t000's process is killed (SIGKILL, as the OOM killer does)
    before its first report, t001 raises at step 2. The sweep is interrupted (Ctrl-C) just
    after t002 saved its last step, resumed, interrupted again as t003 starts training, and
    resumed again:
    it finishes with every trial counted once (its own Ray Train run, MLflow child and
    record), each failed trial's root cause on the console, in its child run and in the
    JSON, t002's figures kept, and no MLflow run left RUNNING."""
    p = _space(
        tmp_path,
        name="deadtrials",
        max_concurrent=1,
        scheduler={"type": "none"},
        overrides={**SHORT, "data.demo_dir": str(demo_dir)},
        space={"optim.lr": {"grid": [1e-3, 2e-3, 3e-3, 4e-3]}},
    )
    faults = [["KillTrial", {"trial": "t000"}], ["RaiseAt", {"trial": "t001", "step": 2}]]
    root = tmp_path / "ray_results" / "tune"

    def sweep_dir() -> Path:
        (d,) = root.glob("deadtrials-*")
        return d

    def saved(trial: str, step: int) -> bool:
        dirs = list(root.glob(f"deadtrials-*/train/deadtrials-*-{trial}/checkpoint_*"))
        return any(checkpoint_step(d) == step and verify_checkpoint(d, checksums=False) is None for d in dirs)

    def training(trial: str) -> bool:  # its Ray Train run started: well before its first report
        return bool(list(root.glob(f"deadtrials-*/train/deadtrials-*-{trial}")))

    first = _interrupt_when(
        ["tune", str(p)], tmp_path, tmp_path / "run1.log", "t002's last save", lambda: saved("t002", 6), faults
    )
    second = _interrupt_when(
        ["tune", str(p), "--resume"], tmp_path, tmp_path / "run2.log", "t003's training", lambda: training("t003")
    )
    third = run_cli(["tune", str(p), "--resume", "--json", "sweep.json"], cwd=tmp_path)
    out = third.stdout + third.stderr
    print(first, second, out, sep="\n-----\n")  # the consoles, for the record (pytest -rA)
    assert third.returncode == 0, out[-5000:]

    # the console: each failed trial's root cause in its line, no traceback, no Ray warning
    assert re.search(r"t000 failed: the trial's process \(pid \d+ on node [\d.]+\) died: killed", first), first[-4000:]
    assert "t001 failed: RuntimeError: injected fault at step 2 (test)" in first, first[-4000:]
    for text in (first, second, out):  # Ray's own lines stay out of the quiet console
        assert "Traceback" not in text and "Token authentication" not in text, text[-4000:]
        assert "Trials did not complete" not in text and "will be retried" not in text
        assert "worker processes have been started" not in text
    # a resume runs only the unfinished trials: the failed ones never start again
    for text in (second, out):
        assert "t000 started" not in text and "t001 started" not in text, text[-4000:]

    records = {r["trial"]: r for r in json.loads((tmp_path / "sweep.json").read_text())["trials"]}
    assert {t: r["status"] for t, r in records.items()} == {
        "t000": "failed",
        "t001": "failed",
        "t002": "completed",
        "t003": "completed",
    }
    assert "the trial's process" in records["t000"]["error"] and "injected fault" in records["t001"]["error"]
    assert "Statuses: completed 2, failed 2" in out

    # every trial once: one Ray Train run each, one MLflow child each, and they agree
    d = sweep_dir()
    assert sorted(x.name.rsplit("-", 1)[-1] for x in (d / "train").iterdir()) == ["t000", "t001", "t002", "t003"]
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlruns.db'}")
    runs = client.search_runs([client.get_experiment_by_name("raydrat").experiment_id])
    (parent,) = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(runs) == 5 and sorted(c.data.tags["raydrat.trial"] for c in children) == sorted(records)
    assert parent.info.status == "FINISHED"
    for child in children:
        r = records[child.data.tags["raydrat.trial"]]
        assert child.info.status == ("FINISHED" if r["status"] == "completed" else "FAILED"), r
        assert child.data.tags["raydrat.status"] == r["status"] and child.info.run_id == r["mlflow_run_id"]
        if r["status"] == "completed":  # its figures are its own run's, whatever interrupts came in between
            assert r["val_loss"] == child.data.metrics["val_loss"] and r["tokens_per_s"] and r["peak_bytes"]
            assert r["steps"] == 6
        else:
            assert child.data.tags["raydrat.error"] == r["error"]


def test_best_trial_follows_the_sweep_metric_and_mode():
    """``best`` ranks by ``sweep.metric`` in ``sweep.mode``, not by val_loss."""
    from raydrat.tune.report import TrialRecord
    from raydrat.tune.results import best_trial

    def rec(name, val_loss, metric, status="completed"):
        return TrialRecord(name, {}, status, estimated_bytes=1, val_loss=val_loss, metric_value=metric, peak_bytes=1)

    records = [
        rec("t000", 3.0, 900.0),
        rec("t001", 2.0, 100.0),
        rec("t002", 4.0, 500.0),
        rec("t003", 1.0, 5000.0, status="oom"),
    ]
    assert best_trial(records, "max").trial == "t000"  # e.g. metric: tokens_per_s, mode: max
    assert best_trial(records, "min").trial == "t001"
    assert best_trial([rec("t000", 3.0, None)], "min") is None  # a trial that never reported the metric


def test_a_store_that_cannot_open_a_trials_run_leaves_the_trial_untracked_not_failed(capsys):
    """Tracking never fails a trial: a store that is away when the trial opens its child run
    is one warning line (no password), and the trial trains with ``Run.off()``."""
    from raydrat.bench.loopback import free_port
    from raydrat.core.metrics import setup_logging
    from raydrat.tune.trial import _open_run

    setup_logging()  # the console's handler, as the trial's process has it

    uri = f"http://raydrat:secretpw@127.0.0.1:{free_port()}"
    payload = {"tracking_uri": uri, "parent_run_id": "0123abcd", "name": "t000"}
    run = _open_run(payload, load_config("debug"), time.time())
    assert not run and run.run_id is None
    err = capsys.readouterr().err
    assert "opening the trial's MLflow run in http://raydrat:***@127.0.0.1:" in err and "Connection refused" in err, err
    assert "secretpw" not in err
