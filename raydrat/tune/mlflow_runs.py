"""A sweep's MLflow runs: the parent run (opened when the sweep starts, closed with the
report), and one child run per trial that lives as long as the trial does.

* A launched trial opens its child run itself when it starts (:func:`start_trial_run`, in
  the trial function) and closes it when it ends: ``FINISHED`` when it trained, ``FAILED``
  for ``oom`` and ``failed`` (:func:`end_trial_run`). A trial the scheduler stops is killed
  by Tune before it can: the driver closes its run when Tune reports it stopped
  (:class:`raydrat.tune.events.TrialEvents`).
* A refused proposal (``infeasible``, or a config this hardware cannot run) gets a child
  run that never ran: tagged with why, with its estimate and the budget, and no end time,
  so the UI shows no duration (:func:`record_refused`).
* A sweep that is interrupted ends its running children ``KILLED`` and its parent
  ``KILLED``; resumed, the parent runs again, and each trial started again reopens its own
  child (:func:`start_trial_run`).
* When the sweep ends, each child's ``raydrat.status`` tag is set to the status the report
  gives (:func:`finalize_trial_runs`): a trial the scheduler stopped after its last step
  has ``completed``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from raydrat.config import RaydratConfig
from raydrat.core import metrics as M
from raydrat.tracking import Run, run_params
from raydrat.tune import report as R
from raydrat.tune.space import Space

SWEEP_TAG = "raydrat.sweep"
TRIAL_TAG = "raydrat.trial"
STATUS_TAG = "raydrat.status"
ERROR_TAG = "raydrat.error"
REFUSED_TAG = "raydrat.refused_because"
STOPPED_AT_TAG = "raydrat.stopped_at_step"
MLFLOW_STATUS = {"completed": "FINISHED", "stopped_early": "FINISHED", "oom": "FAILED", "failed": "FAILED"}
REFUSED_STATUS = "KILLED"
"""A refused trial's run status: it was stopped before it started (and has no end time)."""


def child_run_name(trial: str, sweep_name: str) -> str:
    """A trial's MLflow run name: its id first (the UI's run-name column is narrow)."""
    return f"{trial}-{sweep_name}"


def start_parent(space: Space, uri: str | None, sweep_name: str, experiment: str) -> Run:
    """The sweep's parent run: its settings as params and the space file as an artifact."""
    if not uri:
        return Run.off()
    sweep = space.sweep
    parent = Run.start(
        uri,
        experiment,
        sweep_name,
        params={
            "sweep.space_file": str(space.path),
            "sweep.base": sweep.base,
            "sweep.search": sweep.search,
            "sweep.memory_budget_gb": sweep.memory_budget_gb,
            "sweep.max_concurrent": sweep.max_concurrent,
            "sweep.metric": sweep.metric,
            "sweep.mode": sweep.mode,
            "sweep.num_samples": sweep.num_samples,
            "sweep.seed": sweep.seed,
            "sweep.scheduler": sweep.scheduler.type,
            **{f"sweep.space.{k}": v for k, v in sweep.space.items()},
        },
        tags={SWEEP_TAG: sweep_name},
    )
    parent.log_artifact(space.path, "space")
    # the sweep's own view in the UI: its trials ranked by val loss, the loss charts first
    parent.share_view(sweep_name, f"tags.`{SWEEP_TAG}` = '{sweep_name}'")
    return parent


def _trial_params(cfg: RaydratConfig | None, runtime: Any, name: str, params: dict, budget_gb: float | None) -> dict:
    out = run_params(cfg, runtime) if cfg is not None else {}
    out.update(
        {"sweep.trial": name, "sweep.memory_budget_gb": budget_gb, **{f"sweep.param.{k}": v for k, v in params.items()}}
    )
    return out


def start_trial_run(p: dict, cfg: RaydratConfig, started_s: float) -> Run:
    """In the trial function, as the trial starts (at ``started_s``): its child run, with the
    sections it uses as params, the estimate it was admitted with, and its full config as
    ``config.yaml``. A trial started again (a resumed sweep runs its unfinished trials again)
    reopens the child run it had: one run per trial, holding what it trained before."""
    if not p["tracking_uri"] or not p["parent_run_id"]:
        return Run.off()
    before = find_trial_run(p["tracking_uri"], p["parent_run_id"], p["name"])
    if before:
        before.set_tags({STATUS_TAG: "resumed"})
        before.set_status("RUNNING")
        return before
    run = Run.start(
        p["tracking_uri"],
        cfg.tracking.experiment,
        child_run_name(p["name"], p["sweep"]),
        params=_trial_params(cfg, p["runtime"], p["name"], p["params"], p["budget_gb"]),
        tags={**p["source_tags"], SWEEP_TAG: p["sweep"], TRIAL_TAG: p["name"]},
        parent=Run.attach(p["tracking_uri"], p["parent_run_id"]),
        start_time_s=started_s,
    )
    run.log_text(cfg.to_yaml(), "config.yaml")
    return run


