"""Sweeps (``tune_spaces/*.yaml``): what to search, how, and under which memory budget."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator

from raydrat.config.base import Section
from raydrat.core import metrics as M


class SchedulerConfig(Section):
    type: Literal["asha", "none"] = "asha"
    """``asha``: asynchronous successive halving on the sweep metric; ``none``: every trial
    runs to the end."""
    grace_period: int = Field(1, ge=1)
    """Optimizer steps a trial runs before ASHA may stop it (counted in reported steps)."""
    reduction_factor: float = Field(2.0, gt=1)
    """ASHA keeps the best 1/reduction_factor of trials at each rung."""


class TrialResourcesConfig(Section):
    trial_cpu: float = Field(0.1, gt=0)
    """CPUs held by each trial's driver function (it only waits for its TorchTrainer; the
    training workers reserve ``scaling.cpus_per_worker`` each on top)."""
    gpu_memory_gb: float | None = Field(None, gt=0)
    """Memory of one GPU, used to size a trial's GPU fraction. ``None``: read from the
    local CUDA device when there is one."""
    data_cpu_headroom: float = Field(1.0, ge=0)
    """CPUs left free for Ray Data tasks when checking that ``max_concurrent`` trials fit."""


class SweepConfig(Section):
    name: str = "sweep"
    """Name of the sweep (Tune experiment directory prefix, MLflow parent run name)."""
    base: str = "debug"
    """Base recipe: a YAML path (relative to the space file) or a shipped recipe name."""
    overrides: dict[str, Any] = Field(default_factory=dict)
    """Fixed dotted settings applied to every trial, e.g. ``train.steps: 6``."""
    space: dict[str, Any] = Field(default_factory=dict)
    """Dotted config key → ``{choice: [...]}``, ``{grid: [...]}``, ``{uniform: [lo, hi]}``,
    ``{loguniform: [lo, hi]}`` or ``{randint: [lo, hi]}`` (hi excluded); optionally with
    ``when: {other.key: value-or-list}`` to apply it only to trials where that holds."""
    search: Literal["random", "grid", "optuna", "hyperopt", "bohb"] = "random"
    """How trials are chosen. ``random``: ``num_samples`` draws per point of the ``grid``
    entries (Tune's semantics), drawn up front with ``seed``. ``grid``: every combination
    of the finite entries (``choice`` and ``grid``), continuous ones drawn ``num_samples``
    times per point. ``optuna`` | ``hyperopt`` | ``bohb``: Ray Tune's ``OptunaSearch`` |
    ``HyperOptSearch`` | ``TuneBOHB`` propose ``num_samples`` trials in all, each learning
    from the results so far (``grid`` entries become categorical; ``bohb`` needs the
    ``hpbandster`` and ``ConfigSpace`` packages). Every suggestion is admitted against
    ``memory_budget_gb`` before it is launched."""
    metric: str = M.VAL_LOSS
    """Metric the scheduler, the searcher and the "best" trial use (a name a metric had
    before it was renamed, e.g. ``tokens_per_s_avg``, means today's)."""
    mode: Literal["min", "max"] = "min"
    num_samples: int = Field(1, ge=1)
    """``random`` and ``grid``: draws per grid point (trials = num_samples x grid size).
    A searcher: suggestions in all, those refused as infeasible included."""
    seed: int = 0
    """Seed of the random draws and of the searcher (the same seed gives the same trials
    for ``random`` and ``grid``)."""
    max_concurrent: int = Field(1, ge=1)
    """Trials running at once, at most (Tune's ``max_concurrent_trials``; also limited by
    the CPUs the cluster has)."""
    scheduler: SchedulerConfig = Field(default_factory=SchedulerConfig)
    memory_budget_gb: float | None = Field(None, gt=0)
    """Peak memory one trial's worker may use (estimated before launch). Trials over it are
    recorded as ``infeasible`` and never launched. ``None``: no budget."""
    resources: TrialResourcesConfig = Field(default_factory=TrialResourcesConfig)
    storage_path: str = "ray_results/tune"
    """Where the Tune experiment (and its trials' Ray Train runs) are stored."""

    @field_validator("metric")
    @classmethod
    def _current_name(cls, value: str) -> str:
        return M.RENAMED[value][0] if value in M.RENAMED else value
