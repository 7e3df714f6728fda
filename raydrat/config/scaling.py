"""Ray Train worker group (section ``scaling:``)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from raydrat.config.base import Section


class ScalingConfig(Section):
    num_workers: int | tuple[int, int] = 1
    """Ray Train workers: a number, or ``[min, max]`` for an elastic run (Ray Train's
    ``ScalingConfig(num_workers=(min, max))``): it starts with as many workers as the cluster
    has room for, at least ``min``, and Ray Train restarts the worker group at another size
    when the cluster changes. Every restart continues from the latest checkpoint's data
    position, whatever the new size (docs/data.md)."""
    use_gpu: Literal["auto"] | bool = "auto"
    """``auto``: one GPU per worker when the Ray cluster has GPUs."""
    cpus_per_worker: float = Field(1, gt=0)
    """CPUs reserved for each training worker. Torch intra-op threads follow this value."""
    worker_resources: dict[str, float] = Field(default_factory=dict)
    """Extra Ray resources each training worker requests, e.g. ``{raydrat_link_node: 1}``
    to place one worker on each node that advertises one (``ray start --resources``)."""
    wait_for_resources: bool = False
    """Start even when the Ray cluster has fewer CPUs/GPUs than the workers need (an
    autoscaling cluster will add nodes); otherwise such a run is refused up front."""

    @field_validator("num_workers")
    @classmethod
    def _check_num_workers(cls, value: int | tuple[int, int]) -> int | tuple[int, int]:
        low, high = (value, value) if isinstance(value, int) else value
        if low < 1 or high < low:
            raise ValueError(
                f"scaling.num_workers={value if isinstance(value, int) else list(value)}: give a number of "
                "workers >= 1, or [min, max] with 1 <= min <= max"
            )
        return low if low == high else (low, high)

    @property
    def elastic(self) -> bool:
        return isinstance(self.num_workers, tuple)

    @property
    def min_workers(self) -> int:
        return self.num_workers[0] if isinstance(self.num_workers, tuple) else self.num_workers

    @property
    def max_workers(self) -> int:
        return self.num_workers[1] if isinstance(self.num_workers, tuple) else self.num_workers

    @model_validator(mode="after")
    def _check_elastic(self) -> ScalingConfig:
        if self.elastic and self.strategy == "fsdp":
            raise ValueError(
                f"scaling.num_workers={list(self.num_workers)} (elastic) cannot be combined with "
                "scaling.strategy=fsdp: its shards are laid out for one worker count; give a fixed number"
            )
        return self

    @model_validator(mode="after")
    def _check_worker_resources(self) -> ScalingConfig:
        for key, value in self.worker_resources.items():
            if key in ("CPU", "GPU"):
                raise ValueError(
                    f"scaling.worker_resources.{key}: set scaling.cpus_per_worker or scaling.use_gpu instead"
                )
            if not value > 0:
                raise ValueError(f"scaling.worker_resources.{key}={value}: give a positive amount")
        return self
