"""What a run shows in MLflow, apart from its metrics: the tags every run carries
(:func:`run_tags`: source, git commit, user and the command line, as MLflow's own fluent
API would set them), the params (:func:`run_params`: only the config sections the run uses,
while ``config.yaml`` holds every key) and the data as dataset inputs
(:func:`data_inputs`). Pure functions of the config, the process and the data's lineage;
:class:`raydrat.tracking.run.Run` writes them.
"""

from __future__ import annotations

import functools
import getpass
import hashlib
import json
import os
import shlex
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from mlflow.entities import Dataset, DatasetInput, InputTag

from raydrat.config.run import RaydratConfig

DATA_CONTEXT_TAG = "mlflow.data.context"


@functools.lru_cache(maxsize=1)
def _git_commit() -> tuple[str, bool] | None:
    """The commit of the checkout raydrat runs from, and whether it has local changes
    (``None`` outside a git checkout)."""
    here = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(
            ["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(here), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return (commit, bool(dirty)) if commit else None


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no passwd entry (some containers)
        return os.environ.get("USER", "unknown")


COMMAND_TAG = "raydrat.command"


def run_tags() -> dict[str, str]:
    """Source, git commit and user tags, as MLflow's own fluent API would set them: the
    entry point that started this process (``raydrat train debug``: the UI shows a source's
    last path part, so paths are shortened to their names; the whole command line is
    ``raydrat.command``), the commit raydrat runs from, the user."""
    argv = list(sys.argv) or ["python"]
    prog = "raydrat" if argv[0].endswith(("raydrat", "raydrat/cli.py")) else Path(argv[0]).name
    words = [Path(a).stem if "/" in a or a.endswith(".yaml") else a for a in argv[1:] if not a.startswith("-")][:2]
    # under `ray job submit` the driver has Ray's job config in its environment
    tags = {
        "mlflow.source.name": " ".join([prog, *words]),
        "mlflow.source.type": "JOB" if os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR") else "LOCAL",
        "mlflow.user": _user(),
        COMMAND_TAG: shlex.join([prog, *argv[1:]])[:5000],
    }
    git = _git_commit()
    if git:
        tags["mlflow.source.git.commit"] = git[0]
        tags["mlflow.source.git.dirty"] = str(git[1]).lower()
    return tags


def run_params(cfg: RaydratConfig, runtime: Any = None) -> dict[str, Any]:
    """The params of a run: the config sections the run uses (``sync`` only with several
    workers, ``slots`` settings only when slots are on, ``recompute.gates`` only when gated,
    no ``tracking``; the rest is in ``config.yaml``) and, given a
    :class:`~raydrat.core.runtime.Runtime`, what it resolved to (``runtime.*``)."""
    flat = cfg.flat()
    drop = ["tracking."]
    if cfg.scaling.max_workers == 1:
        drop.append("sync.")
    if cfg.slots.mode == "all":
        drop += [k for k in flat if k.startswith("slots.") and k != "slots.mode"]
    if cfg.recompute.mode != "gated":
        drop.append("recompute.gates.")
    if cfg.recompute.budget_mb is None:
        drop.append("recompute.budget_mb")
    if cfg.precision.fallback == "none":
        drop += ["precision.fallback_after", "precision.fallback_steps"]
    if not cfg.train.auto_microbatch:
        drop.append("train.min_micro_batch")
    if cfg.data.prepared is None:
        drop += ["data.prepared", "data.prepared_endpoint_url"]
    params = {k: v for k, v in flat.items() if not any(k == d or (d.endswith(".") and k.startswith(d)) for d in drop)}
    if runtime is not None:
        params.update(
            {
                "runtime.device": runtime.device_type,
                "runtime.precision": runtime.precision,
                "runtime.attention_backend": runtime.attention_backend,
            }
        )
    return params


def data_inputs(lineage: Mapping[str, Any], profile: Mapping[str, Any]) -> list[DatasetInput]:
    """The run's data as MLflow dataset inputs, one per split (context ``training`` and
    ``validation``): named after the sources (or the prepared directory), with a digest of
    the lineage (files and sizes, tokenizer hash, split rule, sequence length), the source
    URIs, the block schema and ``profile`` (the data counts)."""
    if lineage.get("kind") == "prepared":
        uris = [str(lineage["prepared"])]
    else:
        uris = [str(s.get("path")) for s in lineage.get("sources", [])]
    name = ",".join(Path(u.rstrip("/")).name or u for u in uris)[:200] or "data"
    digest = hashlib.sha256(json.dumps(lineage, sort_keys=True, default=str).encode()).hexdigest()
    source_type = "s3" if any(u.startswith("s3://") for u in uris) else "local"
    schema = json.dumps(
        {
            "mlflow_colspec": [
                {"name": "tokens", "type": "array", "items": {"type": "integer"}, "required": True},
                {"name": "block_id", "type": "long", "required": True},
            ]
        }
    )
    counts = {k: int(v) if isinstance(v, float) and v.is_integer() else v for k, v in profile.items()}
    out = []
    for split, context in (("train", "training"), ("val", "validation")):
        ds = Dataset(
            name=f"{name}:{split}",
            digest=hashlib.sha256((digest + split).encode()).hexdigest()[:16],
            source_type=source_type,
            source=json.dumps({"uris": uris, "split": split}),
            schema=schema,
            profile=json.dumps(counts, default=str),
        )
        out.append(DatasetInput(ds, [InputTag(DATA_CONTEXT_TAG, context)]))
    return out
