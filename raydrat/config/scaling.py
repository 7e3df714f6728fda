"""Ray Train worker group (section ``scaling:``)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from raydrat.config.base import Section


class ScalingConfig(Section):
    num_workers: int = Field(1, ge=1)
    """Ray Train workers."""
    use_gpu: Literal["auto"] | bool = "auto"
    """``auto``: one GPU per worker when the Ray cluster has GPUs."""
    cpus_per_worker: float = Field(1, gt=0)
    """CPUs reserved for each training worker. Torch intra-op threads follow this value."""
    wait_for_resources: bool = False
    """Start even when the Ray cluster has fewer CPUs/GPUs than the workers need (an
    autoscaling cluster will add nodes); otherwise such a run is refused up front."""
