"""After a sweep: one record per trial, the command that trains the chosen config at full
length, and where the trials' time went.

One source of truth per trial: its own reports. The training worker logs every report to
the trial's MLflow child run as it makes it (:class:`raydrat.ray_train.callbacks.RunMetrics`),
so a launched trial's figures are its child run's last metrics, and its steps are the last
step it logged. Tune's view can lag behind: a trial the scheduler stops goes on training
until its process is killed, and Tune drops what it reports meanwhile. Without tracking,
the figures are the last results Tune received.

A trial that died before its first report (its process killed) has no config in Tune's
result: its payload comes from the sweep's state, where the launcher kept it.

Statuses: ``completed`` (trained every step), ``stopped_early`` (stopped by the scheduler
before its last step; ``steps`` is the step it stopped at), ``oom``, ``failed`` (with the
root cause), and for proposals never launched ``infeasible`` (estimate over the budget) or
``failed`` with the reason.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

from raydrat.core import metrics as M
from raydrat.core.microbatch import is_oom
from raydrat.tracking import Run
from raydrat.tune import report as R
from raydrat.tune.mlflow_runs import find_trial_run
from raydrat.tune.space import Space
from raydrat.tune.trial import DATA_SETUP_S, ERROR, RUN_ID, STATUS, TRIAL_END, TRIAL_START, TRIAL_WALL_S, root_cause

SHORT_RUN_KEYS = ("train.steps", "train.eval_every", "train.log_every", "optim.warmup_steps")
"""Settings that make a sweep trial short; the "train at full length" command drops them."""


def _last(df, key):
    if df is None or key not in df:
        return None
    col = df[key].dropna()
    col = col[col.map(lambda v: not (isinstance(v, float) and math.isinf(v)))]
    return col.iloc[-1].item() if len(col) else None


def _int(v):
    return None if v is None else int(v)


def logged_values(uri: str, run_id: str) -> tuple[dict[str, float], int | None, dict[str, float]]:
    """A child run's last metrics (under today's names: a trial that ran before a metric was
    renamed reads the same), the last step it logged a loss at, and its start and end
    (seconds since the epoch)."""
    run = Run.attach(uri, run_id)
    record = run.fetch()
    steps = [h[-1][0] for key in (M.TRAIN_LOSS, M.VAL_LOSS) if (h := run.metric_history(key))]
    times = {
        "start": record.info.start_time / 1000 if record.info.start_time else None,
        "end": record.info.end_time / 1000 if record.info.end_time else None,
    }
    return M.current(dict(record.data.metrics)), (max(steps) if steps else None), times


def settle(uri: str | None, run_ids: list[str], quiet_s: float = 2.0, limit_s: float = 30.0) -> None:
    """Wait until the runs of stopped trials log nothing more: Tune has returned, but a
    stopped trial's worker may still be finishing a log it began before its run closed."""
    if not uri or not run_ids:
        return
    runs = [Run.attach(uri, r) for r in run_ids]

    def marks():
        return [tuple(len(r.metric_history(k)) for k in (M.TRAIN_LOSS, M.PEAK_MIB)) for r in runs]

    deadline, last = time.time() + limit_s, marks()
    while time.time() < deadline:
        time.sleep(quiet_s)
        now = marks()
        if now == last:
            return
        last = now


def tune_values(df) -> tuple[dict[str, float], int | None]:
    """The last value Tune received of each key (no tracking)."""
    keys = [c for c in (df.columns if df is not None else []) if isinstance(c, str)]
    values = {k: v for k in keys if isinstance(v := _last(df, k), (int, float)) and not isinstance(v, bool)}
    return M.current(values), _int(values.get(M.STEP))


def launched_info(payload: dict) -> dict[str, Any]:
    """What the report needs of a launched trial's payload (the sweep's state keeps it for
    each launch: a trial that died before its first report has no config in Tune's result)."""
    return {
        "name": payload["name"],
        "params": payload["params"],
        "steps": payload["steps"],
        "estimated_bytes": payload["estimated_bytes"],
        "budget_bytes": payload["budget_bytes"],
        "batch_size": payload["config"]["train"]["batch_size"],
    }


