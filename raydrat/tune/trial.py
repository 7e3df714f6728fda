"""The Tune trial function: one trial is one call of the same training path as ``raydrat
train`` (datasets → ``build_trainer`` → ``fit``, via :func:`raydrat.ray_train.trainer.fit_in_run`),
with ``TuneReportCallback`` forwarding every ``ray.train.report`` to Tune (Train V2 pattern).

The trial opens its MLflow child run when it starts and closes it when it ends, before its
last report (a scheduler may stop the trial at any report); a trial started again by a
resumed sweep continues in the child run it had. An out-of-memory error inside
training ends the trial with status ``oom`` (a result: the sweep goes on); any other
exception closes the run ``FAILED`` with its root cause and fails the trial.
"""

from __future__ import annotations

import math
import time

import ray.tune
from ray.tune.integration.ray_train import TuneReportCallback

from raydrat.config import RaydratConfig
from raydrat.core import metrics as M
from raydrat.core.microbatch import is_oom
from raydrat.crash import first_line, innermost, process_death, secondary
from raydrat.ray_data.datasets import build_datasets
from raydrat.ray_session import quiet_ray_data
from raydrat.ray_train.models import log_run_models
from raydrat.ray_train.trainer import fit_in_run, log_data, log_epochs
from raydrat.tune.mlflow_runs import end_trial_run, start_trial_run

STATUS = "status"
TRIAL_WALL_S = "trial_wall_s"
TRIAL_START = "trial_start_ts"
TRIAL_END = "trial_end_ts"
DATA_SETUP_S = "system/data_setup_s"  # planning the corpus and building the val split
ERROR = "error"
RUN_ID = "mlflow_run_id"


def trial_fn(config: dict, tracking_uri: str | None = None) -> None:
    """One trial. ``tracking_uri`` comes through ``tune.with_parameters`` (the payload's
    copy has its password masked)."""
    t0 = time.time()
    payload = {**config["trial"], "tracking_uri": tracking_uri or config["trial"]["tracking_uri"]}
    cfg = RaydratConfig.model_validate(payload["config"])
    run = start_trial_run(payload, cfg, t0)
    final: dict = {}
    status, error = "completed", None
    try:
        quiet_ray_data()
        bundle = build_datasets(cfg.data, cfg.model.seq_len, cfg.model.vocab_size)
        final[DATA_SETUP_S] = time.time() - t0
        run.log_metrics({DATA_SETUP_S: final[DATA_SETUP_S]}, 0)
        log_data(run, bundle)
        result = fit_in_run(
            cfg,
            payload["runtime"],
            bundle,
            run,
            payload["run_name"],
            callbacks=[TuneReportCallback()],
            worker_resources=payload["worker_resources"],
            fit_callbacks=payload.get("fit_callbacks", ()),
        )
        final.update(result.metrics or {})
        log_epochs(run, bundle)
        log_run_models(run, cfg, result, register=False)  # the sweep registers its best trial's
    except Exception as exc:
        if not is_oom(exc):
            with secondary(f"closing the trial's MLflow run {run.run_id}"):  # the trial's own error wins
                end_trial_run(run, "failed", root_cause(exc))
            raise
        status, error = "oom", oom_line(exc)
    end = time.time()
    end_trial_run(run, status, error, end)
    # the last report: no `step` (the scheduler ranked the trial at its reported steps)
    final.pop(M.STEP, None)
    final.setdefault(payload["metric"], math.nan)
    final.update(
        {STATUS: status, ERROR: error, RUN_ID: run.run_id, TRIAL_WALL_S: end - t0, TRIAL_START: t0, TRIAL_END: end}
    )
    ray.tune.report(final)


def oom_line(exc: BaseException) -> str:
    lines = [ln for ln in str(exc).strip().splitlines() if ln.strip()]
    for ln in reversed(lines):
        if "OutOfMemoryError" in ln or "out of memory" in ln:
            return ln.strip()[:500]
    return (lines[-1] if lines else type(exc).__name__)[:500]


def root_cause(exc: BaseException) -> str:
    """Why a trial failed, in one line: whose process died (a trial's, a training worker's),
    else the innermost error Ray's wrappers carry, as ``Type: first line``."""
    return (process_death(exc) or first_line(innermost(exc)))[:500]
