"""The Tune trial function: one trial is one call of the same training path as ``raydrat
train`` (datasets → ``build_trainer`` → ``fit``, via :func:`raydrat.ray_train.trainer.fit_in_run`),
with ``TuneReportCallback`` forwarding every ``ray.train.report`` to Tune (Train V2 pattern).

An out-of-memory error inside training ends the trial with status ``oom`` (not an error), so
the sweep goes on; any other exception fails the trial (status ``failed``).
"""

from __future__ import annotations

import math
import time

import ray.tune
from ray.tune.integration.ray_train import TuneReportCallback

from raydrat.config import RaydratConfig
from raydrat.core import metrics as M
from raydrat.core.microbatch import is_oom
from raydrat.ray_data.datasets import build_datasets
from raydrat.ray_session import quiet_ray_data
from raydrat.ray_train.trainer import fit_in_run
from raydrat.tracking import Run

STATUS = "status"
TRIAL_WALL_S = "trial_wall_s"
TRIAL_START = "trial_start_ts"
TRIAL_END = "trial_end_ts"
DATA_SETUP_S = "time/data_setup_s"  # planning the corpus and building the val split
ERROR = "error"


def trial_fn(config: dict, tracking_uri: str | None = None) -> None:
    """One trial. ``tracking_uri`` comes through ``tune.with_parameters`` (the payload's
    copy has its password masked)."""
    t0 = time.time()
    payload = config["trial"]
    cfg = RaydratConfig.model_validate(payload["config"])
    run = Run.attach(tracking_uri or payload["tracking_uri"], payload["run_id"])

    quiet_ray_data()
    bundle = build_datasets(cfg.data, cfg.model.seq_len, cfg.model.vocab_size,
                            reserved_cpus=cfg.scaling.num_workers * cfg.scaling.cpus_per_worker)
    data_setup_s = time.time() - t0
    run.log_text(cfg.to_yaml(), "config.yaml")
    final: dict = {STATUS: "completed", DATA_SETUP_S: data_setup_s}
    try:
        result = fit_in_run(
            cfg, payload["runtime"], bundle, run, payload["run_name"],
            callbacks=[TuneReportCallback()], worker_resources=payload["worker_resources"],
            fit_callbacks=payload.get("fit_callbacks", ()),
        )
        final[M.VAL_LOSS] = (result.metrics or {}).get(M.VAL_LOSS, math.nan)
    except Exception as exc:  # noqa: BLE001 - OOM is a result, everything else fails the trial
        if not is_oom(exc):
            raise
        final.update({STATUS: "oom", M.VAL_LOSS: math.nan, ERROR: _last_line(exc)})
    end = time.time()
    final.update({TRIAL_WALL_S: end - t0, TRIAL_START: t0, TRIAL_END: end})
    ray.tune.report(final)


def _last_line(exc: BaseException) -> str:
    lines = [ln for ln in str(exc).strip().splitlines() if ln.strip()]
    for ln in reversed(lines):
        if "OutOfMemoryError" in ln or "out of memory" in ln:
            return ln.strip()[:500]
    return (lines[-1] if lines else type(exc).__name__)[:500]
