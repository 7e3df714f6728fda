"""The sweep driver behind ``raydrat tune SPACE.yaml``.

load + validate the space → the searcher (:mod:`.search`: the trials drawn up front for
``search: random | grid``, else Ray Tune's ``OptunaSearch`` / ``HyperOptSearch`` /
``TuneBOHB``) wrapped so that every proposal is admitted before Tune launches it
(:mod:`.admission`: its runtime and peak-memory estimate against ``memory_budget_gb``; an
infeasible one is recorded and the searcher learns it was bad) → the MLflow parent run
(:mod:`.mlflow_runs`) → Ray Tune runs :func:`raydrat.tune.trial.trial_fn` with ASHA, one
console line per trial event (:mod:`.events`) → records, statuses and the report
(:mod:`.results`, :mod:`.report`). ``resume=True`` continues the latest unfinished sweep of
the same name with ``Tuner.restore``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray
from ray import tune
from ray.tune.schedulers import ASHAScheduler

from raydrat import tracking
from raydrat.atomic import write_text
from raydrat.config import RaydratConfig
from raydrat.core import metrics as M
from raydrat.core.data.demo import build_demo_corpus
from raydrat.core.fit import Callback
from raydrat.core.runtime import resolve
from raydrat.crash import secondary
from raydrat.envvars import env_set
from raydrat.ray_session import ensure_ray, expected_gpus
from raydrat.ray_train.models import register_run_model
from raydrat.redact import redact_obj, redact_uri, reveal_uri
from raydrat.tables import write_json
from raydrat.tracking import Run
from raydrat.tune import admission as A
from raydrat.tune import report as R
from raydrat.tune.env import keep_credentials_out_of_runtime_envs
from raydrat.tune.events import TrialEvents
from raydrat.tune.mlflow_runs import (
    finalize_trial_runs,
    interrupt_running_children,
    log_sweep_report,
    record_refused,
    start_parent,
)
from raydrat.tune.results import (
    best_trial,
    full_length_command,
    launched_info,
    memory_figures,
    overhead_figures,
    trial_records,
)
from raydrat.tune.search import AdmittingSearcher, build_searcher
from raydrat.tune.space import Space, TrialSpec, expand, load_space
from raydrat.tune.trial import STATUS, trial_fn
from raydrat.tune.tune_state import ENDED, mark_ended, saved_trials

STATE_FILE = "raydrat_sweep.json"
STATUSES = ("completed", "stopped_early", "infeasible", "oom", "failed")
NEW_OUTPUT_ENV = "RAY_AIR_NEW_OUTPUT"
PRINT_TRIAL_ERRORS_ENV = "TUNE_PRINT_ALL_TRIAL_ERRORS"
TUNE_LOGGER = "ray.tune.tune"
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
    memory: dict[str, Any] = field(default_factory=dict)


def _new_sweep_dir(space: Space) -> Path:
    root = Path(space.sweep.storage_path).resolve()
    return root / f"{space.sweep.name}-{time.strftime('%Y%m%d-%H%M%S')}"


def _latest_unfinished(space: Space) -> Path:
    root = Path(space.sweep.storage_path).resolve()
    candidates = sorted(root.glob(f"{space.sweep.name}-*/{STATE_FILE}"), key=lambda p: p.stat().st_mtime)
    for state in reversed(candidates):
        if not json.loads(state.read_text()).get("finished"):
            return state.parent
    raise A.SweepError(f"no unfinished sweep named {space.sweep.name!r} under {root} to resume: run without --resume")


def _load_state(path: Path) -> dict:
    return json.loads((path / STATE_FILE).read_text())


def _save_state(path: Path, state: dict) -> None:
    write_text(path / STATE_FILE, json.dumps(state, indent=2))


# --------------------------------------------------------------------------------------
# admission and launch, called by the searcher for each proposal (picklable: Tune keeps
# the searcher in its experiment state, and a resumed sweep gets it back from there)
# --------------------------------------------------------------------------------------


@dataclass
class Screen:
    """``screen(index, proposal)``: admission of one proposal (drawn trials were resolved
    before Ray started: their verdicts are reused)."""

    space: Space
    gpus: float | None
    drawn: dict[int, A.Verdict]

    def __call__(self, index: int, proposal: dict) -> A.Verdict:
        if index in self.drawn:
            return self.drawn[index]
        return A.screen(self.space, index, self.space.params_from(proposal), self.gpus)


@dataclass
class Launcher:
    """The Tune config of an admitted trial, and the record of a refused one."""

    space: Space
    sweep_dir: Path
    uri: str | None
    """The tracking URI, redacted (Tune pickles the searcher that holds this); reveal_uri gives the real one."""
    parent_run_id: str | None
    source_tags: dict[str, str]
    gpu_bytes: int | None
    fit_callbacks: list

    def launch(self, v: A.Verdict) -> dict:
        cfg = _trial_config(v.spec, self.sweep_dir)
        payload = {
            "trial": {
                # Tune writes this payload (params.json, result.json, experiment state): no secret in it;
                # the real tracking URI reaches the trial through tune.with_parameters (see _fit)
                "index": v.index,
                "name": v.name,
                "params": v.params,
                "config": redact_obj(cfg.to_dict()),
                "steps": cfg.train.steps,
                "sweep": self.sweep_dir.name,
                "run_name": f"{self.sweep_dir.name}-{v.name}",
                "tracking_uri": self.uri,
                "parent_run_id": self.parent_run_id,
                "source_tags": self.source_tags,
                "estimated_bytes": v.estimate,
                "budget_bytes": v.budget,
                "budget_gb": self.space.sweep.memory_budget_gb,
                "metric": self.space.sweep.metric,
                "runtime": v.runtime,
                "worker_resources": A.worker_resources(v.estimate, v.runtime.use_gpu, self.gpu_bytes),
                "fit_callbacks": list(self.fit_callbacks),
            }
        }
        state = _load_state(self.sweep_dir)  # what the report needs if the trial dies before it reports
        state.setdefault("launched", {})[v.name] = launched_info(payload["trial"])
        _save_state(self.sweep_dir, state)
        return payload

    def refuse(self, v: A.Verdict) -> None:
        experiment = (v.spec.config if v.spec else self.space.config_for({}, str(self.space.path))).tracking.experiment
        run_id = record_refused(
            reveal_uri(self.uri), experiment, self.parent_run_id, self.sweep_dir.name, v, self.source_tags
        )
        state = _load_state(self.sweep_dir)
        state.setdefault("refused", []).append(
            {
                "name": v.name,
                "params": v.params,
                "status": v.refused,
                "reason": v.reason,
                "estimate": v.estimate,
                "budget": v.budget,
                "mlflow_run_id": run_id,
            }
        )
        _save_state(self.sweep_dir, state)
        M.logger.info(f"{v.name} {v.refused}, not launched: {v.reason} ({R.params_text(v.params)})")


@dataclass
class Ended:
    """``ended(trial, status)``: how Tune ended a trial, kept in the sweep's state (a resume
    writes it into Tune's own: :func:`raydrat.tune.tune_state.mark_ended`)."""

    sweep_dir: Path

    def __call__(self, trial: str, status: str) -> None:
        state = _load_state(self.sweep_dir)
        state.setdefault("ended", {})[trial] = status
        _save_state(self.sweep_dir, state)


