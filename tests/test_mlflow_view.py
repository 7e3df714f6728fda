"""What a person sees of a training run in the MLflow UI, read back from a real SQLite store:
the metric names follow the rules of :mod:`raydrat.core.metrics` (units in the names of
memory figures, system figures under ``system/`` and rounded, no heap figure), the losses
lead the run's metric list, the estimate is a param, and every page raydrat prints opens the
UI's model-training view. Runs logged under the old names read the same."""

from __future__ import annotations

import json
from pathlib import Path

from mlflow.tracking import MlflowClient

from raydrat import tracking
from raydrat.bench.local import LocalData, LocalRun
from raydrat.config import load_config
from raydrat.config.sweep import SweepConfig
from raydrat.core import metrics as M
from raydrat.core.runtime import resolve
from raydrat.ray_train.callbacks import RunMetrics
from raydrat.ray_train.trainer import TrainingSummary
from raydrat.tracking import Run
from raydrat.tracking.views import VIEW_KEY, VIEW_TAG, view_state
from raydrat.tune.results import logged_values

OVERRIDES = [
    "train.device=cpu",
    "scaling.cpus_per_worker=1",
    "train.steps=8",
    "train.log_every=2",
    "train.eval_every=4",
    "train.eval_batches=1",
    "optim.warmup_steps=1",
]


def _train(uri: str) -> tuple[Run, LocalRun]:
    """A training run as the driver and rank 0 log it (params from the resolved runtime,
    metrics through the worker's callback), on the core loop without Ray."""
    cfg = load_config("debug", OVERRIDES)
    runtime = resolve(cfg)
    run = Run.start(uri, "raydrat", "view", params=tracking.run_params(cfg, runtime))
    local = LocalRun.start(cfg, LocalData.random(cfg, cfg.train.steps), [RunMetrics(run)], runtime=runtime).run()
    return run, local


def test_a_training_runs_metrics_follow_the_naming_rules_and_lead_with_the_loss(tmp_path: Path):
    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    run, local = _train(uri)
    client = MlflowClient(tracking_uri=uri)
    stored = client.get_run(run.run_id)
    keys = list(stored.data.metrics)  # in the order the store returns them: the run page lists them so

    assert {M.TRAIN_LOSS, M.VAL_LOSS, M.LR, M.GRAD_NORM, M.PEAK_MIB, M.TOKENS_PER_S, M.TRAIN_TIME_S} <= set(keys)
    # no heap figure; a memory figure names its unit (MiB), never raw bytes
    assert not [k for k in keys if "heap" in k or "bytes" in k], keys
    assert all("_mib" in k for k in (M.PEAK_MIB, M.COMM_MIB_PER_STEP, M.COMM_MIB_TOTAL, M.ACTIVATION_MIB))
    # how fast and how much memory are system figures (the run page's System metrics), rounded
    system = [k for k in keys if k.startswith(M.SYSTEM)]
    assert {M.TOKENS_PER_S, M.TOKENS_PER_S_AVG, M.PEAK_MIB, M.TRAIN_TIME_S, M.LOOP_S, *M.PHASES} <= set(system)
    assert not [k for k in keys if k.endswith("_s") and not k.startswith(M.SYSTEM)], keys
    for key in system:
        values = [m.value for m in client.get_metric_history(run.run_id, key)]
        assert values and all(v == round(v, M.SYSTEM_DECIMALS) for v in values), (key, values)
    # the peak as measured: the allocator's bytes, in MiB
    assert abs(stored.data.metrics[M.PEAK_MIB] - local.peak.peak() / M.MIB) <= 0.001
    # the losses lead the run's metrics (the other figures waited for the first val_loss),
    # and nothing was lost by waiting: every log step of every figure is there
    model = [k for k in keys if not k.startswith(M.SYSTEM)]
    assert model[:2] == [M.TRAIN_LOSS, M.VAL_LOSS], model
    for key in (M.TRAIN_LOSS, M.LR, M.GRAD_NORM, M.TOKENS_PER_S):
        assert [m.step for m in client.get_metric_history(run.run_id, key)] == [2, 4, 6, 8], key
    # the estimate is known before the first step: a param, in MiB
    estimate = float(stored.data.params[M.ESTIMATED_PEAK_PARAM])
    assert estimate == round(local.runtime.estimate.total_bytes / M.MIB, 3) > 0


def test_the_pages_raydrat_prints_open_the_training_view(tmp_path: Path):
    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    run = Run.start(uri, "raydrat", "view")
    exp = MlflowClient(tracking_uri=uri).get_experiment(run.experiment_id())
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    summary = TrainingSummary("view", 1.0, 10.0, 8, 1.0, None, run, {M.PEAK_MIB: 9.5}, 9 * M.MIB)
    lines = summary.lines()
    assert "peak memory per worker (PyTorch's allocator, training steps): 9.5 MiB (estimated 9.0 MiB)" in lines
    pages = [ln.split("open ", 1)[-1].split(": ", 1)[-1] for ln in lines if "http://" in ln]
    assert pages == [
        tracking.ui_url(uri, exp.experiment_id),
        f"http://127.0.0.1:5000/#/experiments/{exp.experiment_id}/runs/{run.run_id}?workflowType=machine_learning",
    ]
    assert all("workflowType=machine_learning" in p for p in pages)
    run.end()
    # an experiment whose view an older raydrat made (other column names) gets today's
    client = MlflowClient(tracking_uri=uri)
    client.set_experiment_tag(exp.experiment_id, VIEW_TAG + VIEW_KEY, '{"selectedColumns": ["metrics.`peak_bytes`"]}')
    Run.start(uri, "raydrat", "again").end()
    view = json.loads(client.get_experiment(exp.experiment_id).tags[VIEW_TAG + VIEW_KEY])
    assert view == view_state() and f"metrics.`{M.PEAK_MIB}`" in view["selectedColumns"]


def test_runs_logged_under_the_old_names_read_the_same(tmp_path: Path):
    """A sweep's report over trials that ran before the metrics were renamed: raw bytes and
    the old throughput name read as today's figures; a sweep metric spelled the old way
    means today's."""
    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    old = Run.start(uri, "raydrat", "old")
    old.log_metrics(
        {"val_loss": 4.5, "peak_bytes": 3 * M.MIB, "tokens_per_s_avg": 1234.0, "comm_bytes_total": M.MIB}, 4
    )
    old.end()
    values, steps, _ = logged_values(uri, old.run_id)
    assert values == {
        M.VAL_LOSS: 4.5,
        M.PEAK_MIB: 3.0,
        M.TOKENS_PER_S_AVG: 1234.0,
        M.COMM_MIB_TOTAL: 1.0,
    }
    assert steps == 4
    assert SweepConfig(metric="tokens_per_s_avg", mode="max").metric == M.TOKENS_PER_S_AVG
    assert SweepConfig().metric == M.VAL_LOSS
