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
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from raydrat.config import ConfigError, RaydratConfig, flatten
from raydrat.core.state import RANK_FILE

RUN_FILE = "raydrat_run.json"

# Settings that may differ between an interrupted run and its resumption: they change how
# the run is hosted, logged or retried, not what it computes.
RESUMABLE_CHANGES = (
    "tracking.",
    "train.max_failures",
    "train.log_every",
    "train.storage_path",
    "data.demo_dir",
    "scaling.cpus_per_worker",
    "scaling.wait_for_resources",
    "scaling.worker_resources",
    "sync.latency_s",
)


class ResumeError(ConfigError):
    """``--resume`` cannot continue the run (no run, no checkpoint, changed config)."""


def storage_root(cfg: RaydratConfig) -> Path:
    return Path(cfg.train.storage_path).resolve()


def write_run_record(cfg: RaydratConfig, run_name: str, tracking_uri: str | None, run_id: str | None) -> Path:
    d = storage_root(cfg) / run_name
    d.mkdir(parents=True, exist_ok=True)
    record = {
        "run_name": run_name,
        "tracking_uri": tracking_uri,
        "mlflow_run_id": run_id,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "config": cfg.to_dict(),
    }
    path = d / RUN_FILE
    path.write_text(json.dumps(record, indent=2) + "\n")
    return path


def read_run_record(run_dir: Path) -> dict[str, Any]:
    return json.loads((run_dir / RUN_FILE).read_text())


def latest_checkpoint(run_dir: Path, since: float = 0.0, world_size: int | None = None) -> Path | None:
    """The run's newest checkpoint directory holding the model state (saved at or after the
    wall-clock time ``since``) and, given ``world_size``, every rank's file (a worker killed
    during a save can leave a directory without its own), or None."""
    ckpts = sorted(p.parent for p in run_dir.glob("checkpoint_*/state.pt") if p.stat().st_mtime >= since)
    if world_size is not None:
        ckpts = [d for d in ckpts if all((d / RANK_FILE.format(rank=r)).exists() for r in range(world_size))]
    return ckpts[-1] if ckpts else None


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
    """``key: saved -> now`` for every setting that differs and matters."""
    old, new = flatten(saved), cfg.flat()
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
    if latest_checkpoint(run_dir) is None:
        raise ResumeError(
            f"--resume {record['run_name']}: no checkpoint in {run_dir} (the run stopped before "
            "its first checkpoint): start it again without --resume, or set "
            "train.checkpoint_every to save earlier"
        )
    return record