def _trial_config(t: TrialSpec, sweep_dir: Path):
    """The trial's config with paths made absolute (Tune runs trials in their own dirs)."""
    cfg = t.config.model_copy(deep=True)
    cfg.train.storage_path = str(sweep_dir / "train")
    cfg.data.demo_dir = str(Path(cfg.data.demo_dir).resolve())
    return cfg


def _trial_name(trial) -> str:
    """Tune's name (and directory) of a trial: raydrat's trial id."""
    return trial.config["trial"]["name"]


# --------------------------------------------------------------------------------------
# the sweep
# --------------------------------------------------------------------------------------


def run_sweep(
    space_path: str | Path,
    resume: bool = False,
    json_path: str | Path | None = None,
    fit_callbacks: Sequence[Callback] = (),
    verbose: bool = False,
) -> SweepSummary:
    """Run (or with ``resume``, continue) the sweep of a space file. ``fit_callbacks`` run
    inside every trial's ``fit`` (a test's fault injection); ``verbose`` keeps Tune's
    status tables and the workers' own output on the console."""
    log = M.setup_logging()
    space = load_space(space_path)
    sweep = space.sweep
    gpus = expected_gpus()
    base = space.config_for({}, f"{space.path} (base + overrides)")
    drawn = expand(space) if sweep.search in ("random", "grid") else None
    inner = build_searcher(space, drawn)  # a missing searcher package is refused first
    verdicts, total, launch_specs = _admit(space, drawn, base, gpus)
    uri = tracking.resolve_tracking_uri(base.tracking) if base.tracking.enabled else None  # checked before Ray
    ensure_ray(log_to_driver=verbose)
    concurrency, warnings = A.check_resources(space, launch_specs, ray.cluster_resources())
    for w in warnings:
        log.warning(f"warning: {w}")
    use_gpu = (verdicts[0].runtime if verdicts else resolve(base, gpus)).use_gpu
    gpu_bytes = A.gpu_memory_bytes(space) if use_gpu else None

    sweep_dir, state = _open_sweep(space, uri, resume, base.tracking.experiment, log)
    parent_id = state.get("parent_run_id")
    # what Tune pickles (the searcher, its callbacks) holds the URI redacted; reveal_uri gives
    # the real one back in this process
    launcher = Launcher(
        space, sweep_dir, redact_uri(uri), parent_id, state["source_tags"], gpu_bytes, list(fit_callbacks)
    )
    searcher = AdmittingSearcher(
        inner,
        total,
        Screen(space, gpus, {v.index: v for v in verdicts}),
        launcher.launch,
        launcher.refuse,
        metric=sweep.metric,
        mode=sweep.mode,
    )
    budget = f"memory budget {sweep.memory_budget_gb:g} GB" if sweep.memory_budget_gb else "no memory budget"
    log.info(f"sweep {sweep_dir.name}: search {sweep.search}, {total} trial(s), up to {concurrency} at once, {budget}")
    _prepare_demo_data(launch_specs)
    t0 = time.time()
    grid = _fit(
        space,
        searcher,
        sweep_dir,
        concurrency,
        resume,
        verbose,
        TrialEvents(log, sweep.metric, redact_uri(uri), parent_id, Ended(sweep_dir)),
        max_steps(space, launch_specs),
        uri,
    )
    return _conclude(space, sweep_dir, grid, uri, parent_id, time.time() - t0, concurrency, warnings, json_path)