def end_trial_run(run: Run, status: str, error: str | None = None, end_s: float | None = None) -> None:
    """Close a trial's run: its status as a tag (and the error's root cause), ``FINISHED``
    or ``FAILED``."""
    run.set_tags({STATUS_TAG: status, **({ERROR_TAG: error} if error else {})})
    run.end(MLFLOW_STATUS[status], end_s)


def record_refused(
    uri: str | None, experiment: str, parent_run_id: str | None, sweep_name: str, verdict, source_tags: dict[str, str]
) -> str | None:
    """The child run of a proposal that was never launched: why (tag), its estimate and the
    budget, and no end time (it has no duration). Returns its id."""
    if not uri or not parent_run_id:
        return None
    cfg = verdict.spec.config if verdict.spec is not None else None
    budget_gb = verdict.budget / R.GB if verdict.budget is not None else None
    run = Run.start(
        uri,
        experiment,
        child_run_name(verdict.name, sweep_name),
        params=_trial_params(cfg, verdict.runtime, verdict.name, verdict.params, budget_gb),
        tags={
            **source_tags,
            SWEEP_TAG: sweep_name,
            TRIAL_TAG: verdict.name,
            STATUS_TAG: verdict.refused,
            REFUSED_TAG: verdict.reason or "",
        },
        parent=Run.attach(uri, parent_run_id),
    )
    if cfg is not None:
        run.log_text(cfg.to_yaml(), "config.yaml")
    run.set_status(REFUSED_STATUS)
    return run.run_id


def find_trial_run(uri: str | None, parent_run_id: str | None, trial: str) -> Run:
    """A trial's child run, looked up by its tags (the trial opened it itself)."""
    if not uri or not parent_run_id:
        return Run.off()
    found = Run.attach(uri, parent_run_id).children(f"tags.`{TRIAL_TAG}` = '{trial}'")
    return found[0] if found else Run.off()


def last_logged_step(run: Run) -> int | None:
    """The last step a run logged a loss at (what its trial trained, as far as it reported)."""
    steps = [h[-1][0] for key in (M.TRAIN_LOSS, M.VAL_LOSS) if (h := run.metric_history(key))]
    return max(steps) if steps else None


def interrupt_running_children(uri: str | None, parent_run_id: str | None) -> None:
    """When a sweep is interrupted (and again on resume, for a driver that died): the runs of
    trials the interrupt cut off end ``KILLED`` (a resumed sweep starts those trials again,
    each in its own run)."""
    if not uri or not parent_run_id:
        return
    for run in Run.attach(uri, parent_run_id).children("attributes.status = 'RUNNING'"):
        run.set_tags({STATUS_TAG: "interrupted"})
        run.end("KILLED")


def finalize_trial_runs(uri: str | None, records: list[R.TrialRecord]) -> None:
    """Each launched trial's run tagged with its final status (and the step a stopped one
    stopped at); a run still open (its trial's process died) is closed by its status."""
    if not uri:
        return
    for r in records:
        if not r.mlflow_run_id or not r.launched:
            continue
        run = Run.attach(uri, r.mlflow_run_id)
        tags = {STATUS_TAG: r.status}
        if r.status == "stopped_early" and r.steps is not None:
            tags[STOPPED_AT_TAG] = str(r.steps)
        if r.error:
            tags[ERROR_TAG] = r.error
        run.set_tags(tags)
        if run.status() == "RUNNING":
            run.end(MLFLOW_STATUS.get(r.status, "FAILED"), r.end_ts)


def log_sweep_report(
    parent: Run,
    artifacts: list[Path],
    best: R.TrialRecord | None,
    command: str | None,
    metric: str,
    counts: dict[str, int],
    figures: dict[str, float],
) -> None:
    """The parent run's report, plot and CSV, the best trial, the status counts and the
    sweep's figures; then the parent ends."""
    for p in artifacts:
        parent.log_artifact(p, "report")
    if best:
        parent.log_params({"best.trial": best.trial, **{f"best.{k}": v for k, v in best.params.items()}})
        parent.log_text(best.trial + "\n" + (command or "") + "\n", "best_config.txt")
        parent.log_metrics({f"sweep/best_{metric}": best.metric_value}, 0)
    parent.set_tags({f"raydrat.trials.{k}": str(v) for k, v in counts.items()})
    # the sweep's own figures in their own section of the charts, apart from the trials' curves
    parent.log_metrics({f"sweep/{k}": v for k, v in figures.items()}, 0)
    parent.end("FINISHED")
