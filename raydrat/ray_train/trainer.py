"""Driver side: build the ``TorchTrainer`` for a config and run it end to end.

``build_trainer`` is the one function that turns a config into a ``TorchTrainer``; the
CLI, the job entrypoints and the Tune trial function all call it (through ``fit_in_run``).
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import ray
import ray.train
from ray.train.torch import TorchTrainer

from raydrat import crash, interrupt, tracking
from raydrat.config import ConfigError, RaydratConfig
from raydrat.core import metrics as M
from raydrat.core.data.errors import DataError
from raydrat.core.exceptions import walk_exceptions
from raydrat.core.fit import Callback
from raydrat.core.runtime import Runtime, resolve
from raydrat.plots import plot_curves
from raydrat.ray_data.datasets import build_datasets
from raydrat.ray_session import ensure_ray, expected_gpus
from raydrat.ray_train import lighthouse, resume
from raydrat.ray_train.fits import check_cluster_fits, check_corpus_reaches_workers
from raydrat.ray_train.models import log_run_models
from raydrat.ray_train.preflight import check_data
from raydrat.ray_train.replicas import check_engine, replica_datasets, torch_config
from raydrat.ray_train.worker import train_loop_per_worker
from raydrat.redact import redact_obj, redact_uri
from raydrat.tracking import Run


@dataclass
class TrainingSummary:
    """What a finished run tells its caller."""

    run_name: str
    final_val_loss: float | None
    tokens_per_s: float | None
    steps: int
    wall_s: float
    checkpoint_path: str | None
    run: Run
    metrics: dict = field(default_factory=dict)
    estimated_bytes: int | None = None
    """The runtime's memory estimate per worker (the peak it predicts)."""

    @property
    def tracking_uri(self) -> str | None:
        return self.run.uri

    @property
    def mlflow_run_id(self) -> str | None:
        return self.run.run_id

    def lines(self) -> list[str]:
        out = [f"run {self.run_name}: {self.steps} steps in {self.wall_s:.1f}s"]
        if self.final_val_loss is not None:
            out.append(f"final validation loss: {self.final_val_loss:.4f}")
        if self.tokens_per_s is not None:
            out.append(f"training throughput: {self.tokens_per_s:,.0f} tokens/s")
        peak = self.metrics.get(M.PEAK_MIB)
        if peak:
            est = f" (estimated {self.estimated_bytes / M.MIB:,.1f} MiB)" if self.estimated_bytes else ""
            out.append(f"peak memory per worker (PyTorch's allocator, training steps): {peak:,.1f} MiB{est}")
        if self.checkpoint_path:
            out.append(f"checkpoint: {self.checkpoint_path}")
        if self.run:
            out.append(f"MLflow run {self.run.run_id}; browse with:")
            out.append(f"  {tracking.ui_command(self.run.uri)}")
            experiment = self.run.experiment_id()  # None: the store is away
            if experiment is not None:
                out.append(f"  then open {tracking.ui_url(self.run.uri, experiment)}")
                out.append(f"  this run: {tracking.ui_run_url(self.run.uri, experiment, self.run.run_id)}")
        return out


def _data_config() -> ray.train.DataConfig:
    """Ray Train hands ``val`` whole to each worker; the training stream is not a Ray Train
    dataset: each worker reads its part of the global order itself
    (:func:`raydrat.ray_data.stream.train_stream`)."""
    options = ray.train.DataConfig.default_ingest_options()
    options.verbose_progress = False
    return ray.train.DataConfig(datasets_to_split=[], execution_options=options)


