"""Resuming an interrupted run.

Every run's directory in Ray Train storage (``train.storage_path / <run name>``) holds a
``raydrat_run.json`` written by the driver: the run name, the MLflow tracking URI and run
id, and the config. ``raydrat train CONFIG --resume [RUN]`` finds that record (the named
run, else the newest run of the same ``name``), checks that the config is compatible and
that a checkpoint exists, and then starts a ``TorchTrainer`` with the same
``RunConfig(name, storage_path)``: Ray Train restores its checkpoint manager from storage
and the workers start from the latest checkpoint (the newer of Ray Train's record and the
latest checkpoint directory, which Ray Train may not have recorded when the run was killed
right after a save), and metrics go on into the same MLflow run.
Nothing is written before these checks pass.

A run name is used once: a new run whose name already has checkpoints there is refused
(resume it, or pick another name), and default names carry a random suffix. One driver at a
time writes into a run's directory (:func:`claim`: a lock held while it runs,
:mod:`raydrat.ray_train.run_lock`): a second start with the same name, or a second
``--resume`` of a running run, is refused at once. The record says how the run ended
(``state``: ``running``, ``finished``, ``failed``, ``interrupted``): a finished run is not
resumed (start a new one from its weights with ``model.init_from``), and a ``running``
record whose lock is free belongs to a driver that was killed. A checkpoint
counts only when complete (:func:`raydrat.core.checkpoint.state.verify_checkpoint`): resume takes the
newest complete one and says why newer ones were skipped. The record holds no secret: the
tracking URI's password is masked (``user:***@host``) and must be given again on resume
(``tracking.tracking_uri`` or ``$MLFLOW_TRACKING_URI``).
"""

from __future__ import annotations

import contextlib
import json
import re
import secrets
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from raydrat.atomic import write_text
from raydrat.config import ConfigError, RaydratConfig, flatten, upgrade_flat
from raydrat.core.checkpoint.state import checkpoint_step, newest_complete, verify_checkpoint
from raydrat.ray_train.run_lock import RunFolderBusy, RunLock, acquire, driver
from raydrat.redact import MASK, redact_obj, redact_uri

RUN_FILE = "raydrat_run.json"
CHECKPOINT_GLOB = "checkpoint_*"
RAY_SNAPSHOT = "checkpoint_manager_snapshot.json"
"""Ray Train's record of the checkpoints it registered (it refuses to restore if one is gone)."""

# Settings that may differ between an interrupted run and its resumption: they change how
# the run is hosted, logged or retried, not what it computes (the worker count changes the
# global batch, never the order of the training data: docs/data.md).
RESUMABLE_CHANGES = (
    "tracking.",
    "train.max_failures",
    "train.log_every",
    "train.storage_path",
    "data.demo_dir",
    "scaling.cpus_per_worker",
    "scaling.num_workers",
    "scaling.wait_for_resources",
)


class ResumeError(ConfigError):
    """``--resume`` cannot continue the run (no run, no checkpoint, changed config)."""


def storage_root(cfg: RaydratConfig) -> Path:
    return Path(cfg.train.storage_path).resolve()


def new_run_name(cfg: RaydratConfig) -> str:
    """The name of a new run: ``tracking.run_name``, else the config's name, the time and a
    random suffix (two runs started in the same second never share one). A name whose run
    directory under ``train.storage_path`` holds checkpoints (or Ray Train's record of
    them) is refused: a new run never starts from another run's checkpoints. (A run that
    stopped before its first checkpoint left nothing to continue: its name may be reused.)"""
    name = cfg.tracking.run_name or f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"
    _check_unused(storage_root(cfg) / name)
    return name


def _check_unused(d: Path) -> None:
    if checkpoint_dirs(d) or (d / RAY_SNAPSHOT).exists():
        raise ResumeError(
            f"run name {d.name!r} is already used by the run in {d}: continue that run with "
            f"`--resume {d.name}`, or pick another name (--set tracking.run_name=NEW_NAME, or leave "
            "tracking.run_name unset for a fresh default name)"
        )


