"""A sweep's MLflow runs: the parent run, one child run per trial (an infeasible trial is
recorded and ended at once, never launched), their statuses at the end, and the parent's
report artifacts."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from raydrat.tracking import Run
from raydrat.tune import report as R
from raydrat.tune.space import Space, TrialSpec

STATUS_TAG = "raydrat.status"
MLFLOW_STATUS = {"completed": "FINISHED", "stopped_early": "KILLED", "infeasible": "KILLED",
                 "oom": "FAILED", "failed": "FAILED"}


def start_sweep_runs(space: Space, trials: list[TrialSpec], estimates: list[int], feasible: list[bool],
                     uri: str | None, sweep_name: str) -> dict[str, Any]:
    """The parent run and every trial's child run; returns their ids (the sweep's state)."""
    state: dict[str, Any] = {"parent_run_id": None, "child_runs": {}}
    if not uri:
        return state
    sweep = space.sweep
    exp = trials[0].config.tracking.experiment
    parent = Run.start(uri, exp, sweep_name, params={
        "sweep.space_file": str(space.path), "sweep.base": sweep.base,
        "sweep.memory_budget_gb": sweep.memory_budget_gb, "sweep.trials": len(trials),
        "sweep.max_concurrent": sweep.max_concurrent, "sweep.metric": sweep.metric,
        "sweep.mode": sweep.mode, "sweep.num_samples": sweep.num_samples, "sweep.seed": sweep.seed,
        "sweep.scheduler": sweep.scheduler.type,
    }, tags={"raydrat.sweep": sweep_name})
    parent.log_artifact(space.path, "space")
    state["parent_run_id"] = parent.run_id
    for t, est, ok in zip(trials, estimates, feasible):
        child = Run.start(
            uri, exp, f"{sweep_name}-{t.name}",
            params={**t.config.flat(), "sweep.trial": t.name,
                    **{f"sweep.param.{k}": v for k, v in t.params.items()}},
            tags={"raydrat.sweep": sweep_name, "raydrat.trial": t.name},
            parent=parent,
        )
        child.log_metrics({"estimated_bytes": est}, 0)
        if not ok:
            child.log_params({"sweep.memory_budget_gb": sweep.memory_budget_gb})
            child.set_tag(STATUS_TAG, "infeasible")
            child.end(MLFLOW_STATUS["infeasible"])
        state["child_runs"][t.name] = child.run_id
    return state


def close_child_runs(uri: str, records: list[R.TrialRecord]) -> None:
    """Tag every launched trial's child run with its status and end it accordingly."""
    for r in records:
        if not r.mlflow_run_id or r.status == "infeasible":
            continue
        child = Run.attach(uri, r.mlflow_run_id)
        child.set_tag(STATUS_TAG, r.status)
        if r.error:
            child.set_tag("raydrat.error", r.error[:5000])
        child.log_metrics({
            "peak_bytes": r.peak_bytes, "estimated_bytes": r.estimated_bytes,
            "final_micro_batch_size": r.micro_batch_size,
        }, r.steps or 0)
        child.end(MLFLOW_STATUS[r.status])


def log_sweep_report(parent: Run, artifacts: list[Path], best: R.TrialRecord | None, command: str | None,
                     metric: str, counts: dict[str, int], figures: dict[str, float]) -> None:
    """The parent run's report, plot and CSV, the best trial, the status counts and the
    overhead figures; then the parent ends."""
    for p in artifacts:
        parent.log_artifact(p, "report")
    if best:
        parent.log_params({"best.trial": best.trial, **{f"best.{k}": v for k, v in best.params.items()}})
        parent.log_text(best.trial + "\n" + (command or "") + "\n", "best_config.txt")
        parent.log_metrics({f"best_{metric}": best.metric_value}, 0)
    for k, v in counts.items():
        parent.set_tag(f"raydrat.trials.{k}", str(v))
    parent.log_metrics(figures, 0)
    parent.end("FINISHED")
