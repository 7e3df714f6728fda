"""The sweep driver behind ``raydrat tune SPACE.yaml``.

load + validate the space → expand to trials → admission (:mod:`.admission`: each trial's
runtime and peak-memory estimate; trials over ``memory_budget_gb`` are recorded
``infeasible`` and never launched; feasible trials request a GPU fraction, or Ray
``memory`` on CPU, sized by their estimate) → MLflow parent and child runs
(:mod:`.mlflow_runs`) → Ray Tune runs :func:`raydrat.tune.trial.trial_fn` with ASHA →
records, statuses and the Pareto report (:mod:`.results`, :mod:`.report`).
``resume=True`` continues the latest unfinished sweep of the same name with
``Tuner.restore``.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import ray
from ray import tune
from ray.tune.schedulers import ASHAScheduler

from raydrat import tracking
from raydrat.bench.report import write_json
from raydrat.core import metrics as M
from raydrat.core.fit import Callback
from raydrat.core.data.demo import build_demo_corpus
from raydrat.ray_session import ensure_ray, expected_gpus
from raydrat.tracking import Run
from raydrat.tune import admission as A
from raydrat.tune import report as R
from raydrat.tune.mlflow_runs import close_child_runs, log_sweep_report, start_sweep_runs
from raydrat.tune.results import best_trial, full_length_command, overhead_figures, trial_records
from raydrat.redact import redact_obj, redact_uri
from raydrat.tune.env import keep_credentials_out_of_runtime_envs
from raydrat.tune.space import Space, TrialSpec, expand, load_space
from raydrat.tune.trial import STATUS, trial_fn

STATE_FILE = "raydrat_sweep.json"
STATUSES = ("completed", "stopped_early", "infeasible", "oom", "failed")
SweepError = A.SweepError


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


def _new_sweep_dir(space: Space) -> Path:
    root = Path(space.sweep.storage_path).resolve()
    return root / f"{space.sweep.name}-{time.strftime('%Y%m%d-%H%M%S')}"


def _latest_unfinished(space: Space) -> Path:
    root = Path(space.sweep.storage_path).resolve()
    candidates = sorted(root.glob(f"{space.sweep.name}-*/{STATE_FILE}"), key=lambda p: p.stat().st_mtime)
    for state in reversed(candidates):
        if not json.loads(state.read_text()).get("finished"):
            return state.parent
    raise A.SweepError(
        f"no unfinished sweep named {space.sweep.name!r} under {root} to resume: run without --resume"
    )


def _save_state(path: Path, state: dict) -> None:
    tmp = path / (STATE_FILE + ".tmp")
    tmp.write_text(json.dumps(state, indent=2))
    tmp.replace(path / STATE_FILE)



# --------------------------------------------------------------------------------------
# the sweep
# --------------------------------------------------------------------------------------


def run_sweep(space_path: str | Path, resume: bool = False, json_path: str | Path | None = None,
              fit_callbacks: Sequence[Callback] = ()) -> SweepSummary:
    """Run (or with ``resume``, continue) the sweep of a space file. ``fit_callbacks`` run
    inside every trial's ``fit`` (a test's fault injection)."""
    log = M.setup_logging()
    space = load_space(space_path)
    trials = expand(space)
    runtimes = A.resolve_trials(trials, expected_gpus())
    estimates = [A.estimated_bytes(rt) for rt in runtimes]
    feasible = A.check_budget(space, trials, estimates)
    ensure_ray()
    concurrency, warnings = A.check_resources(space, trials, ray.cluster_resources())
    for w in warnings:
        log.warning(f"warning: {w}")
    base = trials[0].config
    use_gpu = runtimes[0].use_gpu
    gpu_bytes = A.gpu_memory_bytes(space) if use_gpu else None
    uri = tracking.resolve_tracking_uri(base.tracking) if base.tracking.enabled else None

    if resume:
        sweep_dir = _latest_unfinished(space)
        state = json.loads((sweep_dir / STATE_FILE).read_text())
        log.info(f"resuming sweep {sweep_dir}")
    else:
        sweep_dir = _new_sweep_dir(space)
        sweep_dir.mkdir(parents=True)
        state = start_sweep_runs(space, trials, estimates, feasible, uri, sweep_dir.name)
        state["space_path"] = str(space.path.resolve())
        _save_state(sweep_dir, state)
    n_feasible = sum(feasible)
    log.info(f"sweep {sweep_dir.name}: {len(trials)} trials, {n_feasible} feasible, "
             f"{len(trials) - n_feasible} over the budget; up to {concurrency} at once")

    payloads = [  # Tune writes these (params.json, result.json, experiment state): no secret in them
        {
            "index": t.index, "name": t.name,
            "config": redact_obj(_trial_config(t, sweep_dir).to_dict()),
            "tracking_uri": redact_uri(uri), "run_id": state["child_runs"].get(t.name),
            "run_name": f"{sweep_dir.name}-{t.name}",
            "estimated_bytes": estimates[t.index],
            "runtime": runtimes[t.index],
            "worker_resources": A.worker_resources(estimates[t.index], use_gpu, gpu_bytes),
            "fit_callbacks": list(fit_callbacks),
        }
        for t, ok in zip(trials, feasible) if ok
    ]
    _prepare_demo_data([t for t, ok in zip(trials, feasible) if ok])
    t0 = time.time()
    grid = _fit(space, payloads, sweep_dir, concurrency, resume, uri)
    sweep_wall = time.time() - t0
    unfinished = _unfinished_trials(sweep_dir, grid)
    if unfinished:
        raise A.SweepError(
            f"sweep {sweep_dir.name} interrupted with {unfinished} of {len(grid)} launched trials "
            f"unfinished; continue it with: raydrat tune {space.path} --resume"
        )

    records = trial_records(space, trials, estimates, feasible, grid, state["child_runs"])
    summary = _finish(space, records, state, uri, sweep_dir, sweep_wall, concurrency, warnings)
    state["finished"] = True
    _save_state(sweep_dir, state)
    if json_path:
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
    needed = {(str(Path(t.config.data.demo_dir).resolve()), t.config.model.vocab_size)
              for t in trials
              if any(src.path == "demo" for src in t.config.data.sources) and not t.config.data.tokenizer_path}
    for demo_dir, vocab in sorted(needed):
        build_demo_corpus(demo_dir, vocab)


def _fit(space: Space, payloads: list[dict], sweep_dir: Path, concurrency: int, resume: bool,
         tracking_uri: str | None = None):
    sweep = space.sweep
    keep_credentials_out_of_runtime_envs()
    # the tracking URI (it may hold a password) reaches the trials through the object store,
    # never through their configs, which Tune writes to disk
    trainable = tune.with_resources(tune.with_parameters(trial_fn, tracking_uri=tracking_uri),
                                    {"CPU": sweep.resources.trial_cpu})

    if resume:
        tuner = tune.Tuner.restore(str(sweep_dir), trainable=trainable, resume_unfinished=True,
                                   resume_errored=False, restart_errored=False)
        return tuner.fit()
    scheduler = None
    if sweep.scheduler.type == "asha":
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


def _finish(space, records, state, uri, sweep_dir, sweep_wall, concurrency, warnings) -> SweepSummary:
    sweep = space.sweep
    R.mark_pareto(records)  # sets each record's pareto flag
    budget = int(sweep.memory_budget_gb * A.GB) if sweep.memory_budget_gb else None
    tiers = R.best_per_tier(records, R.memory_tiers(budget, records))
    best = best_trial(records, sweep.mode)
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
    parent = Run.attach(uri, state.get("parent_run_id"))
    if parent:
        close_child_runs(uri, records)
        figures = {k: v for k, v in overhead.items() if isinstance(v, (int, float))}
        figures.update({f"share/{k}": v for k, v in (overhead["outside_steps_breakdown"] or {}).items()})
        log_sweep_report(parent, [csv_path, png_path, sweep_dir / "report.txt"], best, command, sweep.metric,
                         counts, figures)
    return SweepSummary(sweep_dir.name, sweep_dir, records, text, command, overhead, parent.run_id, uri, best, warnings)