def build_trainer(
    cfg: RaydratConfig,
    runtime: Runtime,
    datasets: dict,
    run: Run | None = None,
    run_name: str | None = None,
    callbacks: list | None = None,
    worker_resources: dict | None = None,
    resume: bool = False,
    fit_callbacks: Sequence[Callback] = (),
    train_source=None,
    data_counter=None,
) -> TorchTrainer:
    """The ``TorchTrainer`` for ``cfg`` over ``datasets`` (``val``, given whole to each
    worker) and ``train_source`` (each worker reads its part of the training order). ``callbacks`` go to the ``RunConfig`` (a Tune trial passes
    ``TuneReportCallback``); ``worker_resources`` overrides/extends each worker's request
    (a Tune trial passes its GPU fraction or ``memory`` bytes); ``fit_callbacks`` run inside
    every worker's ``fit`` (a test's fault injection). The workers start from the newest
    checkpoint of Ray Train's record and the run's storage directory (any there with
    ``resume``, else those this fit saved): Ray Train may not have recorded a save that
    finished just before a worker was killed."""
    resources = {"CPU": cfg.scaling.cpus_per_worker}
    if runtime.use_gpu:
        resources["GPU"] = 1
    resources.update(cfg.scaling.worker_resources)
    resources.update(worker_resources or {})
    storage = str(Path(cfg.train.storage_path).resolve())
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "config": redact_obj(cfg.to_dict()),  # it goes into checkpoints: no secret
            "runtime": runtime,
            "run": run or Run.off(),
            "run_dir": str(Path(storage) / (run_name or cfg.name)),
            "checkpoints_since": 0.0 if resume else time.time(),
            "callbacks": list(fit_callbacks),
            "train_source": train_source,
            "data_counter": data_counter,
            **replica_datasets(cfg, datasets),
        },
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.scaling.num_workers, use_gpu=runtime.use_gpu, resources_per_worker=resources
        ),
        torch_config=torch_config(cfg, runtime.use_gpu),
        datasets={} if replica_datasets(cfg, datasets) else datasets,
        dataset_config=_data_config(),
        run_config=ray.train.RunConfig(
            name=run_name or cfg.name,
            storage_path=storage,
            logging_config=ray.train.LoggingConfig(log_level="WARNING"),
            callbacks=callbacks,
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=cfg.train.checkpoints_to_keep,
                checkpoint_score_attribute=M.CHECKPOINT_SCORE,
                checkpoint_score_order=M.CHECKPOINT_ORDER,
            ),
            failure_config=ray.train.FailureConfig(max_failures=cfg.train.max_failures),
        ),
    )


def _log_run_artifacts(run: Run, cfg: RaydratConfig, tokenizer_path: str) -> None:
    run.log_text(cfg.to_yaml(), "config.yaml")
    if tokenizer_path and Path(tokenizer_path).exists():
        run.log_artifact(tokenizer_path, "tokenizer")


def log_data(run: Run, bundle) -> None:
    """The run's data: the lineage (the prepare manifest, or the sources read) as
    ``data/lineage.json`` and as MLflow dataset inputs, whose profile holds the data counts."""
    if bundle.lineage:
        run.log_text(json.dumps(bundle.lineage, indent=2, default=str), "data/lineage.json")
        run.log_inputs(tracking.data_inputs(bundle.lineage, bundle.counts()))


EPOCHS_TAG = "raydrat.data.epochs"
MAX_TAG_CHARS = 8000
"""MLflow's limit on a tag's value."""


def log_epochs(run: Run, bundle) -> None:
    """The per-epoch data counts (not constant charts): ``data/epochs.json``, and the tag
    ``raydrat.data.epochs`` (compact JSON), which the store can be queried on
    (``tags.key = 'raydrat.data.epochs'`` in SQL, ``search_runs`` filters) when it fits a tag."""
    epochs = bundle.epoch_metrics()
    if epochs:
        run.log_text(json.dumps(epochs, indent=2), "data/epochs.json")
        compact = json.dumps(epochs, separators=(",", ":"))
        if len(compact) <= MAX_TAG_CHARS:
            run.set_tag(EPOCHS_TAG, compact)


def log_loss_curve(run: Run, title: str, out_dir: Path) -> None:
    """The train and val loss curves, read back from the store, plotted into
    ``out_dir/loss_curve.png`` and logged to ``run`` under ``plots/``."""
    try:
        curves = {"train": run.metric_history(M.TRAIN_LOSS), "val": run.metric_history(M.VAL_LOSS)}
    except tracking.TrackingUnavailable:
        return  # the store is away (the writers said so): the curves are in the store later, no plot
    out_dir.mkdir(parents=True, exist_ok=True)
    run.log_artifact(plot_curves(curves, out_dir / "loss_curve.png", title), "plots")