def _admit(space: Space, drawn, base: RaydratConfig, gpus) -> tuple[list, int, list[TrialSpec]]:
    """The admission verdicts, the trial count and the trials to launch: every drawn trial
    screened now (random, grid), before Ray starts; for a model-based search, the corners of
    the space checked against the budget."""
    if drawn is not None:
        verdicts = A.screen_drawn(space, drawn, gpus)
        A.check_budget(space, verdicts)
        return verdicts, len(drawn), [v.spec for v in verdicts if v.refused is None]
    A.check_budget(space, A.corners(space, gpus), what="corner of the space")
    return [], space.sweep.num_samples, [TrialSpec(0, {}, base)]


def _open_sweep(space: Space, uri: str | None, resume: bool, experiment: str, log) -> tuple[Path, dict]:
    """The sweep's folder and state: the latest unfinished one of this space (its parent
    MLflow run RUNNING again, children a dead driver left open ended), or a new one with
    its parent run."""
    if resume:
        sweep_dir = _latest_unfinished(space)
        state = _load_state(sweep_dir)
        interrupt_running_children(uri, state.get("parent_run_id"))  # a driver that died left them open
        Run.attach(uri, state.get("parent_run_id")).set_status("RUNNING")
        log.info(f"resuming sweep {sweep_dir}")
        return sweep_dir, state
    sweep_dir = _new_sweep_dir(space)
    sweep_dir.mkdir(parents=True)
    parent = start_parent(space, uri, sweep_dir.name, experiment)
    state = {
        "parent_run_id": parent.run_id,
        "space_path": str(space.path.resolve()),
        "source_tags": tracking.run_tags(),
        "refused": [],
    }
    _save_state(sweep_dir, state)
    return sweep_dir, state


def _conclude(
    space: Space,
    sweep_dir: Path,
    grid,
    uri: str | None,
    parent_id: str | None,
    sweep_wall: float,
    concurrency: int,
    warnings: list[str],
    json_path: str | Path | None,
) -> SweepSummary:
    """After Tune: an interrupted sweep refused with the resume command; else the records,
    the report and the parent run ended (never left RUNNING), the state marked finished."""
    unfinished = _unfinished_trials(sweep_dir, grid)
    if unfinished:
        with secondary("closing the interrupted sweep's MLflow runs"):
            interrupt_running_children(uri, parent_id)
            Run.attach(uri, parent_id).set_status("KILLED")
        raise A.SweepError(
            f"sweep {sweep_dir.name} interrupted with {unfinished} of {len(grid)} launched trials "
            f"unfinished; continue it with: raydrat tune {space.path} --resume"
        )

    try:  # whatever goes wrong here, the parent run does not stay RUNNING
        state = _load_state(sweep_dir)
        records = trial_records(space, grid, state, uri, parent_id)
        if records and not any(r.launched for r in records):
            _refuse_all_infeasible(space, records, uri, parent_id, sweep_dir, state)
        summary = _finish(space, records, parent_id, uri, sweep_dir, sweep_wall, concurrency, warnings)
    except BaseException:
        with secondary("ending the sweep's MLflow run"):
            if Run.attach(uri, parent_id).status() == "RUNNING":
                Run.attach(uri, parent_id).end("FAILED")
        raise
    state["finished"] = True
    _save_state(sweep_dir, state)
    if json_path:
        write_json(
            json_path,
            {
                "sweep": sweep_dir.name,
                "overhead": summary.overhead,
                "memory": summary.memory,
                "trials": [r.to_json() for r in records],
            },
        )
    return summary


