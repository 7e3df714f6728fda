"""Sweeps: space validation before anything runs, auto micro-batch on OOM, and one real sweep
of the debug recipe through Ray Tune (budget → infeasible, OOM → oom, MLflow tree, Pareto)."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import torch
import yaml

from conftest import run_cli
from faults import OOMAbove, oom_above
from raydrat.cli import main
from raydrat.config import ConfigError, load_config
from raydrat.core.microbatch import MicroBatchStep
from raydrat.core.model.build import build_model
from raydrat.core.optim import build_optimizer
from raydrat.core.runtime import resolve
from raydrat.core.step import train_step
from raydrat.tune.admission import SweepError, check_resources, worker_resources
from raydrat.tune.space import expand, load_space
from raydrat.tune.sweep import run_sweep


def estimated_bytes(cfg) -> int:
    """A trial's estimate as the sweep's admission makes it on this CPU machine."""
    return resolve(cfg, gpus=0).estimate.total_bytes

SHORT = {
    "train.steps": 6, "train.eval_every": 3, "train.log_every": 3, "train.eval_batches": 1,
    "optim.warmup_steps": 2, "scaling.cpus_per_worker": 0.25,
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


def test_unknown_sweep_key_is_named(tmp_path):
    with pytest.raises(ConfigError, match="max_concurent: unknown key"):
        load_space(_space(tmp_path, max_concurent=2))


def test_conditional_entries_expand_only_where_their_condition_holds(tmp_path):
    p = _space(tmp_path, space={
        "recompute.mode": {"grid": ["none", "full"]},
        "train.grad_accum": {"grid": [2, 4], "when": {"recompute.mode": "full"}},
    })
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
    key = lambda x: (x["val_loss"], x["peak_bytes"], -x["tokens_per_s"])  # noqa: E731
    return any(all(a <= b for a, b in zip(key(o), key(r))) and key(o) != key(r) for o in others)


@pytest.mark.slow
def test_sweep_budget_oom_mlflow_tree_and_pareto(ray_local, demo_dir: Path, tmp_path: Path, monkeypatch):
    space = {
        "model.d_model": {"grid": [32, 48, 64, 512]},
        # only the d_model=48 trial uses micro-batches of 8: the injected fault makes it OOM
        "train.batch_size": {"choice": [8], "when": {"model.d_model": 48}},
        "optim.lr": {"loguniform": [1e-3, 1e-2]},
    }
    overrides = {**SHORT, "train.batch_size": 4, "data.demo_dir": str(demo_dir)}
    est = {d: estimated_bytes(load_config("debug", [f"{k}={v}" for k, v in {**overrides, "model.d_model": d}.items()]))
           for d in (64, 512)}
    budget_gb = (est[64] + est[512]) / 2 / 1024**3
    p = _space(tmp_path, name="sweeptest", space=space, overrides=overrides, max_concurrent=2,
               memory_budget_gb=budget_gb, scheduler={"type": "none"})
    monkeypatch.chdir(tmp_path)
    summary = run_sweep(p, json_path="sweep.json", fit_callbacks=[OOMAbove(4)])
    out = summary.report
    assert "Pareto front" in out and "Train the best config at full length:" in out
    assert "raydrat train " in out

    records = {r["trial"]: r for r in json.loads((tmp_path / "sweep.json").read_text())["trials"]}
    assert [records[t]["status"] for t in ("t000", "t001", "t002", "t003")] == ["completed", "oom", "completed", "infeasible"]
    infeasible = records["t003"]
    assert infeasible["estimated_bytes"] > budget_gb * 1024**3 and infeasible["peak_bytes"] is None
    sweep_dir = next((tmp_path / "ray_results" / "tune").glob("sweeptest-*"))
    assert not list((sweep_dir / "train").glob("*-t003")), "an infeasible trial was launched"
    assert "OutOfMemoryError" in records["t001"]["error"]
    for t in ("t000", "t002"):
        r = records[t]
        assert math.isfinite(r["val_loss"]) and r["peak_bytes"] > 0 and r["tokens_per_s"] > 0
        assert r["estimated_bytes"] > 0 and r["micro_batch_size"] == 4 and r["steps"] == 6
        phases = r["phase_s"]  # the trial's time split: set-up, loop, and within the loop
        assert 0 < phases["time/data_setup_s"] and 0 < r["train_time_s"] < phases["time/loop_s"] < r["wall_s"]
        assert phases["time/eval_s"] > 0 and phases["time/checkpoint_s"] > 0
    overhead = json.loads((tmp_path / "sweep.json").read_text())["overhead"]
    parts = overhead["outside_steps_breakdown"]
    assert all(v >= 0 for v in parts.values()) and sum(parts.values()) == pytest.approx(1, abs=1e-3)
    assert parts["train_steps"] == pytest.approx(1 - overhead["outside_steps_share_in_trials"], abs=1e-3)
    assert "Trial time by part: data_setup" in out

    done = [r for r in records.values() if r["status"] == "completed"]
    for r in records.values():
        assert r["pareto"] == (r["status"] == "completed" and not _dominated(r, done)), r["trial"]
    with open(sweep_dir / "pareto.csv") as f:
        rows = list(csv.DictReader(f))
    assert sorted(row["trial"] for row in rows) == sorted(r["trial"] for r in records.values() if r["pareto"])
    assert rows and (sweep_dir / "pareto.png").stat().st_size > 0

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlruns.db'}")
    runs = client.search_runs([client.get_experiment_by_name("raydrat").experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1
    parent = parents[0]
    children = {r.data.tags["raydrat.trial"]: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
    assert sorted(children) == ["t000", "t001", "t002", "t003"]
    assert {t: r.data.tags["raydrat.status"] for t, r in children.items()} == {
        "t000": "completed", "t001": "oom", "t002": "completed", "t003": "infeasible"}
    assert parent.data.params["sweep.memory_budget_gb"] == str(budget_gb)
    assert parent.data.params["best.trial"] in ("t000", "t002")
    assert parent.data.tags["raydrat.trials.infeasible"] == "1"
    report = {a.path for a in client.list_artifacts(parent.info.run_id, "report")}
    assert {"report/pareto.csv", "report/pareto.png"} <= report
    # per-step metrics in the completed children; the infeasible one only has its estimate
    assert [m.step for m in client.get_metric_history(children["t000"].info.run_id, "val_loss")] == [3, 6]
    assert set(children["t003"].data.metrics) == {"estimated_bytes"}
    assert children["t003"].data.params["sweep.memory_budget_gb"] == str(budget_gb)


@pytest.mark.slow
def test_resume_after_interrupt_runs_only_the_remaining_trials(demo_dir: Path, tmp_path: Path):
    import os
    import signal
    import subprocess
    import time

    from conftest import raydrat_cmd

    p = _space(tmp_path, name="resumetest", max_concurrent=1, scheduler={"type": "none"},
               overrides={**SHORT, "data.demo_dir": str(demo_dir)},
               space={"optim.lr": {"grid": [1e-3, 2e-3]}})
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.Popen(raydrat_cmd("tune", str(p)), cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 400
    done_marker = None
    while time.time() < deadline and proc.poll() is None:
        results = list((tmp_path / "ray_results" / "tune").glob("resumetest-*/t000/result.json"))
        if results and '"completed"' in results[0].read_text():
            done_marker = results[0]
            break
        time.sleep(1)
    assert done_marker is not None, "the first trial never completed"
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode != 0, out[-3000:]
    assert "--resume" in out, out[-3000:]

    resumed = run_cli(["tune", str(p), "--resume", "--json", "sweep.json"], cwd=tmp_path)
    out2 = resumed.stdout + resumed.stderr
    assert resumed.returncode == 0, out2[-5000:]
    records = json.loads((tmp_path / "sweep.json").read_text())["trials"]
    assert [r["status"] for r in records] == ["completed"] * 2
    # t000 was not run again: its Ray Train run and its MLflow metrics exist once
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlruns.db'}")
    first = next(r for r in records if r["trial"] == "t000")
    assert [m.step for m in client.get_metric_history(first["mlflow_run_id"], "val_loss")] == [3, 6]
    sweep_dirs = list((tmp_path / "ray_results" / "tune").glob("resumetest-*"))
    assert len(sweep_dirs) == 1
    assert len(list((sweep_dirs[0] / "train").glob("resumetest-*-t000"))) == 1


def test_best_trial_follows_the_sweep_metric_and_mode():
    """``best`` ranks by ``sweep.metric`` in ``sweep.mode``, not by val_loss."""
    from raydrat.tune.report import TrialRecord
    from raydrat.tune.results import best_trial

    def rec(name, val_loss, metric, status="completed"):
        return TrialRecord(name, {}, status, estimated_bytes=1, val_loss=val_loss, metric_value=metric, peak_bytes=1)

    records = [rec("t000", 3.0, 900.0), rec("t001", 2.0, 100.0), rec("t002", 4.0, 500.0),
               rec("t003", 1.0, 5000.0, status="oom")]
    assert best_trial(records, "max").trial == "t000"  # e.g. metric: tokens_per_s, mode: max
    assert best_trial(records, "min").trial == "t001"
    assert best_trial([rec("t000", 3.0, None)], "min") is None  # a trial that never reported the metric
