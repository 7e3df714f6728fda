"""``raydrat tracking sync RUN``: deliver what a run kept while its MLflow store was away.

RUN is a run's backlog folder (the path the warning printed), its run directory, or its
name under ``--storage``. The backlog says which store and run its records belong to
(``store.json``, the URI without its password: a masked password is given again with
``--tracking-uri`` or ``$MLFLOW_TRACKING_URI``). Delivering it is :meth:`Run.settle`: the
records of the processes that are gone, each once, the final status last, and ``KILLED``
for a run whose driver died while it was ``RUNNING``.
"""

from __future__ import annotations

import os
from pathlib import Path

import raydrat.tracking.journal as J
from raydrat.config import ConfigError
from raydrat.redact import MASK, redact_uri, remember_uri
from raydrat.tracking.delivery import TrackingUnavailable
from raydrat.tracking.run import Run


def find_backlog(target: str, storage: str | Path) -> Path | None:
    """The backlog folder ``target`` names (the folder itself, a run directory, or a run
    name under ``storage``); ``None`` for a run directory that keeps nothing. Raises
    :class:`ConfigError` when ``target`` is none of these."""
    given = Path(target)
    run_dirs = [given, Path(storage) / target]
    for folder in (given, *(J.backlog_in(d) for d in run_dirs)):
        if (folder / J.STORE_FILE).is_file():
            return folder
    if any(d.is_dir() for d in run_dirs):
        return None
    raise ConfigError(
        f"raydrat tracking sync {target}: no run there: give the backlog folder a warning named, a run "
        f"directory, or a run name under --storage (now {storage})"
    )


def store_uri(recorded: str, given: str | None) -> str:
    """The URI to deliver to: the recorded one, or ``given`` (``--tracking-uri``, else
    ``$MLFLOW_TRACKING_URI``) when the recorded one's password is masked and ``given``
    names the same server and user."""
    if MASK not in recorded:
        return recorded
    given = given or os.environ.get("MLFLOW_TRACKING_URI")
    if given and redact_uri(given) == recorded:
        remember_uri(given)
        return given
    raise ConfigError(
        f"the backlog is for MLflow at {recorded}, whose password is not kept: give that URI with its "
        "password with --tracking-uri or MLFLOW_TRACKING_URI"
    )


def sync(target: str, storage: str | Path, given_uri: str | None = None) -> list[str]:
    """Deliver the backlog of run ``target``; lines saying what was done."""
    folder = find_backlog(target, storage)
    if folder is None:
        return [f"{target}: nothing waits for MLflow"]
    meta = J.describe(folder)
    run = Run.attach(store_uri(meta["tracking_uri"], given_uri), meta["run_id"], folder)
    try:
        lines = run.settle()
    except TrackingUnavailable as exc:
        raise TrackingUnavailable(f"{exc}: the backlog stays in {folder}; run this again once it answers") from None
    return lines or [f"MLflow run {run.run_id}: nothing left to deliver in {folder}"]