def max_steps(space: Space, specs: list[TrialSpec]) -> int:
    """The most steps a trial may train (``train.steps`` may itself be searched)."""
    steps = [t.config.train.steps for t in specs]
    for d in space.dists:
        if d.key == "train.steps":
            steps += [int(v) for v in d.args]
    return max(steps)


def _refuse_all_infeasible(space, records, uri, parent_id, sweep_dir, state) -> None:
    """A searcher whose every proposal was refused: the sweep fails like a drawn space
    with no feasible trial (its parent run ends ``FAILED``)."""
    state["finished"] = True
    _save_state(sweep_dir, state)
    Run.attach(uri, parent_id).end("FAILED")
    sized = [r for r in records if r.estimated_bytes is not None]
    if not sized:
        raise A.SweepError(
            f"{space.path}: no proposal of search: {space.sweep.search} was a valid trial: "
            + "; ".join(f"{r.trial}: {r.error}" for r in records[:3])
        )
    r = min(sized, key=lambda r: r.estimated_bytes)
    raise A.SweepError(
        f"{space.path}: memory_budget_gb = {space.sweep.memory_budget_gb} is below the estimate of every one of "
        f"the {len(records)} trial(s) search: {space.sweep.search} proposed; the smallest is "
        f"{r.estimated_bytes / A.GB:.4f} GB ({r.trial}: {R.params_text(r.params)}): raise memory_budget_gb or "
        f"shrink the space"
    )


def _unfinished_trials(sweep_dir: Path, grid) -> int:
    """Trials cut off by an interrupt. After a SIGINT Tune saves its state with the running
    trials still RUNNING and returns normally (they read TERMINATED in memory), so: a trial is
    unfinished when Tune's last saved state does not have it TERMINATED/ERROR and it neither
    sent its own final status nor errored (the last snapshot can lag a normal finish)."""
    done = {Path(r.path).name for r in grid if r.error is not None or STATUS in (r.metrics or {})}
    return sum(t.get("status") not in ENDED and t.get("relative_logdir") not in done for t in saved_trials(sweep_dir))


def _prepare_demo_data(trials: list[TrialSpec]) -> None:
    """Build the demo corpus and tokenizer once in the driver, so concurrent trials never
    race to build them."""
    needed = {
        (str(Path(t.config.data.demo_dir).resolve()), t.config.model.vocab_size)
        for t in trials
        if any(src.path == "demo" for src in t.config.data.sources) and not t.config.data.tokenizer_path
    }
    for demo_dir, vocab in sorted(needed):
        build_demo_corpus(demo_dir, vocab)


def _fit(
    space: Space,
    searcher: AdmittingSearcher,
    sweep_dir: Path,
    concurrency: int,
    resume: bool,
    verbose: bool,
    events: TrialEvents,
    steps: int,
    tracking_uri: str | None = None,
):
    sweep = space.sweep
    keep_credentials_out_of_runtime_envs()
    # the tracking URI (it may hold a password) reaches the trials through the object store,
    # never through their configs, which Tune writes to disk
    trainable = tune.with_resources(
        tune.with_parameters(trial_fn, tracking_uri=tracking_uri), {"CPU": sweep.resources.trial_cpu}
    )
    if resume:
        repaired = mark_ended(sweep_dir, _load_state(sweep_dir).get("ended", {}))
        if repaired:
            M.logger.info(f"{', '.join(repaired)}: ended before the sweep was interrupted, not run again")
        tuner = tune.Tuner.restore(
            str(sweep_dir), trainable=trainable, resume_unfinished=True, resume_errored=False, restart_errored=False
        )
        with _tune_console(verbose):
            return tuner.fit()
    scheduler = None
    if sweep.scheduler.type == "asha":
        # max_t one past the last step: ASHA stops a trial that reaches max_t, and a trial that
        # trains to the end must get to report its own final status.
        max_t = steps + 1
        scheduler = ASHAScheduler(
            time_attr=M.STEP,
            metric=sweep.metric,
            mode=sweep.mode,
            max_t=max_t,
            grace_period=min(sweep.scheduler.grace_period, max_t),
            reduction_factor=sweep.scheduler.reduction_factor,
        )
    tuner = tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(
            search_alg=searcher,
            num_samples=-1,
            max_concurrent_trials=concurrency,
            scheduler=scheduler,
            trial_name_creator=_trial_name,
            trial_dirname_creator=_trial_name,
        ),
        run_config=tune.RunConfig(
            name=sweep_dir.name, storage_path=str(sweep_dir.parent), verbose=2 if verbose else 0, callbacks=[events]
        ),
    )
    with _tune_console(verbose):
        return tuner.fit()


