"""MLflow tracking (section ``tracking:``)."""

from __future__ import annotations

from raydrat.config.base import Section


class TrackingConfig(Section):
    enabled: bool = True
    """Record the run in MLflow."""
    tracking_uri: str | None = None
    """MLflow tracking URI. ``None``: ``$MLFLOW_TRACKING_URI`` if set, else the embedded
    SQLite store ``sqlite:///mlruns.db`` in the working directory."""
    experiment: str = "raydrat"
    """MLflow experiment name."""
    run_name: str | None = None
    """MLflow run name. ``None``: the config's ``name`` plus a timestamp."""
    log_model: bool = True
    """At the end of a run, log the final model (and the best by validation loss when it is
    another checkpoint) to the run as MLflow models (``mlflow.pytorch``)."""
    register_model: str | None = None
    """Register the run's model (the best by validation loss) under this name in the
    MLflow model registry (a new version each run)."""
