"""The function every Ray Train worker runs: a thin wrapper around :func:`raydrat.core.fit.fit`.

``train_loop_per_worker(loop_config)`` → the resolved :class:`~raydrat.core.runtime.Runtime`
from the driver, checked on this device → ``build_model`` → ``build_techniques`` →
``apply_techniques`` → optimizer → restore the newest checkpoint → this worker's part of
the global training order from the restored data position
(:func:`raydrat.ray_data.stream.train_stream`) and the whole val split → ``fit`` with the
console, MLflow and ``ray.train.report`` callbacks (plus any a test registers).
"""

from __future__ import annotations

import ray.train
import ray.train.torch
import torch

from raydrat.config.run import RaydratConfig
from raydrat.core.callbacks import ConsoleLog
from raydrat.core.checkpoint.load import initial_model
from raydrat.core.fit import FitState, fit
from raydrat.core.memory.peak import PeakMemory
from raydrat.core.optim import build_optimizer
from raydrat.core.runtime import Runtime
from raydrat.core.techniques.bundle import apply_techniques, build_techniques
from raydrat.ray_data.stream import train_stream
from raydrat.ray_session import quiet_ray_data
from raydrat.ray_train.callbacks import RunMetrics
from raydrat.ray_train.checkpoints import RayReport, restore_latest
from raydrat.tracking import Run


def worker_device(runtime: Runtime) -> torch.device:
    return ray.train.torch.get_device() if runtime.use_gpu else torch.device("cpu")


def train_loop_per_worker(loop_config: dict) -> None:
    """``loop_config``: ``config`` (the run's config as a dict), ``runtime`` (resolved on the
    driver), ``run`` (a :class:`~raydrat.tracking.Run`), ``run_dir`` and
    ``checkpoints_since`` (which checkpoints on storage are this run's to start from),
    ``train_source`` and ``data_counter`` (the training stream's source and counter), and
    ``callbacks`` (extra :class:`~raydrat.core.fit.Callback` objects, e.g. a test's)."""
    cfg = RaydratConfig.model_validate(loop_config["config"])
    runtime: Runtime = loop_config["runtime"]
    run: Run = loop_config["run"]
    tc = cfg.train
    world = ray.train.get_context()
    rank, world_size = world.get_world_rank(), world.get_world_size()
    torch.set_num_threads(max(1, int(cfg.scaling.cpus_per_worker)))
    device = worker_device(runtime)
    quiet_ray_data()
    runtime.verify(device, cfg.model.dropout)  # refuses what this device cannot run
    peak = PeakMemory(device)  # before the model: the allocator's bytes for it count

    with peak.region("build"):
        model = initial_model(cfg.model, seed=tc.seed, device=device)
        peak.watch(model)
        techniques = build_techniques(cfg, runtime.precision, device, world_size)
        model = apply_techniques(model, techniques)  # recompute, compile, sync
        optimizer = build_optimizer(model, cfg.optim)
        techniques.sync.attach_optimizer(optimizer)
    state = FitState(model, optimizer, techniques, tc, cfg.optim, cfg.model.seq_len, rank, world_size, peak_memory=peak)
    with peak.region("restore"):  # a restored optimizer state is allocated here
        own_state = restore_latest(state, loop_config["run_dir"], loop_config["checkpoints_since"])
    if not own_state:
        torch.manual_seed(tc.seed + 1000 * rank + state.start_step)

    val_shard = ray.train.get_dataset_shard("val")

    def val_batches():
        batches = val_shard.iter_torch_batches(
            batch_size=tc.batch_size, dtypes=torch.long, device=device, drop_last=True, prefetch_batches=1
        )
        return (b["tokens"] for b in batches)

    stream = train_stream(
        loop_config["train_source"],
        state.position,
        rank,
        world_size,
        tc.batch_size,
        tc.seed,
        device,
        cfg.data.prefetch_batches,
        loop_config.get("data_counter"),
    )
    callbacks = [ConsoleLog(), RunMetrics(run), RayReport(cfg.to_dict()), *loop_config.get("callbacks", [])]
    fit(state, stream, val_batches, callbacks)