def fit_in_run(
    cfg: RaydratConfig,
    runtime: Runtime,
    bundle,
    run: Run,
    run_name: str,
    callbacks: list | None = None,
    worker_resources: dict | None = None,
    resume: bool = False,
    fit_callbacks: Sequence[Callback] = (),
) -> ray.train.Result:
    """Build the ``TorchTrainer`` for ``cfg`` over ``bundle`` and fit it, recording into
    ``run`` (the loss-curve plot is logged when it succeeds; ending the run is the
    caller's). Shared by ``run_training`` and the Tune trial function."""
    trainer = build_trainer(
        cfg,
        runtime,
        {"val": bundle.val},
        run,
        run_name,
        callbacks=callbacks,
        worker_resources=worker_resources,
        resume=resume,
        fit_callbacks=fit_callbacks,
        train_source=bundle.train,
        data_counter=bundle.counter,
    )
    result = trainer.fit()
    if run:
        with crash.secondary("logging the loss curve to MLflow"):
            log_loss_curve(run, run_name, Path(cfg.train.storage_path) / run_name)
    return result


def run_training(
    cfg: RaydratConfig, resume_run: bool | str = False, fit_callbacks: Sequence[Callback] = ()
) -> TrainingSummary:
    """Train ``cfg`` through Ray Train on the current (or a new local) Ray instance.
    ``resume_run``: continue the newest interrupted run of ``cfg.name`` (or the named run)
    from its latest checkpoint, in the same Ray Train run and MLflow run. The checks that
    need no Ray (config, run name, data plan, tokenizer) come first; the run's directory is
    this driver's while it runs. A crash while training is :class:`raydrat.crash.RunCrashed`
    (one line of cause, the newest complete checkpoint; incomplete ones removed)."""
    t0 = time.perf_counter()
    check_engine(cfg)
    record = resume.prepare_resume(cfg, resume_run) if resume_run else None
    if record is not None:  # the recorded URI has no password: the one to use, checked before any work
        record["tracking_uri"] = resume.tracking_uri_for(record, tracking.resolve_tracking_uri(cfg.tracking))
    run_name = record["run_name"] if record is not None else resume.new_run_name(cfg)  # never reused
    runtime = resolve(cfg, gpus=expected_gpus())  # before Ray starts, when no cluster is named
    if record is None and cfg.tracking.enabled:  # a store that cannot be reached: refused before any work
        tracking.resolve_tracking_uri(cfg.tracking)
    check_data(cfg)
    with resume.claim(cfg, run_name, new=record is None):
        gone = resume.previous_driver(record) if record is not None else None
        if gone:
            M.setup_logging().info(f"run {run_name}: its last driver ({gone}) ended without closing it (killed?)")
        ensure_ray()
        with interrupt.trapped():  # after Ray's own handlers: SIGINT/SIGTERM stop the run cleanly
            try:
                return _train(cfg, runtime, record, run_name, fit_callbacks, t0)
            except KeyboardInterrupt as exc:
                raise _interrupted(cfg, run_name, exc) from None


def _interrupted(cfg: RaydratConfig, run_name: str, exc: KeyboardInterrupt) -> interrupt.Interrupted:
    """Stop Ray (the workers with it), leave only complete checkpoints, and say whether the
    run can be resumed (the MLflow run was already ended as KILLED)."""
    stopped = interrupt.as_interrupted(exc)
    ray.shutdown()
    run_dir = resume.storage_root(cfg) / run_name
    removed = resume.prune_incomplete(run_dir)
    if removed:
        M.setup_logging().info(f"removed incomplete checkpoint(s) cut off by {stopped.signame}: {', '.join(removed)}")
    stopped.run_name = run_name
    stopped.resumable = resume.latest_checkpoint(run_dir) is not None
    return stopped


