"""The function every Ray Train worker runs: a thin wrapper around :func:`raydrat.core.fit.fit`.

``train_loop_per_worker(loop_config)`` → the resolved :class:`~raydrat.core.runtime.Runtime`
from the driver → this worker's :class:`~raydrat.core.fit.FitState`, built by the one setup
(:func:`raydrat.core.setup.build_fit_state`: threads, the runtime checked on this device,
model, techniques, optimizer) → restore the newest checkpoint → this worker's part of the
global training order from the restored data position
(:func:`raydrat.ray_data.stream.train_stream`) and the whole val split → ``fit`` with the
console, MLflow and ``ray.train.report`` callbacks (plus any a test registers).
"""

from __future__ import annotations

import ray.train
import ray.train.torch
import torch

from raydrat.config.run import RaydratConfig
from raydrat.core.callbacks import ConsoleLog
from raydrat.core.fit import fit
from raydrat.core.runtime import Runtime
from raydrat.core.setup import build_fit_state
from raydrat.ray_data.stream import train_stream
from raydrat.ray_session import quiet_ray_data
from raydrat.ray_train.callbacks import RunMetrics
from raydrat.ray_train.checkpoints import RayReport, restore_latest
from raydrat.ray_train.replicas import ReplicaLog, join_replicas
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
    device = worker_device(runtime)
    quiet_ray_data()
    state = build_fit_state(cfg, runtime, device, rank, world_size)
    with state.peak_memory.region("restore"):  # a restored optimizer state is allocated here
        own_state = restore_latest(state, loop_config["run_dir"], loop_config["checkpoints_since"])
    if not own_state:
        torch.manual_seed(tc.seed + 1000 * rank + state.start_step)
    # sync.engine=torchft: a replacement takes a live peer's state and the dead worker's data part
    watch = join_replicas(state, rank, device, loop_config["train_source"], loop_config["run_dir"])

    val_shard = loop_config["val_dataset"] if "val_dataset" in loop_config else ray.train.get_dataset_shard("val")

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
    callbacks = [
        ConsoleLog(),
        RunMetrics(run),
        RayReport(cfg.to_dict()),
        ReplicaLog(run, loop_config["run_dir"], watch),
        *loop_config.get("callbacks", []),
    ]
    fit(state, stream, val_batches, callbacks)