@contextlib.contextmanager
def _tune_console(verbose: bool):
    """Without ``verbose``, Tune prints nothing (its newer console engine prints the
    experiment's table even when silent; its older one is silent at ``verbose=0``), not even
    a failed trial's traceback: the trial's line says its root cause (the traceback is in the
    trial's ``error.txt``), nor its closing list of the trials that did not complete."""
    quiet = None if verbose else "0"
    tune_log = logging.getLogger(TUNE_LOGGER)
    if not verbose:
        tune_log.addFilter(_no_incomplete_trials_line)
    try:
        with env_set(NEW_OUTPUT_ENV, quiet), env_set(PRINT_TRIAL_ERRORS_ENV, quiet):
            yield
    finally:
        tune_log.removeFilter(_no_incomplete_trials_line)


def _no_incomplete_trials_line(record: logging.LogRecord) -> bool:
    """Tune's closing ``Trials did not complete: [...]``: the report gives every trial's status."""
    return not record.getMessage().startswith("Trials did not complete")


def _finish(space, records, parent_id, uri, sweep_dir, sweep_wall, concurrency, warnings) -> SweepSummary:
    sweep = space.sweep
    R.mark_pareto(records)  # sets each record's pareto flag
    budget = A.budget_bytes(space)
    tiers = R.best_per_tier(records, R.memory_tiers(budget, records))
    best = best_trial(records, sweep.mode)
    command = full_length_command(space, best) if best else None
    overhead = overhead_figures(records, sweep_wall)
    memory = memory_figures(records)
    text = R.format_report(records, tiers, command, budget, memory)
    counts = {s: sum(r.status == s for r in records) for s in STATUSES}
    text += "\n\nStatuses: " + ", ".join(f"{k} {v}" for k, v in counts.items() if v)
    if overhead["trials_measured"]:
        text += (
            f"\nOverhead: {overhead['outside_steps_share_in_trials']} of trial time outside training steps; "
            f"concurrency peak {overhead['concurrency_peak']}, mean {overhead['concurrency_mean']} "
            f"(limit {concurrency}); sweep wall {overhead['sweep_wall_s']}s"
        )
    if overhead["outside_steps_breakdown"]:
        text += "\nTrial time by part: " + ", ".join(
            f"{k} {v:.1%}" for k, v in overhead["outside_steps_breakdown"].items()
        )
    csv_path = R.write_trials_csv(records, sweep_dir / "trials.csv")
    png_path = R.plot_pareto(records, sweep_dir / "pareto.png", f"{sweep_dir.name}: every trial, Pareto front", budget)
    (sweep_dir / "report.txt").write_text(text + "\n")
    finalize_trial_runs(uri, records)
    parent = Run.attach(uri, parent_id)
    figures = {k: v for k, v in overhead.items() if isinstance(v, (int, float))}
    figures.update({f"share/{k}": v for k, v in (overhead["outside_steps_breakdown"] or {}).items()})
    if memory["max_estimate_error"] is not None:
        figures["max_estimate_error"] = memory["max_estimate_error"]
    log_sweep_report(
        parent, [csv_path, png_path, sweep_dir / "report.txt"], best, command, sweep.metric, counts, figures
    )
    name = space.config_for({}, str(space.path)).tracking.register_model
    if name and best is not None and best.mlflow_run_id and uri:
        version = register_run_model(Run.attach(uri, best.mlflow_run_id), name)
        if version:
            M.setup_logging().info(f"registered trial {best.trial}'s model as {name} version {version}")
    return SweepSummary(
        sweep_dir.name, sweep_dir, records, text, command, overhead, parent.run_id, uri, best, warnings, memory
    )
