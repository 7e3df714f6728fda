"""After a sweep: one record per trial from Tune's results, the command that trains the
chosen config at full length, and where the trials' time went."""

from __future__ import annotations

import math
from typing import Any

from raydrat.core import metrics as M
from raydrat.core.microbatch import is_oom
from raydrat.tune import report as R
from raydrat.tune.admission import GB
from raydrat.tune.space import Space, TrialSpec
from raydrat.tune.trial import DATA_SETUP_S, ERROR, STATUS, TRIAL_END, TRIAL_START, TRIAL_WALL_S

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


def trial_records(space: Space, trials: list[TrialSpec], estimates: list[int], feasible: list[bool], grid,
                  child_runs: dict[str, str]) -> list[R.TrialRecord]:
    """One record per trial, launched or not, from Tune's results (``grid``)."""
    by_name = {}
    for result in grid:
        payload = result.config["trial"]
        df = result.metrics_dataframe
        final = result.metrics or {}
        status = final.get(STATUS)
        error = final.get(ERROR)
        if result.error is not None:
            status = "oom" if is_oom(result.error) else "failed"
            error = str(result.error).strip().splitlines()[-1][:500] if str(result.error).strip() else type(result.error).__name__
        elif status is None:
            status = "stopped_early"
        peak = df[M.PEAK_BYTES].max() if df is not None and M.PEAK_BYTES in df else None
        start, end = final.get(TRIAL_START), final.get(TRIAL_END)
        if start is None and df is not None and len(df) and "timestamp" in df and "time_total_s" in df:
            # stopped or failed before its own final report: Tune's clock
            start = float(df["timestamp"].iloc[0] - df["time_total_s"].iloc[0])
            end = float(df["timestamp"].iloc[-1])
        by_name[payload["name"]] = R.TrialRecord(
            trial=payload["name"], params={}, status=status, estimated_bytes=payload["estimated_bytes"],
            val_loss=_last(df, M.VAL_LOSS), metric_value=_last(df, space.sweep.metric), peak_bytes=int(peak) if peak and peak == peak else None,
            tokens_per_s=_last(df, M.TOKENS_PER_S_AVG), steps=_int(_last(df, M.STEP)),
            micro_batch_size=_int(_last(df, M.MICRO_BATCH)), train_time_s=_last(df, M.TRAIN_TIME_S),
            phase_s={k: v for k in (M.LOOP_S, *M.PHASES) if (v := _last(df, k)) is not None}
            | ({DATA_SETUP_S: final[DATA_SETUP_S]} if final.get(DATA_SETUP_S) is not None else {}),
            wall_s=final.get(TRIAL_WALL_S) or (end - start if start and end else None),
            start_ts=start, end_ts=end,
            error=error,
        )
    records = []
    for t, est, ok in zip(trials, estimates, feasible):
        rec = by_name.get(t.name) or R.TrialRecord(
            trial=t.name, params={}, status="infeasible" if not ok else "failed", estimated_bytes=est,
            error=None if not ok else "trial did not run")
        rec.params = t.params
        rec.mlflow_run_id = child_runs.get(t.name)
        if not ok:
            rec.extra["memory_budget_bytes"] = int(space.sweep.memory_budget_gb * GB)
        records.append(rec)
    return records


def best_trial(records: list[R.TrialRecord], mode: str) -> R.TrialRecord | None:
    """The ranked trial with the best value of the sweep's metric (``mode``: min or max)."""
    scored = [r for r in records if r.ranked() and r.metric_value is not None and math.isfinite(r.metric_value)]
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
        "outside_steps_share_of_sweep": round(1 - train / (sweep_wall * (trial_wall / span)), 4) if span and sweep_wall else None,
        "concurrency_peak": peak_conc,
        "concurrency_mean": round(trial_wall / span, 2) if span else None,
        "outside_steps_breakdown": _breakdown(ran, trial_wall),
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
