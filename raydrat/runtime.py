"""Connecting to Ray: an existing cluster (``RAY_ADDRESS`` / ``ray job submit``) or a new
local instance, with Ray Data's console output kept quiet."""

from __future__ import annotations

import logging
import os


def ensure_ray(num_cpus: int | None = None) -> None:
    """Start or join Ray once. With ``RAY_ADDRESS`` set (as inside ``ray job submit``, or
    ``RAY_ADDRESS=auto`` to join a cluster started with ``ray start``) join that cluster;
    otherwise always start a fresh local instance, never silently attach to another."""
    import ray

    if not ray.is_initialized():
        address = os.environ.get("RAY_ADDRESS") or "local"
        kwargs = {"logging_level": logging.WARNING, "log_to_driver": True}
        if address == "local":
            # A local instance is never preempted: skip Train's preemption watcher actor.
            os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
            # The dashboard stays on: Ray Train V2 queries actor state through it.
            kwargs.update(num_cpus=num_cpus)
        ray.init(address=address, **kwargs)
    quiet_ray_data()


def quiet_ray_data() -> None:
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    ctx.execution_options.verbose_progress = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)


def cluster_gpus() -> float:
    import ray

    return float(ray.cluster_resources().get("GPU", 0))


def walk_exceptions(exc: BaseException):
    """Yield ``exc`` and everything it wraps: ``__cause__``/``__context__`` chains and the
    worker errors Ray Train's wrappers carry (``cause``, ``worker_failures``, ``errors``)."""
    seen: set[int] = set()
    stack: list = [exc]
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        stack.extend([e.__cause__, e.__context__, getattr(e, "cause", None)])
        for attr in ("worker_failures", "errors"):
            errs = getattr(e, attr, None)
            if isinstance(errs, dict):
                stack.extend(errs.values())
            elif isinstance(errs, (list, tuple)):
                stack.extend(errs)
