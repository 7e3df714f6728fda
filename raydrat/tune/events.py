"""The sweep's console, one line per trial event (instead of Tune's status tables, which
``raydrat tune --verbose`` keeps), and the child runs of trials Tune stopped or lost.

A trial the scheduler stops is killed before its function returns, and a trial whose
process dies cannot close its own run: the driver closes both here, when Tune reports the
trial done, so every child run ends when its trial ends."""

from __future__ import annotations

import logging
import math
import os
import re
from collections.abc import Callable
from pathlib import Path

from ray import cloudpickle
from ray.tune import Callback
from ray.tune.experiment import Trial

from raydrat.core import metrics as M
from raydrat.crash import secondary
from raydrat.ray_train.trainer import log_loss_curve
from raydrat.redact import reveal_uri
from raydrat.tune import report as R
from raydrat.tune.mlflow_runs import end_trial_run, find_trial_run, last_logged_step
from raydrat.tune.trial import ERROR, STATUS, root_cause

ERROR_LINE = re.compile(r"^(\w+(?:Error|Exception|Interrupt)\b.*)$", re.M)


def trial_error(trial: Trial) -> str | None:
    """Why ``trial`` failed, in one line. Tune writes the error into the trial's local folder
    before it calls back (its copy in storage, which ``Trial.get_pickled_error`` reads, comes
    later), so the local files are read first."""
    pickled, text = trial.pickled_error_file, trial.error_file
    if pickled and os.path.exists(pickled):
        with open(pickled, "rb") as f:
            return root_cause(cloudpickle.load(f))
    if text and os.path.exists(text):
        with open(text) as f:
            return _last_error_line(f.read())
    error = trial.get_pickled_error() or trial.get_error()
    return root_cause(error) if isinstance(error, BaseException) else _last_error_line(error or "")


def _last_error_line(text: str) -> str | None:
    lines = ERROR_LINE.findall(text)
    return lines[-1][:500] if lines else None


def figures(result: dict, metric: str) -> str:
    parts = []
    for key in dict.fromkeys((metric, M.VAL_LOSS)):
        v = result.get(key)
        if isinstance(v, (int, float)) and math.isfinite(v):
            parts.append(f"{key} {v:.4f}")
    if result.get(M.TOKENS_PER_S_AVG):
        parts.append(f"{result[M.TOKENS_PER_S_AVG]:,.0f} tokens/s")
    if result.get(M.PEAK_MIB):
        parts.append(f"peak {R.fmt_bytes(result[M.PEAK_MIB] * M.MIB)}")
    return ", ".join(parts)


class TrialEvents(Callback):
    """``started``, each report, and how the trial ended, for each trial."""

    def __init__(
        self,
        log: logging.Logger,
        metric: str,
        uri: str | None,
        parent_run_id: str | None,
        ended: Callable[[str, str], None] | None = None,
    ):
        self.log, self.metric = log, metric
        self.uri, self.parent_run_id = uri, parent_run_id
        self.ended = ended
        """``ended(trial, status)``: keeps how Tune ended the trial (``TERMINATED``, ``ERROR``)."""
        self.last_step: dict[str, int] = {}

    def on_trial_start(self, iteration: int, trials: list, trial: Trial, **info) -> None:
        p = trial.config["trial"]
        self.log.info(
            f"{p['name']} started: {R.params_text(p['params'])} (estimated peak {R.fmt_bytes(p['estimated_bytes'])})"
        )

    def on_trial_result(self, iteration: int, trials: list, trial: Trial, result: dict, **info) -> None:
        if STATUS in result:
            return  # the trial's own last report: on_trial_complete says how it ended
        p = trial.config["trial"]
        step = result.get(M.STEP)
        if step is not None:
            self.last_step[p["name"]] = int(step)
        self.log.info(f"{p['name']} step {step}/{p['steps']}: {figures(result, self.metric)}")

    def on_trial_complete(self, iteration: int, trials: list, trial: Trial, **info) -> None:
        p, last = trial.config["trial"], trial.last_result or {}
        if self.ended:
            self.ended(p["name"], "TERMINATED")
        if STATUS in last:
            tail = (
                f": {last[ERROR]}"
                if last.get(ERROR)
                else (f": {figures(last, self.metric)}" if last[STATUS] == "completed" else "")
            )
            self.log.info(f"{p['name']} {last[STATUS]} in {last.get('trial_wall_s', 0):.0f}s{tail}")
            return
        step = self.last_step.get(p["name"])
        run = find_trial_run(reveal_uri(self.uri), self.parent_run_id, p["name"])
        if run and run.status() == "RUNNING":
            # killed before its function returned: its loss curves are plotted here, from the
            # store (its per-epoch data counts were in its process, and are gone with it)
            with secondary(f"logging the loss curve of {p['name']} to MLflow run {run.run_id}"):
                log_loss_curve(run, p["run_name"], Path(p["config"]["train"]["storage_path"]) / p["run_name"])
            end_trial_run(run, "stopped_early")
        logged = last_logged_step(run) if run else None
        trained = f"; it had logged step {logged}/{p['steps']}" if logged is not None and logged != step else ""
        self.log.info(f"{p['name']} stopped by the scheduler at its step {step}/{p['steps']} report{trained}")

    def on_trial_error(self, iteration: int, trials: list, trial: Trial, **info) -> None:
        p = trial.config["trial"]
        if self.ended:
            self.ended(p["name"], "ERROR")
        cause = trial_error(trial) or "the trial's process ended (Tune recorded no error)"
        run = find_trial_run(reveal_uri(self.uri), self.parent_run_id, p["name"])
        if run and run.status() == "RUNNING":
            end_trial_run(run, "failed", cause)
        self.log.info(f"{p['name']} failed: {cause}")
