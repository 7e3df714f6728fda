"""MLflow tracking: where runs are stored, what a run shows, and the :class:`Run` handle
through which raydrat writes every metric, param, tag and artifact.

* :mod:`raydrat.tracking.store`: the tracking URI (the embedded SQLite store by default),
  how to browse it, one client per store, experiments and artifact locations;
* :mod:`raydrat.tracking.views`: the view of an experiment the UI links open on;
* :mod:`raydrat.tracking.content`: a run's tags, params and dataset inputs;
* :mod:`raydrat.tracking.run`: :class:`Run`, the only writer (``Run.off()`` when tracking
  is off), which redacts every text it writes and never waits on the store;
* :mod:`raydrat.tracking.writer`: a run's records delivered from a thread of their own, kept
  on disk while the store is unreachable;
* :mod:`raydrat.tracking.journal`: that backlog on disk;
* :mod:`raydrat.tracking.delivery`: the MLflow calls each record becomes, and the delivery
  of a backlog a process left behind.

The driver creates the run and logs params and artifacts; the training worker of rank 0
logs metrics into that run by id. Nothing here runs at import time (apart from the hook
that gives a writer's pending records a last few seconds at exit).
"""

from raydrat.tracking.content import COMMAND_TAG, data_inputs, run_params, run_tags
from raydrat.tracking.delivery import TrackingUnavailable
from raydrat.tracking.journal import BACKLOG_DIR, backlog_in
from raydrat.tracking.run import PARENT_TAG, Run
from raydrat.tracking.store import (
    artifact_repo,
    is_embedded,
    resolve_tracking_uri,
    store_dir,
    ui_command,
    ui_run_url,
    ui_url,
)

__all__ = [
    "BACKLOG_DIR",
    "COMMAND_TAG",
    "PARENT_TAG",
    "Run",
    "TrackingUnavailable",
    "artifact_repo",
    "backlog_in",
    "data_inputs",
    "is_embedded",
    "resolve_tracking_uri",
    "run_params",
    "run_tags",
    "store_dir",
    "ui_command",
    "ui_run_url",
    "ui_url",
]
