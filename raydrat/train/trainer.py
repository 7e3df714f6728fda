"""Driver side: build the ``TorchTrainer`` for a config and run it end to end.

``build_trainer`` is the one function that turns a config into a ``TorchTrainer``; the
CLI, the job entrypoints and the Tune trial function all call it.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import ray
import ray.train
from ray.train.torch import TorchTrainer

from raydrat import tracking
from raydrat.config import RaydratConfig
from raydrat.data import build_datasets
from raydrat.runtime import cluster_gpus, ensure_ray
from raydrat.train import metrics as M
from raydrat.train import resume as R
from raydrat.train.loop import train_loop_per_worker


@dataclass
class TrainingSummary:
    """What a finished run tells its caller."""

    run_name: str
    final_val_loss: float | None
    tokens_per_s: float | None
    steps: int
    wall_s: float
    checkpoint_path: str | None
    tracking_uri: str | None
    mlflow_run_id: str | None
    metrics: dict = field(default_factory=dict)

    def lines(self) -> list[str]:
        out = [f"run {self.run_name}: {self.steps} steps in {self.wall_s:.1f}s"]
        if self.final_val_loss is not None:
            out.append(f"final validation loss: {self.final_val_loss:.4f}")
        if self.tokens_per_s is not None:
            out.append(f"training throughput: {self.tokens_per_s:,.0f} tokens/s")
        if self.checkpoint_path:
            out.append(f"checkpoint: {self.checkpoint_path}")
        if self.tracking_uri and self.mlflow_run_id:
            out.append(f"MLflow run {self.mlflow_run_id}; browse with:")
            out.append(f"  {tracking.ui_command(self.tracking_uri)}")
        return out


def resolve_use_gpu(cfg: RaydratConfig) -> bool:
    if cfg.scaling.use_gpu == "auto":
        return cluster_gpus() > 0
    return bool(cfg.scaling.use_gpu)


def _data_config(cfg: RaydratConfig) -> "ray.train.DataConfig":
    """``train`` is split across the workers (``val`` is given whole to each), streamed in a
    fixed order when ``data.preserve_order`` is set."""
    options = ray.train.DataConfig.default_ingest_options()
    options.preserve_order = cfg.data.preserve_order
    options.verbose_progress = False
    return ray.train.DataConfig(datasets_to_split=["train"], execution_options=options)


def build_trainer(
    cfg: RaydratConfig,
    datasets: dict,
    tracking_uri: str | None = None,
    mlflow_run_id: str | None = None,
    run_name: str | None = None,
    fault: dict | None = None,
    callbacks: list | None = None,
    worker_resources: dict | None = None,
    resume: bool = False,
) -> TorchTrainer:
    """The ``TorchTrainer`` for ``cfg`` over ``datasets`` (``train`` split across workers,
    ``val`` given whole to each). ``callbacks`` go to the ``RunConfig`` (a Tune trial passes
    ``TuneReportCallback``); ``worker_resources`` overrides/extends each worker's request
    (a Tune trial passes its GPU fraction or ``memory`` bytes). The workers start
    from the newest checkpoint of Ray Train's record and the run's storage directory (any
    there with ``resume``, else those this fit saved): Ray Train may not have recorded a save
    that finished just before a worker was killed."""
    use_gpu = resolve_use_gpu(cfg)
    resources = {"CPU": cfg.scaling.cpus_per_worker}
    if use_gpu:
        resources["GPU"] = 1
    resources.update(cfg.scaling.worker_resources)
    resources.update(worker_resources or {})
    storage = str(Path(cfg.train.storage_path).resolve())
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "config": cfg.to_dict(),
            "context": {"tracking_uri": tracking_uri, "run_id": mlflow_run_id, **(fault or {}),
                        "run_dir": str(Path(storage) / (run_name or cfg.name)),
                        "checkpoints_since": 0.0 if resume else time.time()},
        },
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.scaling.num_workers, use_gpu=use_gpu, resources_per_worker=resources
        ),
        datasets=datasets,
        dataset_config=_data_config(cfg),
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


def _log_run_artifacts(uri: str, run_id: str, cfg: RaydratConfig, tokenizer_path: str) -> None:
    tracking.log_text(uri, run_id, cfg.to_yaml(), "config.yaml")
    if tokenizer_path and Path(tokenizer_path).exists():
        tracking.log_artifact(uri, run_id, tokenizer_path, "tokenizer")


def _log_loss_curve(uri: str, run_id: str, title: str, out_dir: Path) -> None:
    curves = {
        "train": tracking.metric_history(uri, run_id, M.TRAIN_LOSS),
        "val": tracking.metric_history(uri, run_id, M.VAL_LOSS),
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    png = tracking.plot_curves(curves, out_dir / "loss_curve.png", title)
    tracking.log_artifact(uri, run_id, png, "plots")


def _fault_from_env() -> dict:
    """Test hook: ``RAYDRAT_FAULT_AT_STEP=K`` (and ``RAYDRAT_FAULT_RANK``) kills that
    worker's process after optimizer step K."""
    step = os.environ.get("RAYDRAT_FAULT_AT_STEP")
    if not step:
        return {}
    return {"fault_step": int(step), "fault_rank": int(os.environ.get("RAYDRAT_FAULT_RANK", "0"))}


