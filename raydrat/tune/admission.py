"""Before a sweep launches anything: each trial's resolved runtime and memory estimate, the
budget (trials over it are ``infeasible`` and never launched), what each trial's workers
request so small trials share a device, and how many trials the cluster fits at once."""

from __future__ import annotations

import math

import torch

from raydrat.config import ConfigError
from raydrat.core.runtime import Runtime, resolve
from raydrat.tune import report as R
from raydrat.tune.space import Space, TrialSpec

GB = 1024**3


class SweepError(ConfigError):
    """A sweep that cannot start (bad space, budget, resources, nothing to resume)."""


def resolve_trials(trials: list[TrialSpec], gpus: float | None) -> list[Runtime]:
    """Each trial's :class:`Runtime` (``gpus``: what the cluster offers a worker); a trial
    this hardware cannot run stops the sweep, naming the trial."""
    out = []
    for t in trials:
        try:
            out.append(resolve(t.config, gpus))
        except ConfigError as exc:
            raise SweepError(f"trial {t.name} ({R.params_text(t.params)}): {exc}") from None
    return out


def estimated_bytes(runtime: Runtime) -> int:
    return int(runtime.estimate.total_bytes)


def gpu_memory_bytes(space: Space) -> int | None:
    if space.sweep.resources.gpu_memory_gb:
        return int(space.sweep.resources.gpu_memory_gb * GB)
    if torch.cuda.is_available():
        return int(torch.cuda.get_device_properties(0).total_memory)
    return None


def worker_resources(estimate: int, use_gpu: bool, gpu_bytes: int | None) -> dict:
    """What each of the trial's training workers requests beyond its CPUs: on a GPU, the
    fraction its estimate fills (rounded up to 1%), so small trials share a GPU; on CPU,
    Ray's ``memory`` resource in bytes."""
    if use_gpu:
        if not gpu_bytes:
            return {"GPU": 1}
        return {"GPU": min(1.0, math.ceil(100 * estimate / gpu_bytes) / 100)}
    return {"memory": int(estimate)}


def check_budget(space: Space, trials: list[TrialSpec], estimates: list[int]) -> list[bool]:
    """Which trials fit ``memory_budget_gb``; refuses a space where none does."""
    budget = space.sweep.memory_budget_gb
    if budget is None:
        return [True] * len(trials)
    limit = budget * GB
    feasible = [e <= limit for e in estimates]
    if not any(feasible):
        i = min(range(len(trials)), key=lambda j: estimates[j])
        raise SweepError(
            f"{space.path}: memory_budget_gb = {budget} is below every trial's estimate; the "
            f"smallest is {estimates[i] / GB:.4f} GB ({trials[i].name}: {R.params_text(trials[i].params)}): "
            f"raise memory_budget_gb to at least {math.ceil(estimates[i] / GB * 1e4) / 1e4} or shrink the space"
        )
    return feasible


def check_resources(space: Space, trials: list[TrialSpec], cluster: dict) -> tuple[int, list[str]]:
    """The concurrency the cluster allows; raises when not even one trial fits."""
    sweep = space.sweep
    cpus = float(cluster.get("CPU", 0))
    need = max(sweep.resources.trial_cpu + t.config.scaling.num_workers * t.config.scaling.cpus_per_worker
               for t in trials)
    room = cpus - sweep.resources.data_cpu_headroom
    if need > room:
        raise SweepError(
            f"{space.path}: one trial needs {need:g} CPUs (resources.trial_cpu + scaling.num_workers x "
            f"scaling.cpus_per_worker) plus {sweep.resources.data_cpu_headroom:g} for Ray Data, but the "
            f"cluster has {cpus:g}: lower scaling.cpus_per_worker (overrides) or resources.trial_cpu"
        )
    fit = max(1, int(room // need))
    warnings = []
    if sweep.max_concurrent > fit:
        warnings.append(
            f"max_concurrent = {sweep.max_concurrent} but only {fit} trial(s) fit in {cpus:g} CPUs "
            f"({need:g} per trial + {sweep.resources.data_cpu_headroom:g} for Ray Data): running {fit} at once"
        )
    return min(sweep.max_concurrent, fit), warnings
