"""Whether a run fits the Ray cluster, checked before anything starts (instead of waiting
forever for resources)."""

from __future__ import annotations

from raydrat.config import ConfigError, RaydratConfig


def check_cluster_fits(cfg: RaydratConfig, use_gpu: bool, resources: dict[str, float]) -> None:
    """Refuse a run that needs more CPUs/GPUs than the Ray cluster has (instead of waiting
    forever for resources), unless ``scaling.wait_for_resources`` (autoscaling clusters)."""
    if cfg.scaling.wait_for_resources:
        return
    n = cfg.scaling.num_workers
    need_cpu = n * cfg.scaling.cpus_per_worker
    have_cpu, have_gpu = resources.get("CPU", 0.0), resources.get("GPU", 0.0)
    has = f"the Ray cluster has {have_cpu:g} CPUs and {have_gpu:g} GPUs"
    if use_gpu and n > have_gpu:
        raise ConfigError(
            f"scaling.num_workers={n} with GPUs needs {n} GPUs but {has}: lower scaling.num_workers, "
            "set scaling.use_gpu=false, or scaling.wait_for_resources=true on an autoscaling cluster"
        )
    if need_cpu > have_cpu:
        raise ConfigError(
            f"scaling.num_workers={n} x scaling.cpus_per_worker={cfg.scaling.cpus_per_worker:g} needs "
            f"{need_cpu:g} CPUs but {has}: lower scaling.num_workers or scaling.cpus_per_worker, or set "
            "scaling.wait_for_resources=true on an autoscaling cluster"
        )
    for key, amount in cfg.scaling.worker_resources.items():
        if n * amount > resources.get(key, 0.0):
            raise ConfigError(
                f"scaling.worker_resources.{key}={amount:g} x scaling.num_workers={n} needs {n * amount:g} "
                f"but the Ray cluster's nodes advertise {resources.get(key, 0.0):g}: start the nodes with "
                f"ray start --resources '{{\"{key}\": ...}}', or lower the amount"
            )
