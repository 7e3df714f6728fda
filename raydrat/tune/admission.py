"""Before a trial launches: its resolved runtime and memory estimate against the budget
(a trial over it is ``infeasible`` and never launched), what its workers request so small
trials share a device, and how many trials the cluster fits at once.

Admission happens per trial, when the searcher proposes it (:func:`screen`, called by
:class:`raydrat.tune.search.AdmittingSearcher`): the predicted peak is the resolved
:class:`~raydrat.core.runtime.Runtime`'s estimate, the same one ``raydrat estimate``
prints. For ``search: random | grid`` the trials are drawn up front, so the sweep also
checks them all before Ray starts (:func:`check_budget`)."""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from typing import Any

import torch

from raydrat.config import ConfigError
from raydrat.core.runtime import Runtime, resolve
from raydrat.tune import report as R
from raydrat.tune.space import Space, TrialSpec

GB = 1024**3


class SweepError(ConfigError):
    """A sweep that cannot start (bad space, budget, resources, nothing to resume)."""


@dataclass
class Verdict:
    """What admission decided for one proposed trial."""

    index: int
    params: dict[str, Any]
    spec: TrialSpec | None
    """The trial with its validated config (``None``: the proposal is not a valid config)."""
    runtime: Runtime | None = None
    estimate: int | None = None
    """Predicted peak bytes per worker."""
    budget: int | None = None
    """The budget it was admitted (or refused) under, in bytes."""
    refused: str | None = None
    """``None``: admitted. ``infeasible``: the estimate is over the budget. ``failed``: the
    proposal is not a config this hardware can run (config or runtime error)."""
    reason: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return f"t{self.index:03d}"


def budget_bytes(space: Space) -> int | None:
    gb = space.sweep.memory_budget_gb
    return None if gb is None else int(gb * GB)


def one_line(exc: BaseException) -> str:
    """An error as one line (config errors span several)."""
    return "; ".join(ln.strip() for ln in str(exc).splitlines() if ln.strip()) or type(exc).__name__


def screen(
    space: Space, index: int, params: dict[str, Any], gpus: float | None, spec: TrialSpec | None = None
) -> Verdict:
    """Admit or refuse one proposed trial: its config (``spec`` when drawn up front),
    the runtime resolved for ``gpus``, and its estimate against ``memory_budget_gb``."""
    budget = budget_bytes(space)
    if spec is None:
        try:
            spec = TrialSpec(index, params, space.config_for(params, f"{space.path}: trial t{index:03d}"))
        except ConfigError as exc:
            return Verdict(index, params, None, budget=budget, refused="failed", reason=one_line(exc))
    try:
        runtime = resolve(spec.config, gpus)
    except ConfigError as exc:
        return Verdict(index, params, spec, budget=budget, refused="failed", reason=one_line(exc))
    est = int(runtime.estimate.total_bytes)
    v = Verdict(index, params, spec, runtime, est, budget)
    if budget is not None and est > budget:
        v.refused = "infeasible"
        v.reason = f"estimated peak {R.fmt_bytes(est)} > memory_budget_gb {space.sweep.memory_budget_gb:g} ({R.fmt_bytes(budget)})"
    return v


def screen_drawn(space: Space, trials: list[TrialSpec], gpus: float | None) -> list[Verdict]:
    """Every trial drawn up front (``search: random | grid``); a trial this hardware cannot
    run stops the sweep, naming the trial."""
    out = []
    for t in trials:
        v = screen(space, t.index, t.params, gpus, spec=t)
        if v.refused == "failed":
            raise SweepError(f"trial {t.name} ({R.params_text(t.params)}): {v.reason}")
        out.append(v)
    return out


def check_budget(space: Space, verdicts: list[Verdict], what: str = "trial") -> None:
    """Refuses a space where no trial (or no corner of the space, for a searcher) fits
    ``memory_budget_gb``, naming the smallest."""
    budget = space.sweep.memory_budget_gb
    sized = [v for v in verdicts if v.estimate is not None]
    if budget is None or not sized or any(v.refused is None for v in sized):
        return
    v = min(sized, key=lambda v: v.estimate)
    label = f"{v.name}: {R.params_text(v.params)}" if what == "trial" else R.params_text(v.params)
    raise SweepError(
        f"{space.path}: memory_budget_gb = {budget} is below every {what}'s estimate; the "
        f"smallest is {v.estimate / GB:.4f} GB ({label}): "
        f"raise memory_budget_gb to at least {math.ceil(v.estimate / GB * 1e4) / 1e4} or shrink the space"
    )


CORNER_LIMIT = 32
"""Most corners of a searcher's space checked against the budget before the sweep starts."""


def corners(space: Space, gpus: float | None) -> list[Verdict]:
    """For a searcher: every combination of the entries' candidates (a continuous entry's
    two bounds), when there are at most :data:`CORNER_LIMIT` of them, screened; the
    estimate grows or shrinks monotonically with the settings that move it, so the
    smallest lies among them. More combinations: none (each proposal is screened anyway)."""
    options = []
    for d in space.dists:
        if d.kind in ("choice", "grid"):
            options.append(list(d.args))
        else:
            lo, hi = d.args
            options.append([lo, hi - 1] if d.kind == "randint" else [lo, hi])
    if math.prod(len(o) for o in options) > CORNER_LIMIT:
        return []
    keys = [d.key for d in space.dists]
    out = []
    for i, combo in enumerate(itertools.product(*options)):
        out.append(screen(space, i, space.params_from(dict(zip(keys, combo))), gpus))
    return out


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


def check_resources(space: Space, trials: list[TrialSpec], cluster: dict) -> tuple[int, list[str]]:
    """The concurrency the cluster allows; raises when not even one trial fits. ``trials``:
    those drawn up front, or for a searcher the base config (``scaling`` is rarely searched;
    a proposal that needs more is refused by Ray's scheduler, not launched)."""
    sweep = space.sweep
    cpus = float(cluster.get("CPU", 0))
    need = max(
        sweep.resources.trial_cpu + t.config.scaling.max_workers * t.config.scaling.cpus_per_worker for t in trials
    )
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