def launched_record(
    space: Space, result, uri: str | None, parent_run_id: str | None, launched: dict[str, dict]
) -> R.TrialRecord:
    """The record of a trial Tune ran, from its child run (or Tune's results). ``launched``:
    each launched trial's :func:`launched_info`, by trial name."""
    p = launched_info(result.config["trial"]) if result.config else launched[Path(result.path).name]
    final = result.metrics or {}
    df = result.metrics_dataframe
    run_id = final.get(RUN_ID) or find_trial_run(uri, parent_run_id, p["name"]).run_id
    times: dict[str, Any] = {}
    if uri and run_id:
        values, steps, times = logged_values(uri, run_id)
    else:
        values, steps = tune_values(df)
    status, error = final.get(STATUS), final.get(ERROR)
    if status is None and result.error is not None:
        status = "oom" if is_oom(result.error) else "failed"
        error = root_cause(result.error)
    elif status is None:  # stopped by the scheduler: did it get to its last step first?
        status = "completed" if steps == p["steps"] else "stopped_early"
    start = final.get(TRIAL_START) or times.get("start")
    end = final.get(TRIAL_END) or times.get("end")
    if start is None and df is not None and len(df) and "timestamp" in df and "time_total_s" in df:
        start = float(df["timestamp"].iloc[0] - df["time_total_s"].iloc[0])  # Tune's clock
        end = float(df["timestamp"].iloc[-1])
    data_setup = final.get(DATA_SETUP_S, values.get(DATA_SETUP_S))
    peak = values.get(M.PEAK_MIB)
    return R.TrialRecord(
        trial=p["name"],
        params=p["params"],
        status=status,
        estimated_bytes=p["estimated_bytes"],
        budget_bytes=p["budget_bytes"],
        val_loss=values.get(M.VAL_LOSS),
        metric_value=values.get(space.sweep.metric),
        peak_bytes=round(peak * M.MIB) if peak else None,
        tokens_per_s=values.get(M.TOKENS_PER_S_AVG),
        steps=steps,
        train_steps=p["steps"],
        micro_batch_size=_int(values.get(M.MICRO_BATCH, p["batch_size"])),
        train_time_s=values.get(M.TRAIN_TIME_S),
        phase_s={k: v for k in (M.LOOP_S, *M.PHASES) if (v := values.get(k)) is not None}
        | ({DATA_SETUP_S: data_setup} if data_setup is not None else {}),
        wall_s=final.get(TRIAL_WALL_S) or (end - start if start and end else None),
        start_ts=start,
        end_ts=end,
        mlflow_run_id=run_id,
        error=error,
    )


def refused_record(rec: dict) -> R.TrialRecord:
    """The record of a proposal admission refused (kept in the sweep's state file)."""
    return R.TrialRecord(
        trial=rec["name"],
        params=rec["params"],
        status=rec["status"],
        estimated_bytes=rec["estimate"],
        budget_bytes=rec["budget"],
        error=rec["reason"],
        mlflow_run_id=rec.get("mlflow_run_id"),
        launched=False,
    )


def trial_records(space: Space, grid, state: dict, uri: str | None, parent_run_id: str | None) -> list[R.TrialRecord]:
    """One record per proposed trial, launched or not, in the order they were proposed
    (``state``: the sweep's state, with the launched trials' payloads and the refused ones)."""
    launched = state.get("launched", {})
    stopped = [
        (r.metrics or {}).get(RUN_ID) or find_trial_run(uri, parent_run_id, Path(r.path).name).run_id
        for r in grid
        if STATUS not in (r.metrics or {}) and r.error is None
    ]
    settle(uri, [r for r in stopped if r])
    records = [launched_record(space, r, uri, parent_run_id, launched) for r in grid]
    records += [refused_record(r) for r in state.get("refused", [])]
    return sorted(records, key=lambda r: r.trial)


