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

from raydrat import interrupt, tracking
from raydrat.config import RaydratConfig
from raydrat.core import metrics as M
from raydrat.core.fit import Callback
from raydrat.core.runtime import Runtime, resolve
from raydrat.plots import plot_curves
from raydrat.ray_data.datasets import build_datasets
from raydrat.ray_session import ensure_ray, expected_gpus
from raydrat.ray_train import resume
from raydrat.ray_train.fits import check_cluster_fits
from raydrat.ray_train.models import log_run_models
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
        peak = self.metrics.get(M.PEAK_BYTES)
        if peak:
            est = f" (estimated {self.estimated_bytes / 2**20:,.1f} MiB)" if self.estimated_bytes else ""
            out.append(f"peak memory per worker (PyTorch's allocator, training steps): {peak / 2**20:,.1f} MiB{est}")
        if self.checkpoint_path:
            out.append(f"checkpoint: {self.checkpoint_path}")
        if self.run:
            out.append(f"MLflow run {self.run.run_id}; browse with:")
            out.append(f"  {tracking.ui_command(self.run.uri)}")
            out.append(f"  then open {tracking.ui_url(self.run.uri, self.run.experiment_id())}")
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
        },
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.scaling.num_workers, use_gpu=runtime.use_gpu, resources_per_worker=resources
        ),
        datasets=datasets,
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
        profile = {k.removeprefix("data_"): v for k, v in bundle.metrics().items()}
        run.log_inputs(tracking.data_inputs(bundle.lineage, profile))


def _log_loss_curve(run: Run, title: str, out_dir: Path) -> None:
    curves = {"train": run.metric_history(M.TRAIN_LOSS), "val": run.metric_history(M.VAL_LOSS)}
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
        _log_loss_curve(run, run_name, Path(cfg.train.storage_path) / run_name)
    return result


def run_training(
    cfg: RaydratConfig, resume_run: bool | str = False, fit_callbacks: Sequence[Callback] = ()
) -> TrainingSummary:
    """Train ``cfg`` through Ray Train on the current (or a new local) Ray instance.
    ``resume_run``: continue the newest interrupted run of ``cfg.name`` (or the named run)
    from its latest checkpoint, in the same Ray Train run and MLflow run."""
    t0 = time.perf_counter()
    record = resume.prepare_resume(cfg, resume_run) if resume_run else None
    if record is not None:  # the recorded URI has no password: the one to use, checked before any work
        record["tracking_uri"] = resume.tracking_uri_for(record, tracking.resolve_tracking_uri(cfg.tracking))
    run_name = record["run_name"] if record is not None else resume.new_run_name(cfg)  # never reused
    runtime = resolve(cfg, gpus=expected_gpus())  # before Ray starts, when no cluster is named
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
    bundle = build_datasets(cfg.data, cfg.model.seq_len, cfg.model.vocab_size)

    run = Run.off()
    if record is not None:
        run = Run.attach(record["tracking_uri"], record["mlflow_run_id"])
        run.set_status("RUNNING")
        log.info(f"resuming run {run_name} (MLflow run {run.run_id}) from {record['checkpoint']}")
    elif cfg.tracking.enabled:
        run = Run.start(
            tracking.resolve_tracking_uri(cfg.tracking),
            cfg.tracking.experiment,
            run_name,
            params=tracking.run_params(cfg, runtime),
        )
        _log_run_artifacts(run, cfg, bundle.tokenizer_path)
        log_data(run, bundle)
        run.log_metrics({M.ESTIMATED_BYTES: runtime.estimate.total_bytes}, 0)
        log.info(f"MLflow run {run.run_id} in {redact_uri(run.uri)}")
    if record is None:
        resume.write_run_record(cfg, run_name, run.uri, run.run_id)

    status = "FAILED"
    try:
        result = interrupt.call_interruptibly(
            fit_in_run, cfg, runtime, bundle, run, run_name, resume=record is not None, fit_callbacks=fit_callbacks
        )
        status = "FINISHED"
        models = log_run_models(run, cfg, result)
        if models:
            log.info("MLflow models: " + ", ".join(f"{k} {v}" for k, v in models.items()))
        epochs = bundle.epoch_metrics()  # per-epoch data counts: an artifact, not constant charts
        if epochs:
            run.log_text(json.dumps(epochs, indent=2), "data/epochs.json")
        for line in bundle.achieved_shares():
            log.info(line)
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        run.end(status)

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
