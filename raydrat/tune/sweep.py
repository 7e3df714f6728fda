"""The sweep driver behind ``raydrat tune SPACE.yaml``.

load + validate the space → expand to trials → estimate each trial's peak memory → trials
over ``memory_budget_gb`` are recorded ``infeasible`` and never launched → feasible trials
request a GPU fraction (CPU: Ray ``memory``) sized by their estimate → Ray Tune runs
:func:`raydrat.tune.trial.trial_fn` with ASHA → statuses, MLflow parent/child runs, the
Pareto report and the overhead figures. ``resume=True`` continues the latest unfinished
sweep of the same name with ``Tuner.restore``.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from raydrat import tracking
from raydrat.config import ConfigError
from raydrat.train import metrics as M
from raydrat.tune import report as R
from raydrat.tune.space import Space, TrialSpec, expand, load_space
from raydrat.tune.trial import DATA_SETUP_S, ERROR, STATUS, TRIAL_END, TRIAL_START, TRIAL_WALL_S, trial_fn

STATE_FILE = "raydrat_sweep.json"
STATUSES = ("completed", "stopped_early", "infeasible", "oom", "failed")
MLFLOW_STATUS = {"completed": "FINISHED", "stopped_early": "KILLED", "infeasible": "KILLED",
                 "oom": "FAILED", "failed": "FAILED"}
STATUS_TAG = "raydrat.status"
# Settings that make a sweep trial short; the "train at full length" command drops them.
SHORT_RUN_KEYS = ("train.steps", "train.eval_every", "train.log_every", "optim.warmup_steps")
GB = 1024**3


class SweepError(ConfigError):
    """A sweep that cannot start (bad space, budget, resources, nothing to resume)."""


@dataclass
class SweepSummary:
    name: str
    path: Path
    records: list[R.TrialRecord]
    report: str
    command: str | None
    overhead: dict[str, Any]
    parent_run_id: str | None
    tracking_uri: str | None
    best: R.TrialRecord | None = None
    warnings: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------------------
# before launch: estimates, budget, resources
# --------------------------------------------------------------------------------------


def estimate_bytes(trial: TrialSpec) -> int:
    from raydrat.memory import estimate_memory

    return int(estimate_memory(trial.config).total_bytes)


def gpu_memory_bytes(space: Space) -> int | None:
    if space.sweep.resources.gpu_memory_gb:
        return int(space.sweep.resources.gpu_memory_gb * GB)
    import torch

    if torch.cuda.is_available():
        return int(torch.cuda.get_device_properties(0).total_memory)
    return None


def worker_resources(trial: TrialSpec, estimate: int, use_gpu: bool, gpu_bytes: int | None) -> dict:
    """What each of the trial's training workers requests beyond its CPUs: on a GPU, the
    fraction its estimate fills (rounded up to 1%), so small trials share a GPU; on CPU,
    Ray's ``memory`` resource in bytes."""
    if use_gpu:
        if not gpu_bytes:
            return {"GPU": 1}
        return {"GPU": min(1.0, math.ceil(100 * estimate / gpu_bytes) / 100)}
    return {"memory": int(estimate)}


def check_budget(space: Space, trials: list[TrialSpec], estimates: list[int]) -> list[bool]:
    budget = space.sweep.memory_budget_gb
    if budget is None:
        return [True] * len(trials)
    limit = budget * GB
    feasible = [e <= limit for e in estimates]
    if not any(feasible):
        i = min(range(len(trials)), key=lambda j: estimates[j])
        raise SweepError(
            f"{space.path}: memory_budget_gb = {budget} is below every trial's estimate; the "
            f"smallest is {estimates[i] / GB:.4f} GB ({trials[i].name}: {R.params_text(trials[i].params)}): "
            f"raise memory_budget_gb to at least {math.ceil(estimates[i] / GB * 1e4) / 1e4} or shrink the space"
        )
    return feasible


