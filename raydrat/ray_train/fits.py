"""Whether a run fits the Ray cluster, checked before anything starts (instead of waiting
forever for resources).

A run holds its Train workers' CPUs and GPUs while it trains, and nothing else: the training
data is read inside each worker (:func:`raydrat.ray_data.stream.train_stream`), the up-front
check and the val split run on Ray Data before the workers start. An elastic run
(``scaling.num_workers: [min, max]``) must fit its ``min`` workers."""

from __future__ import annotations

import math

from raydrat.config import ConfigError, RaydratConfig
from raydrat.core.data.plan import DEMO_SOURCE


def check_cluster_fits(cfg: RaydratConfig, use_gpu: bool, resources: dict[str, float]) -> None:
    """Refuse a run whose (minimum number of) workers need more CPUs/GPUs than the Ray
    cluster has, unless ``scaling.wait_for_resources`` (autoscaling clusters)."""
    if cfg.scaling.wait_for_resources:
        return
    n, per = cfg.scaling.min_workers, cfg.scaling.cpus_per_worker
    workers = f"scaling.num_workers={n}" if not cfg.scaling.elastic else f"the minimum of scaling.num_workers, {n},"
    need_cpu = n * per
    have_cpu, have_gpu = resources.get("CPU", 0.0), resources.get("GPU", 0.0)
    has = f"the Ray cluster has {have_cpu:g} CPUs and {have_gpu:g} GPUs"
    if use_gpu and n > have_gpu:
        raise ConfigError(
            f"{workers} with GPUs needs {n} GPUs but {has}: lower scaling.num_workers, "
            "set scaling.use_gpu=false, or scaling.wait_for_resources=true on an autoscaling cluster"
        )
    if need_cpu > have_cpu:
        fits = math.floor(have_cpu / n * 100) / 100  # the largest cpus_per_worker that fits
        fix = (
            f"set scaling.cpus_per_worker={fits:g} (or lower)"
            if fits > 0
            else f"give Ray at least {need_cpu:g} CPUs (ray start --num-cpus={math.ceil(need_cpu)})"
        )
        raise ConfigError(
            f"{workers} x scaling.cpus_per_worker={per:g} needs {need_cpu:g} CPUs for the Train workers but "
            f"{has}; the run would wait forever: {fix}, lower scaling.num_workers, or set "
            "scaling.wait_for_resources=true on an autoscaling cluster"
        )
    for key, amount in cfg.scaling.worker_resources.items():
        if n * amount > resources.get(key, 0.0):
            raise ConfigError(
                f"scaling.worker_resources.{key}={amount:g} x scaling.num_workers={n} needs {n * amount:g} "
                f"but the Ray cluster's nodes advertise {resources.get(key, 0.0):g}: start the nodes with "
                f"ray start --resources '{{\"{key}\": ...}}', or lower the amount"
            )


def check_corpus_reaches_workers(cfg: RaydratConfig, nodes: int) -> None:
    """Refuse the demo corpus for several Train workers on a cluster of several nodes: it is
    built on the driver's own disk (``data.demo_dir``), which the other nodes' read tasks and
    workers do not see. A corpus every node reads is an ``s3://`` prefix or a shared path."""
    n = cfg.scaling.num_workers
    if cfg.data.prepared or n <= 1 or nodes <= 1:
        return
    demo = [i for i, src in enumerate(cfg.data.sources) if src.path == DEMO_SOURCE]
    if demo:
        raise ConfigError(
            f"data.sources[{demo[0]}].path is {DEMO_SOURCE!r}, the small embedded corpus built on the driver's disk, "
            f"but scaling.num_workers={n} Train workers on a Ray cluster of {nodes} nodes read the corpus from every "
            "node: set data.sources to a parquet prefix every node reads (s3://bucket/corpus/ or a shared path such as "
            "/mnt/shared/corpus/; for the cluster examples, in jobs/cluster-gpt2-small.yaml)"
        )
