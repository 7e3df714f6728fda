"""Connecting to Ray: an existing cluster (``RAY_ADDRESS`` / ``ray job submit``) or a new
local instance, with Ray Data's console output kept quiet."""

from __future__ import annotations

import logging
import os

import ray
import ray.data
import torch

from raydrat import console


def ensure_ray(num_cpus: int | None = None, log_to_driver: bool = True) -> None:
    """Start or join Ray once. With ``RAY_ADDRESS`` set (as inside ``ray job submit``, or
    ``RAY_ADDRESS=auto`` to join a cluster started with ``ray start``) join that cluster;
    otherwise always start a fresh local instance, never silently attach to another.
    ``log_to_driver=False``: the workers' output stays in Ray's logs (a sweep's console
    has one line per trial event instead)."""
    console.plain_when_piped()  # no colour codes in worker prefixes written to a file or pipe
    if not ray.is_initialized():
        address = os.environ.get("RAY_ADDRESS") or "local"
        kwargs = {"logging_level": console.ray_log_level(), "log_to_driver": log_to_driver}
        if address == "local":
            # A local instance is never preempted: skip Train's preemption watcher actor.
            os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
            # The dashboard stays on: Ray Train V2 queries actor state through it.
            kwargs.update(num_cpus=num_cpus)
        ray.init(address=address, **kwargs)
    quiet_ray_data()
    console.install()  # a quiet console (raydrat train without --verbose): raydrat's lines only


def quiet_ray_data() -> None:
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    ctx.execution_options.verbose_progress = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)


def cluster_gpus() -> float:
    """GPUs in the Ray cluster (Ray must be connected)."""
    return float(ray.cluster_resources().get("GPU", 0))


def expected_gpus() -> float:
    """GPUs the run's workers can get, without starting anything when no cluster is named:
    a local instance has this machine's GPUs; with ``RAY_ADDRESS`` set, the cluster's."""
    if ray.is_initialized() or os.environ.get("RAY_ADDRESS"):
        ensure_ray()
        return cluster_gpus()
    return float(torch.cuda.device_count())
