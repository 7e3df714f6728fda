"""Connecting to Ray: an existing cluster (``RAY_ADDRESS`` / ``ray job submit``) or a new
local instance, with Ray Data's console output kept quiet.

Starting (or joining) is tried twice: a loaded machine can make Ray's local node miss its
fixed start-up wait once. The second failure is :class:`raydrat.crash.RayStartError`, one
line naming the load average and how to join a running cluster instead."""

from __future__ import annotations

import logging
import os

import ray
import ray.data
import torch

from raydrat import console, crash
from raydrat.core import metrics as M


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
        console.quiet_ray_start()
        _init_twice(address, kwargs)
    quiet_ray_data()
    console.install()  # a quiet console (raydrat train without --verbose): raydrat's lines only


def _init_twice(address: str, kwargs: dict) -> None:
    for attempt in (1, 2):
        try:
            ray.init(address=address, **kwargs)
            return
        except Exception as exc:  # Ray raises several types here (RuntimeError, ConnectionError, OSError...)
            ray.shutdown()  # what the failed start left running
            if attempt == 2:
                raise crash.RayStartError(start_failure(address, exc)) from exc
            M.setup_logging().warning(f"warning: Ray did not start ({crash.first_line(exc)}); trying once more")


def start_failure(address: str, exc: BaseException) -> str:
    """The one line a second failed start says."""
    cause = crash.first_line(crash.innermost(exc))
    if address != "local":
        return (
            f"could not join the Ray cluster at RAY_ADDRESS={address} (tried twice): {cause}; check that the "
            "cluster is up (`ray status` on its head node) and the address, or unset RAY_ADDRESS to start a local "
            "instance"
        )
    return (
        f"Ray did not start a local instance (tried twice): {cause}; {crash.load_average()}. On a busy machine, "
        "try again when it is quieter, or start Ray once (`ray start --head`) and join it with RAY_ADDRESS=auto"
    )


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