@contextlib.contextmanager
def claim(cfg: RaydratConfig, run_name: str, new: bool) -> Iterator[RunLock]:
    """Hold the run's directory for this driver while inside (see
    :mod:`raydrat.ray_train.run_lock`); a ``new`` run's name is checked again under the lock.
    Leaving with an error before anything was written removes the directory it made."""
    d = storage_root(cfg) / run_name
    try:
        lock = acquire(d)
    except RunFolderBusy as busy:
        raise ResumeError(
            f"run {run_name!r} is in use: {busy.holder} is writing to {d}; pick another name "
            f"(--set tracking.run_name=NEW_NAME), or once that run stops continue it with `--resume {run_name}`"
        ) from None
    ok = False
    try:
        if new:
            _check_unused(d)
        yield lock
        ok = True
    finally:
        lock.release(keep=ok)


def write_run_record(cfg: RaydratConfig, run_name: str, tracking_uri: str | None, run_id: str | None) -> Path:
    d = storage_root(cfg) / run_name
    d.mkdir(parents=True, exist_ok=True)
    record = {
        "run_name": run_name,
        "tracking_uri": redact_uri(tracking_uri),
        "mlflow_run_id": run_id,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "state": "running",
        "driver": driver(),
        "config": redact_obj(cfg.to_dict()),
    }
    return _write_record(d, record)


def _write_record(run_dir: Path, record: dict[str, Any]) -> Path:
    """The record, replaced whole (a temporary file, then a rename)."""
    path = run_dir / RUN_FILE
    write_text(path, json.dumps(record, indent=2) + "\n")
    return path


def mark_run(run_dir: Path, state: str) -> None:
    """Record how the run's driver left it: ``running`` (with this driver), ``finished``,
    ``failed`` or ``interrupted``."""
    record = read_run_record(run_dir)
    record["state"] = state
    if state == "running":
        record["driver"] = driver()
    else:
        record["ended"] = time.strftime("%Y-%m-%dT%H:%M:%S")
    _write_record(run_dir, record)


def read_run_record(run_dir: Path) -> dict[str, Any]:
    return json.loads((run_dir / RUN_FILE).read_text())


def checkpoint_dirs(run_dir: Path | None, since: float = 0.0) -> list[Path]:
    """The run's checkpoint directories written at or after the wall-clock time ``since``."""
    if run_dir is None or not run_dir.is_dir():
        return []
    return sorted(p for p in run_dir.glob(CHECKPOINT_GLOB) if p.is_dir() and p.stat().st_mtime >= since)


def choose_checkpoint(
    run_dir: Path | None, since: float = 0.0, also: tuple = ()
) -> tuple[Path | None, list[tuple[str, str]]]:
    """The newest complete checkpoint among the run's (since ``since``) and ``also`` (e.g.
    Ray Train's restored one), and ``(directory, reason)`` for each newer one skipped."""
    chosen, skipped = newest_complete([*checkpoint_dirs(run_dir, since), *also])
    return (Path(chosen) if chosen else None), skipped


def latest_checkpoint(run_dir: Path, since: float = 0.0) -> Path | None:
    """The run's newest complete checkpoint directory (saved at or after ``since``), or None."""
    return choose_checkpoint(run_dir, since)[0]


def describe_choice(chosen: Path | str | None, skipped: list[tuple[str, str]]) -> str:
    """``checkpoint_X (step N)``, plus why each newer checkpoint was skipped."""
    text = f"{Path(chosen).name} (step {checkpoint_step(chosen)})" if chosen else "no complete checkpoint"
    if skipped:
        text += "; skipped " + "; ".join(f"{Path(d).name}: {why}" for d, why in skipped)
    return text


def prune_incomplete(run_dir: Path) -> list[str]:
    """Remove the run's incomplete checkpoint directories (saves cut off by an interrupt),
    never one Ray Train registered (its snapshot names it) and never the newest complete
    one. Returns the names removed. Call it only once the workers are stopped."""
    snapshot = run_dir / RAY_SNAPSHOT
    registered = set(re.findall(r"checkpoint_[0-9][0-9_.\-]*", snapshot.read_text())) if snapshot.exists() else set()
    removed = []
    for d in checkpoint_dirs(run_dir):
        if d.name not in registered and verify_checkpoint(d) is not None:
            shutil.rmtree(d, ignore_errors=True)
            removed.append(d.name)
    return removed