def check_resources(space: Space, trials: list[TrialSpec], cluster: dict) -> tuple[int, list[str]]:
    """The concurrency the cluster allows; raises when not even one trial fits."""
    sweep = space.sweep
    cpus = float(cluster.get("CPU", 0))
    need = max(sweep.resources.trial_cpu + t.config.scaling.num_workers * t.config.scaling.cpus_per_worker
               for t in trials)
    room = cpus - sweep.resources.data_cpu_headroom
    if need > room:
        raise SweepError(
            f"{space.path}: one trial needs {need:g} CPUs (resources.trial_cpu + scaling.num_workers x "
            f"scaling.cpus_per_worker) plus {sweep.resources.data_cpu_headroom:g} for Ray Data, but the "
            f"cluster has {cpus:g}: lower scaling.cpus_per_worker (overrides) or resources.trial_cpu"
        )
    fit = max(1, int(room // need))
    warnings = []
    if sweep.max_concurrent > fit:
        warnings.append(
            f"max_concurrent = {sweep.max_concurrent} but only {fit} trial(s) fit in {cpus:g} CPUs "
            f"({need:g} per trial + {sweep.resources.data_cpu_headroom:g} for Ray Data): running {fit} at once"
        )
    return min(sweep.max_concurrent, fit), warnings


# --------------------------------------------------------------------------------------
# state (for --resume)
# --------------------------------------------------------------------------------------


def _new_sweep_dir(space: Space) -> Path:
    root = Path(space.sweep.storage_path).resolve()
    return root / f"{space.sweep.name}-{time.strftime('%Y%m%d-%H%M%S')}"


def _latest_unfinished(space: Space) -> Path:
    root = Path(space.sweep.storage_path).resolve()
    candidates = sorted(root.glob(f"{space.sweep.name}-*/{STATE_FILE}"), key=lambda p: p.stat().st_mtime)
    for state in reversed(candidates):
        if not json.loads(state.read_text()).get("finished"):
            return state.parent
    raise SweepError(
        f"no unfinished sweep named {space.sweep.name!r} under {root} to resume: run without --resume"
    )


def _save_state(path: Path, state: dict) -> None:
    tmp = path / (STATE_FILE + ".tmp")
    tmp.write_text(json.dumps(state, indent=2))
    tmp.replace(path / STATE_FILE)


# --------------------------------------------------------------------------------------
# the sweep
# --------------------------------------------------------------------------------------


def run_sweep(space_path: str | Path, resume: bool = False, json_path: str | Path | None = None) -> SweepSummary:
    from raydrat.runtime import cluster_gpus, ensure_ray

    log = M.setup_logging()
    space = load_space(space_path)
    trials = expand(space)
    estimates = [estimate_bytes(t) for t in trials]
    feasible = check_budget(space, trials, estimates)
    ensure_ray()
    import ray

    concurrency, warnings = check_resources(space, trials, ray.cluster_resources())
    for w in warnings:
        log.warning(f"warning: {w}")
    base = trials[0].config
    use_gpu = base.scaling.use_gpu is True or (base.scaling.use_gpu == "auto" and cluster_gpus() > 0)
    gpu_bytes = gpu_memory_bytes(space) if use_gpu else None
    uri = tracking.resolve_tracking_uri(base.tracking) if base.tracking.enabled else None

    if resume:
        sweep_dir = _latest_unfinished(space)
        state = json.loads((sweep_dir / STATE_FILE).read_text())
        log.info(f"resuming sweep {sweep_dir}")
    else:
        sweep_dir = _new_sweep_dir(space)
        sweep_dir.mkdir(parents=True)
        state = _start_tracking(space, trials, estimates, feasible, uri, sweep_dir.name)
        state["space_path"] = str(space.path.resolve())
        _save_state(sweep_dir, state)
    n_feasible = sum(feasible)
    log.info(f"sweep {sweep_dir.name}: {len(trials)} trials, {n_feasible} feasible, "
             f"{len(trials) - n_feasible} over the budget; up to {concurrency} at once")

    payloads = [
        {
            "index": t.index, "name": t.name,
            "config": _trial_config(t, sweep_dir).to_dict(),
            "tracking_uri": uri, "run_id": state["child_runs"].get(t.name),
            "run_name": f"{sweep_dir.name}-{t.name}",
            "estimated_bytes": estimates[t.index],
            "worker_resources": worker_resources(t, estimates[t.index], use_gpu, gpu_bytes),
        }
        for t, ok in zip(trials, feasible) if ok
    ]
    _prepare_demo_data([t for t, ok in zip(trials, feasible) if ok])
    t0 = time.time()
    grid = _fit(space, payloads, sweep_dir, concurrency, resume)
    sweep_wall = time.time() - t0
    unfinished = _unfinished_trials(sweep_dir, grid)
    if unfinished:
        raise SweepError(
            f"sweep {sweep_dir.name} interrupted with {unfinished} of {len(grid)} launched trials "
            f"unfinished; continue it with: raydrat tune {space.path} --resume"
        )

    records = _records(space, trials, estimates, feasible, grid, state)
    summary = _finish(space, records, state, uri, sweep_dir, sweep_wall, concurrency, warnings)
    state["finished"] = True
    _save_state(sweep_dir, state)
    if json_path:
        from raydrat.bench.report import write_json

        write_json(json_path, {"sweep": sweep_dir.name, "overhead": summary.overhead,
                               "trials": [r.to_json() for r in records]})
    return summary


def _unfinished_trials(sweep_dir: Path, grid) -> int:
    """Trials cut off by an interrupt. After a SIGINT Tune saves its state with the running
    trials still RUNNING and returns normally (they read TERMINATED in memory), so: a trial is
    unfinished when Tune's last saved state does not have it TERMINATED/ERROR and it neither
    sent its own final status nor errored (the last snapshot can lag a normal finish)."""
    states = sorted(sweep_dir.glob("experiment_state-*.json"), key=lambda p: p.stat().st_mtime)
    if not states:
        return 0
    done = {Path(r.path).name for r in grid if r.error is not None or STATUS in (r.metrics or {})}
    trial_data = json.loads(states[-1].read_text()).get("trial_data", [])
    meta = [json.loads(entry[0]) for entry in trial_data]
    return sum(m.get("status") not in ("TERMINATED", "ERROR") and m.get("relative_logdir") not in done
               for m in meta)


def _trial_config(t: TrialSpec, sweep_dir: Path):
    """The trial's config with paths made absolute (Tune runs trials in their own dirs)."""
    cfg = t.config.model_copy(deep=True)
    cfg.train.storage_path = str(sweep_dir / "train")
    cfg.data.demo_dir = str(Path(cfg.data.demo_dir).resolve())
    return cfg


def _prepare_demo_data(trials: list[TrialSpec]) -> None:
    """Build the demo corpus and tokenizer once in the driver, so concurrent trials never
    race to build them."""
    from raydrat.core.data.demo import build_demo_corpus

    needed = {(str(Path(t.config.data.demo_dir).resolve()), t.config.model.vocab_size)
              for t in trials
              if any(src.path == "demo" for src in t.config.data.sources) and not t.config.data.tokenizer_path}
    for demo_dir, vocab in sorted(needed):
        build_demo_corpus(demo_dir, vocab)


def _start_tracking(space, trials, estimates, feasible, uri, sweep_name) -> dict:
    state: dict[str, Any] = {"parent_run_id": None, "child_runs": {}}
    if not uri:
        return state
    sweep = space.sweep
    exp = trials[0].config.tracking.experiment
    parent = tracking.start_run(uri, exp, sweep_name, params={
        "sweep.space_file": str(space.path), "sweep.base": sweep.base,
        "sweep.memory_budget_gb": sweep.memory_budget_gb, "sweep.trials": len(trials),
        "sweep.max_concurrent": sweep.max_concurrent, "sweep.metric": sweep.metric,
        "sweep.mode": sweep.mode, "sweep.num_samples": sweep.num_samples, "sweep.seed": sweep.seed,
        "sweep.scheduler": sweep.scheduler.type,
    }, tags={"raydrat.sweep": sweep_name})
    tracking.log_artifact(uri, parent, space.path, "space")
    state["parent_run_id"] = parent
    for t, est, ok in zip(trials, estimates, feasible):
        run = tracking.start_run(
            uri, exp, f"{sweep_name}-{t.name}",
            params={**t.config.flat(), "sweep.trial": t.name,
                    **{f"sweep.param.{k}": v for k, v in t.params.items()}},
            tags={"raydrat.sweep": sweep_name, "raydrat.trial": t.name},
            parent_run_id=parent,
        )
        tracking.log_metrics(uri, run, {"estimated_bytes": est}, 0)
        if not ok:
            tracking.log_params(uri, run, {"sweep.memory_budget_gb": sweep.memory_budget_gb})
            tracking.client(uri).set_tag(run, STATUS_TAG, "infeasible")
            tracking.end_run(uri, run, MLFLOW_STATUS["infeasible"])
        state["child_runs"][t.name] = run
    return state


def _fit(space: Space, payloads: list[dict], sweep_dir: Path, concurrency: int, resume: bool):
    from ray import tune

    sweep = space.sweep
    trainable = tune.with_resources(trial_fn, {"CPU": sweep.resources.trial_cpu})
    if resume:
        tuner = tune.Tuner.restore(str(sweep_dir), trainable=trainable, resume_unfinished=True,
                                   resume_errored=False, restart_errored=False)
        return tuner.fit()
    scheduler = None
    if sweep.scheduler.type == "asha":
        from ray.tune.schedulers import ASHAScheduler

        # max_t one past the last step: ASHA stops a trial that reaches max_t, and a trial that
        # trains to the end must get to report its own final status.
        max_t = max(p["config"]["train"]["steps"] for p in payloads) + 1
        scheduler = ASHAScheduler(time_attr=M.STEP, metric=sweep.metric, mode=sweep.mode, max_t=max_t,
                                  grace_period=min(sweep.scheduler.grace_period, max_t),
                                  reduction_factor=sweep.scheduler.reduction_factor)
    tuner = tune.Tuner(
        trainable,
        param_space={"trial": tune.grid_search(payloads)},
        tune_config=tune.TuneConfig(max_concurrent_trials=concurrency, scheduler=scheduler,
                                    trial_dirname_creator=lambda tr: tr.config["trial"]["name"]),
        run_config=tune.RunConfig(name=sweep_dir.name, storage_path=str(sweep_dir.parent), verbose=1),
    )
    return tuner.fit()


def _last(df, key):
    if df is None or key not in df:
        return None
    col = df[key].dropna()
    col = col[col.map(lambda v: not (isinstance(v, float) and math.isinf(v)))]
    return col.iloc[-1].item() if len(col) else None


def _int(v):
    return None if v is None else int(v)


def _records(space, trials, estimates, feasible, grid, state) -> list[R.TrialRecord]:
    from raydrat.train.oom import is_oom

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
            val_loss=_last(df, M.VAL_LOSS), peak_bytes=int(peak) if peak and peak == peak else None,
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
        rec.mlflow_run_id = state["child_runs"].get(t.name)
        if not ok:
            rec.extra["memory_budget_bytes"] = int(space.sweep.memory_budget_gb * GB)
        records.append(rec)
    return records


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


def _finish(space, records, state, uri, sweep_dir, sweep_wall, concurrency, warnings) -> SweepSummary:
    sweep = space.sweep
    R.mark_pareto(records)  # sets each record's pareto flag
    budget = int(sweep.memory_budget_gb * GB) if sweep.memory_budget_gb else None
    tiers = R.best_per_tier(records, R.memory_tiers(budget, records))
    ranked = [r for r in records if r.ranked()]
    best = None
    if ranked:
        best = (min if sweep.mode == "min" else max)(ranked, key=lambda r: r.val_loss) if sweep.metric == M.VAL_LOSS \
            else min(ranked, key=lambda r: r.val_loss)
    command = full_length_command(space, best) if best else None
    overhead = overhead_figures(records, sweep_wall)
    text = R.format_report(records, tiers, command)
    counts = {s: sum(r.status == s for r in records) for s in STATUSES}
    text += "\n\nStatuses: " + ", ".join(f"{k} {v}" for k, v in counts.items() if v)
    text += (f"\nOverhead: {overhead['outside_steps_share_in_trials']} of trial time outside training steps; "
             f"concurrency peak {overhead['concurrency_peak']}, mean {overhead['concurrency_mean']} "
             f"(limit {concurrency}); sweep wall {overhead['sweep_wall_s']}s")
    if overhead["outside_steps_breakdown"]:
        text += "\nTrial time by part: " + ", ".join(
            f"{k} {v:.1%}" for k, v in overhead["outside_steps_breakdown"].items())
    csv_path = R.write_pareto_csv(records, sweep_dir / "pareto.csv")
    png_path = R.plot_pareto(records, sweep_dir / "pareto.png", f"{sweep_dir.name}: Pareto front")
    (sweep_dir / "report.txt").write_text(text + "\n")
    parent = state.get("parent_run_id")
    if uri and parent:
        _close_children(uri, records)
        c = tracking.client(uri)
        for p in (csv_path, png_path, sweep_dir / "report.txt"):
            tracking.log_artifact(uri, parent, p, "report")
        if best:
            tracking.log_params(uri, parent, {"best.trial": best.trial,
                                             **{f"best.{k}": v for k, v in best.params.items()}})
            tracking.log_text(uri, parent, best.trial + "\n" + command + "\n", "best_config.txt")
            tracking.log_metrics(uri, parent, {"best_val_loss": best.val_loss}, 0)
        for k, v in counts.items():
            c.set_tag(parent, f"raydrat.trials.{k}", str(v))
        flat = {k: v for k, v in overhead.items() if isinstance(v, (int, float))}
        flat.update({f"share/{k}": v for k, v in (overhead["outside_steps_breakdown"] or {}).items()})
        tracking.log_metrics(uri, parent, flat, 0)
        tracking.end_run(uri, parent, "FINISHED")
    return SweepSummary(sweep_dir.name, sweep_dir, records, text, command, overhead, parent, uri, best, warnings)


def _close_children(uri: str, records: list[R.TrialRecord]) -> None:
    c = tracking.client(uri)
    for r in records:
        if not r.mlflow_run_id or r.status == "infeasible":
            continue
        c.set_tag(r.mlflow_run_id, STATUS_TAG, r.status)
        if r.error:
            c.set_tag(r.mlflow_run_id, "raydrat.error", r.error[:5000])
        tracking.log_metrics(uri, r.mlflow_run_id, {
            "peak_bytes": r.peak_bytes, "estimated_bytes": r.estimated_bytes,
            "final_micro_batch_size": r.micro_batch_size,
        }, r.steps or 0)
        tracking.end_run(uri, r.mlflow_run_id, MLFLOW_STATUS[r.status])