def _crashed(cfg: RaydratConfig, run_name: str, exc: BaseException) -> crash.RunCrashed:
    """The crash of a run that was training: the workers are gone (Ray Train stopped them),
    so the incomplete checkpoints the crash left (a save cut off by a full disk or a killed
    worker) are removed, and the newest complete one is named."""
    run_dir = resume.storage_root(cfg) / run_name
    cause = lighthouse.crash_cause(run_dir, exc) or crash.describe(exc, run_dir)  # before the clean-up
    removed: list[str] = []
    with crash.secondary(f"removing incomplete checkpoints in {run_dir}"):
        removed = resume.prune_incomplete(run_dir)
    chosen = resume.latest_checkpoint(run_dir)
    return crash.RunCrashed(
        cause,
        run_name,
        resume.describe_choice(chosen, []) if chosen else None,
        removed,
        crash.write_details(exc, run_name),
    )


def _bad_input(exc: BaseException) -> bool:
    """A config or data error (its own message is the story, the CLI's one line)."""
    return any(isinstance(e, (ConfigError, DataError)) for e in walk_exceptions(exc))


def _train(
    cfg: RaydratConfig,
    runtime: Runtime,
    record: dict | None,
    run_name: str,
    fit_callbacks: Sequence[Callback],
    t0: float,
) -> TrainingSummary:
    log = M.setup_logging()
    check_cluster_fits(cfg, runtime.use_gpu, ray.cluster_resources())
    check_corpus_reaches_workers(cfg, sum(1 for node in ray.nodes() if node.get("Alive")))
    bundle = build_datasets(cfg.data, cfg.model.seq_len, cfg.model.vocab_size)

    run = Run.off()
    backlog = tracking.backlog_in(resume.storage_root(cfg) / run_name)
    if record is not None:
        run = Run.attach(record["tracking_uri"], record["mlflow_run_id"], backlog)
        run.settle(quiet=True)  # what the interrupted run left undelivered
        run.set_status("RUNNING")
        log.info(f"resuming run {run_name} (MLflow run {run.run_id}) from {record['checkpoint']}")
    elif cfg.tracking.enabled:
        run = Run.start(
            tracking.resolve_tracking_uri(cfg.tracking),
            cfg.tracking.experiment,
            run_name,
            params=tracking.run_params(cfg, runtime),
            backlog=backlog,
        )
        _log_run_artifacts(run, cfg, bundle.tokenizer_path)
        log_data(run, bundle)
        log.info(f"MLflow run {run.run_id} in {redact_uri(run.uri)}")
    run_dir = resume.storage_root(cfg) / run_name
    if record is None:
        resume.write_run_record(cfg, run_name, run.uri, run.run_id)
    else:
        resume.mark_run(run_dir, "running")
    run.claim()  # this process drives the run: a later command ends it KILLED if the process dies

    status = "FAILED"
    try:
        result = interrupt.call_interruptibly(
            fit_in_run, cfg, runtime, bundle, run, run_name, resume=record is not None, fit_callbacks=fit_callbacks
        )
        status = "FINISHED"
        with crash.secondary("logging the run's models to MLflow"):
            models = {k: v for k, v in log_run_models(run, cfg, result).items() if v}  # None: kept in the backlog
            if models:
                log.info("MLflow models: " + ", ".join(f"{k} {v}" for k, v in models.items()))
            log_epochs(run, bundle)
        for line in bundle.achieved_shares():
            log.info(line)
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    except Exception as exc:
        if _bad_input(exc):
            raise
        raise _crashed(cfg, run_name, exc) from exc
    finally:  # the run's own outcome is what the user sees, whatever tracking or the disk do here
        with crash.secondary(f"setting MLflow run {run.run_id} to {status}"):
            run.end(status)  # never raises: a store that is away keeps the status in the backlog
        with crash.secondary(f"recording the run's end in {run_dir / resume.RUN_FILE}"):
            resume.mark_run(run_dir, {"FINISHED": "finished", "KILLED": "interrupted"}.get(status, "failed"))

    final = dict(result.metrics or {})

    summary = TrainingSummary(
        run_name=run_name,
        final_val_loss=final.get(M.VAL_LOSS),
        tokens_per_s=final.get(M.TOKENS_PER_S_AVG),
        steps=int(final.get(M.STEP, cfg.train.steps)),
        wall_s=time.perf_counter() - t0,
        checkpoint_path=result.checkpoint.path if result.checkpoint else None,
        run=run,
        metrics=final,
        estimated_bytes=runtime.estimate.total_bytes,
    )
    return summary
