"""Ray Train worker group (section ``scaling:``)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from raydrat.config.base import Section


class ScalingConfig(Section):
    num_workers: int = Field(1, ge=1)
    """Ray Train workers."""
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