def best_trial(records: list[R.TrialRecord], mode: str) -> R.TrialRecord | None:
    """The completed trial with the best value of the sweep's metric (``mode``: min or max)."""
    scored = [r for r in records if r.finished() and r.metric_value is not None and math.isfinite(r.metric_value)]
    if not scored:
        return None
    return (min if mode == "min" else max)(scored, key=lambda r: r.metric_value)


def full_length_command(space: Space, rec: R.TrialRecord) -> str:
    sets = {k: v for k, v in space.sweep.overrides.items() if k not in SHORT_RUN_KEYS}
    sets.update(rec.params)
    args = " ".join(f"--set {k}={_yaml_scalar(v)}" for k, v in sets.items())
    return f"raydrat train {space.base_path} {args}".strip()


def _yaml_scalar(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.6g}"
    if isinstance(v, bool):
        return str(v).lower()
    return str(v)


def overhead_figures(records: list[R.TrialRecord], sweep_wall: float) -> dict[str, Any]:
    ran = [r for r in records if r.wall_s and r.train_time_s is not None]
    trial_wall = sum(r.wall_s for r in ran)
    train = sum(r.train_time_s for r in ran)
    intervals = sorted((r.start_ts, r.end_ts) for r in ran if r.start_ts and r.end_ts)
    peak_conc = 0
    events = sorted([(s, 1) for s, _ in intervals] + [(e, -1) for _, e in intervals])
    cur = 0
    for _, d in events:
        cur += d
        peak_conc = max(peak_conc, cur)
    span = (intervals[-1][1] - min(s for s, _ in intervals)) if intervals else 0.0
    return {
        "sweep_wall_s": round(sweep_wall, 2),
        "trials_measured": len(ran),
        "trial_wall_s_total": round(trial_wall, 2),
        "train_step_s_total": round(train, 2),
        "outside_steps_share_in_trials": round(1 - train / trial_wall, 4) if trial_wall else None,
        "outside_steps_share_of_sweep": round(1 - train / (sweep_wall * (trial_wall / span)), 4)
        if span and sweep_wall
        else None,
        "concurrency_peak": peak_conc,
        "concurrency_mean": round(trial_wall / span, 2) if span else None,
        "outside_steps_breakdown": _breakdown(ran, trial_wall),
    }


def memory_figures(records: list[R.TrialRecord]) -> dict[str, Any]:
    """The estimate against the measured peak: the largest error (signed, relative to the
    estimate) and the trials whose measured peak exceeded the budget they were admitted under."""
    measured = [r for r in records if r.estimate_error is not None]
    worst = max(measured, key=lambda r: abs(r.estimate_error), default=None)
    return {
        "max_estimate_error": round(worst.estimate_error, 4) if worst else None,
        "max_estimate_error_trial": worst.trial if worst else None,
        "over_budget_trials": [r.trial for r in records if r.over_budget],
    }


def _breakdown(ran: list[R.TrialRecord], trial_wall: float) -> dict[str, float] | None:
    """Shares of the trials' wall time by where it went: data set-up (corpus plan and val
    split), Ray Train start-up and tear-down (everything outside the worker loop), and in the
    loop: waiting for data, evaluation, checkpoint saves (with their ``ray.train.report``
    barrier), the rest (logging, tracking, the efficiency policy), and the training steps.
    None when a trial did not report its loop times."""
    keys = (DATA_SETUP_S, M.LOOP_S, *M.PHASES)
    if not ran or not trial_wall or any(k not in r.phase_s for r in ran for k in keys):
        return None
    total = {k: sum(r.phase_s[k] for r in ran) for k in keys}
    train = sum(r.train_time_s for r in ran)
    parts = {
        "data_setup": total[DATA_SETUP_S],
        "train_startup_teardown": trial_wall - total[DATA_SETUP_S] - total[M.LOOP_S],
        "data_wait": total[M.DATA_WAIT_S],
        "eval": total[M.EVAL_S],
        "checkpoint": total[M.CHECKPOINT_S],
        "other_in_loop": total[M.LOOP_S] - train - sum(total[k] for k in M.PHASES),
        "train_steps": train,
    }
    return {k: round(v / trial_wall, 4) for k, v in parts.items()}