def tracking_uri_for(record: dict[str, Any], current_uri: str | None) -> str | None:
    """The URI to reopen the run's MLflow run with: the recorded one, or (when its password
    was masked) ``current_uri`` if it names the same server and user."""
    recorded = record.get("tracking_uri")
    if not recorded or MASK not in recorded:
        return recorded
    if current_uri and redact_uri(current_uri) == recorded:
        return current_uri
    raise ResumeError(
        f"--resume {record['run_name']}: the run is tracked at {recorded}, whose password is not "
        "recorded: set tracking.tracking_uri or MLFLOW_TRACKING_URI to that URI with its password"
    )


def find_run(cfg: RaydratConfig, which: str | bool) -> Path:
    """The run directory to resume: ``which`` names a run, else the newest run of
    ``cfg.name`` (by its record's creation time)."""
    root = storage_root(cfg)
    records = sorted(root.glob(f"*/{RUN_FILE}"), key=lambda p: p.stat().st_mtime) if root.exists() else []
    if isinstance(which, str):
        d = root / which
        if not (d / RUN_FILE).exists():
            names = ", ".join(p.parent.name for p in records) or "none"
            raise ResumeError(f"--resume {which}: no raydrat run of that name in {root} (runs there: {names})")
        return d
    mine = [p for p in records if json.loads(p.read_text()).get("config", {}).get("name") == cfg.name]
    if not mine:
        raise ResumeError(
            f"--resume: no run of config name {cfg.name!r} in train.storage_path={root}: "
            "start it without --resume, or point train.storage_path at the run's storage"
        )
    return mine[-1].parent


def config_differences(saved: dict[str, Any], cfg: RaydratConfig) -> list[str]:
    """``key: saved -> now`` for every setting that differs and matters (a record written
    before keys were renamed is read in today's keys)."""
    old, new = upgrade_flat(flatten(saved)), flatten(redact_obj(cfg.to_dict()))
    out = []
    for key in sorted(set(old) | set(new)):
        if key.startswith(RESUMABLE_CHANGES):
            continue
        if old.get(key, "<absent>") != new.get(key, "<absent>"):
            out.append(f"{key}: {old.get(key, '<absent>')!r} -> {new.get(key, '<absent>')!r}")
    return out


def prepare_resume(cfg: RaydratConfig, which: str | bool) -> dict[str, Any]:
    """Check that the run can be resumed; return its record (run name, MLflow ids)."""
    run_dir = find_run(cfg, which)
    record = read_run_record(run_dir)
    diffs = config_differences(record["config"], cfg)
    if diffs:
        raise ResumeError(
            f"--resume {record['run_name']}: the config differs from the interrupted run in "
            f"{len(diffs)} setting(s): {'; '.join(diffs)}. Use the run's config (saved in "
            f"{run_dir / RUN_FILE}) or start a new run without --resume"
        )
    _refuse_finished(record, run_dir)
    chosen, skipped = choose_checkpoint(run_dir)
    if chosen is None:
        why = f" ({describe_choice(None, skipped).split('; ', 1)[1]})" if skipped else ""
        raise ResumeError(
            f"--resume {record['run_name']}: no complete checkpoint in {run_dir}{why} (the run "
            "stopped before its first checkpoint was complete): start it again without --resume, "
            "or set train.checkpoint_every to save earlier"
        )
    record["checkpoint"] = describe_choice(chosen, skipped)
    return record


def _refuse_finished(record: dict[str, Any], run_dir: Path) -> None:
    if record.get("state") != "finished":
        return
    steps = record.get("config", {}).get("train", {}).get("steps")
    raise ResumeError(
        f"--resume {record['run_name']}: the run finished (all {steps} steps, {record.get('ended', 'at its end')}): "
        f"there is nothing to resume. To train it further, start a new run from its weights: "
        f"--set model.init_from={run_dir} (with the train.steps you want), without --resume"
    )


def previous_driver(record: dict[str, Any]) -> str | None:
    """The driver a resumed run's record still calls running (it was killed: the lock was
    free), or None."""
    return record.get("driver") if record.get("state") == "running" else None