def fit_in_run(
    cfg: RaydratConfig,
    bundle,
    uri: str | None,
    run_id: str | None,
    run_name: str,
    callbacks: list | None = None,
    worker_resources: dict | None = None,
    resume: bool = False,
) -> ray.train.Result:
    """Build the ``TorchTrainer`` for ``cfg`` over ``bundle`` and fit it, recording into the
    existing MLflow run ``run_id`` (the loss-curve plot is logged when it succeeds; ending the
    run is the caller's). Shared by ``run_training`` and the Tune trial function."""
    trainer = build_trainer(
        cfg, {"train": bundle.train, "val": bundle.val}, uri, run_id, run_name, _fault_from_env(),
        callbacks=callbacks, worker_resources=worker_resources, resume=resume,
    )
    result = trainer.fit()
    if uri and run_id:
        _log_loss_curve(uri, run_id, run_name, Path(cfg.train.storage_path) / run_name)
    return result


def run_training(cfg: RaydratConfig, resume: bool | str = False) -> TrainingSummary:
    """Train ``cfg`` through Ray Train on the current (or a new local) Ray instance.
    ``resume``: continue the newest interrupted run of ``cfg.name`` (or the named run)
    from its latest checkpoint, in the same Ray Train run and MLflow run."""
    log = M.setup_logging()
    t0 = time.perf_counter()
    record = R.prepare_resume(cfg, resume) if resume else None
    ensure_ray()
    R.check_cluster_fits(cfg, resolve_use_gpu(cfg), ray.cluster_resources())
    bundle = build_datasets(cfg.data, cfg.model.seq_len, cfg.model.vocab_size,
                            reserved_cpus=cfg.scaling.num_workers * cfg.scaling.cpus_per_worker)
    run_name = cfg.tracking.run_name or f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}"

    uri = run_id = None
    if record is not None:
        run_name, uri, run_id = record["run_name"], record["tracking_uri"], record["mlflow_run_id"]
        if uri and run_id:
            tracking.client(uri).update_run(run_id, status="RUNNING")
        log.info(f"resuming run {run_name} (MLflow run {run_id}) from {R.latest_checkpoint(R.storage_root(cfg) / run_name)}")
    elif cfg.tracking.enabled:
        uri = tracking.resolve_tracking_uri(cfg.tracking)
        run_id = tracking.start_run(uri, cfg.tracking.experiment, run_name, params=cfg.flat())
        _log_run_artifacts(uri, run_id, cfg, bundle.tokenizer_path)
        if bundle.lineage:  # data lineage: the prepare manifest or the sources read
            tracking.log_text(uri, run_id, json.dumps(bundle.lineage, indent=2, default=str), "data/lineage.json")
            tracking.log_metrics(uri, run_id, bundle.metrics(), 0)
        log.info(f"MLflow run {run_id} in {uri}")
    if record is None:
        R.write_run_record(cfg, run_name, uri, run_id)

    status = "FAILED"
    try:
        result = fit_in_run(cfg, bundle, uri, run_id, run_name, resume=record is not None)
        status = "FINISHED"
        if uri and run_id:  # per-epoch data counts (documents, tokens, skips)
            for epoch, values in enumerate(bundle.epoch_metrics(), start=1):
                tracking.log_metrics(uri, run_id, values, epoch)
    finally:
        if uri and run_id:
            tracking.end_run(uri, run_id, status)

    final = dict(result.metrics or {})
    summary = TrainingSummary(
        run_name=run_name,
        final_val_loss=final.get(M.VAL_LOSS),
        tokens_per_s=final.get(M.TOKENS_PER_S_AVG),
        steps=int(final.get(M.STEP, cfg.train.steps)),
        wall_s=time.perf_counter() - t0,
        checkpoint_path=result.checkpoint.path if result.checkpoint else None,
        tracking_uri=uri,
        mlflow_run_id=run_id,
        metrics=final,
    )
    if uri and run_id and summary.tokens_per_s:
        tracking.log_metrics(uri, run_id, {"final_tokens_per_s": summary.tokens_per_s}, summary.steps)
    return summary
