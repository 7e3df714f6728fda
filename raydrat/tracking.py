"""MLflow tracking: the embedded default store, run creation, metrics and artifacts.

The default store is an SQLite file in the working directory (``sqlite:///mlruns.db``) with
artifacts in ``mlartifacts/`` beside it; any other URI (an ``mlflow server``) comes from
``tracking.tracking_uri`` or ``$MLFLOW_TRACKING_URI``. The driver creates the run and logs
params and artifacts; the training worker of rank 0 logs metrics into that run by id.
Nothing here runs at import time.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Iterable, Mapping

from raydrat.config import TrackingConfig

DEFAULT_DB = "mlruns.db"
DEFAULT_ARTIFACTS = "mlartifacts"
MAX_PARAM_LEN = 6000


def resolve_tracking_uri(cfg: TrackingConfig, workdir: str | Path | None = None) -> str:
    """The tracking URI to use: config, then ``$MLFLOW_TRACKING_URI``, then the embedded
    SQLite file (made absolute so Ray workers with another cwd write to the same store)."""
    if cfg.tracking_uri:
        return cfg.tracking_uri
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    base = Path(workdir or os.getcwd()).resolve()
    return f"sqlite:///{base / DEFAULT_DB}"


def is_embedded(uri: str) -> bool:
    return uri.startswith("sqlite:")


def ui_command(uri: str) -> str:
    """The exact command that browses this store."""
    if is_embedded(uri):
        db = uri.removeprefix("sqlite:///")
        exe = shutil.which("mlflow") or str(Path(sys.executable).parent / "mlflow")
        return f"{exe} ui --backend-store-uri sqlite:///{db} --port 5000"
    return f"open {uri} in a browser"


def client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def get_or_create_experiment(uri: str, name: str) -> str:
    """Experiment id for ``name``; with the embedded store, artifacts go to
    ``mlartifacts/`` beside the database."""
    c = client(uri)
    exp = c.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    location = None
    if is_embedded(uri):
        db = Path(uri.removeprefix("sqlite:///"))
        location = (db.parent / DEFAULT_ARTIFACTS).resolve().as_uri()
    return c.create_experiment(name, artifact_location=location)


def start_run(
    uri: str,
    experiment: str,
    run_name: str,
    params: Mapping[str, Any] | None = None,
    tags: Mapping[str, str] | None = None,
    parent_run_id: str | None = None,
) -> str:
    """Create a run (nested under ``parent_run_id`` if given) and log its params."""
    c = client(uri)
    exp_id = get_or_create_experiment(uri, experiment)
    all_tags = dict(tags or {})
    if parent_run_id:
        all_tags["mlflow.parentRunId"] = parent_run_id
    run = c.create_run(exp_id, run_name=run_name, tags=all_tags)
    if params:
        log_params(uri, run.info.run_id, params)
    return run.info.run_id


def log_params(uri: str, run_id: str, params: Mapping[str, Any]) -> None:
    from mlflow.entities import Param

    items = [Param(k, _param_value(v)) for k, v in sorted(params.items())]
    c = client(uri)
    for i in range(0, len(items), 100):
        c.log_batch(run_id, params=items[i : i + 100])


def _param_value(value: Any) -> str:
    text = "None" if value is None else str(value)
    return text[:MAX_PARAM_LEN]


def log_metrics(uri: str, run_id: str, metrics: Mapping[str, float], step: int) -> None:
    from mlflow.entities import Metric

    ts = int(time.time() * 1000)
    batch = [Metric(k, float(v), ts, step) for k, v in metrics.items() if v is not None]
    if batch:
        client(uri).log_batch(run_id, metrics=batch)


def log_artifact(uri: str, run_id: str, path: str | Path, artifact_path: str | None = None) -> None:
    client(uri).log_artifact(run_id, str(path), artifact_path)


def log_text(uri: str, run_id: str, text: str, artifact_file: str) -> None:
    client(uri).log_text(run_id, text, artifact_file)


def end_run(uri: str, run_id: str, status: str = "FINISHED") -> None:
    client(uri).set_terminated(run_id, status=status)


def metric_history(uri: str, run_id: str, key: str) -> list[tuple[int, float]]:
    return [(m.step, m.value) for m in client(uri).get_metric_history(run_id, key)]


def plot_curves(
    curves: Mapping[str, Iterable[tuple[int, float]]], out_path: str | Path, title: str
) -> Path:
    """A PNG of several ``(step, value)`` series on one axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for label, points in curves.items():
        pts = sorted(points)
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], label=label, marker="." if len(pts) < 30 else None)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out = Path(out_path)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
