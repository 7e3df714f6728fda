"""What a checkpoint holds, and restoring it: plain files, no Ray.

A checkpoint is one directory (under Ray Train, Ray merges what every rank reports into it):

* ``state.pt`` (rank 0): model, optimizer, step, config, the techniques' state (the sync
  strategy's outer optimizer and anchors, the gates, the slot schedule's RNG, the precision
  policy's GradScaler) and whatever the caller passes as ``extra``;
* ``rank{r}.pt`` (every rank): that rank's optimizer state (local-update modes keep one
  per worker), its RNG states (torch, CUDA, numpy, python), its techniques' state, and what
  the caller adds (the Ray adapter: ``node_ip``, the node the rank ran on);
* ``data-rank{r}.json`` (every rank): the world's data position in the global order
  (:class:`~raydrat.core.data.position.DataPosition`: blocks consumed, and the cursors of
  the streams this rank writes). The ranks' files together hold every stream, so a worker
  group of any size continues from the position exactly (:func:`load_position`).

The scheduler has no state of its own: the learning rate is a function of the step.

A checkpoint counts only when it is complete. Each rank writes its files first and then,
last, ``manifest-rank{r}.json``: the world size, the step, and every file it wrote with its
size and sha256. :func:`verify_checkpoint` accepts a directory only when every rank's
manifest is there and every listed file has its size and checksum, and says why otherwise
(a save cut off by a kill or a signal, a truncated or missing file);
:func:`newest_complete` picks the newest complete one of several and says why the newer
ones were skipped.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch

from raydrat.atomic import write_text
from raydrat.core.data.position import DataPosition, merge
from raydrat.core.techniques.base import unwrap

log = logging.getLogger(__name__)

STATE_FILE = "state.pt"
RANK_FILE = "rank{rank}.pt"
POSITION_FILE = "data-rank{rank}.json"
_POSITION_RE = re.compile(r"data-rank(\d+)\.json$")
MANIFEST_FILE = "manifest-rank{rank}.json"
MANIFEST_FORMAT = 1
_MANIFEST_RE = re.compile(r"manifest-rank(\d+)\.json$")


def resumable_batches(make_iter, pos: DataPosition):
    """Endless stream of batches from ``make_iter()`` (one call per pass) for batches held in
    memory (the benchmarks' data): keeps ``pos.blocks`` current and, when it counts blocks at
    the start, skips that many in memory first. The training stream proper is
    :func:`raydrat.ray_data.stream.train_stream`."""
    skip = pos.blocks
    while True:
        yielded = False
        for batch in make_iter():
            if skip >= len(batch):
                skip -= len(batch)
                continue
            pos.blocks += len(batch)
            yielded = True
            yield batch
        if not yielded and skip == 0:
            raise RuntimeError("the training data yielded no batch: lower train.batch_size")


def rng_state() -> dict:
    out = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        out["cuda"] = torch.cuda.get_rng_state_all()
    return out


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def rank_state(optimizer, techniques: dict | None = None) -> dict:
    """One rank's own state: optimizer (local-update modes keep one per worker), RNG and its
    techniques' state."""
    return {
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "rng": rng_state(),
        "techniques": techniques or {},
    }


def save_position(directory: str | os.PathLike, position: DataPosition, rank: int) -> str:
    """This rank's ``data-rank{r}.json``; returns its name."""
    name = POSITION_FILE.format(rank=rank)
    with open(os.path.join(directory, name), "w") as f:
        json.dump(position.to_json(), f)
    return name


def load_position(directory: str | os.PathLike) -> DataPosition | None:
    """The data position of the checkpoint in ``directory``, merged from every rank's file
    (``None``: a checkpoint from before global positions)."""
    names = sorted(n for n in os.listdir(directory) if _POSITION_RE.match(n))
    if not names:
        return None
    parts = []
    for name in names:
        with open(os.path.join(directory, name)) as f:
            parts.append(json.load(f))
    return merge(parts, str(directory))


def training_state(
    model, optimizer, step: int, config: dict, techniques: dict | None = None, extra: dict | None = None
) -> dict:
    """Rank 0's ``state.pt``: the model (unwrapped: keys never carry wrapper prefixes), the
    optimizer, the step, the config, the techniques' state and ``extra`` (model and
    optimizer ``None``: saved elsewhere, sharded)."""
    return {
        "model": unwrap(model).state_dict() if model is not None else None,
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "step": step,
        "config": config,
        "torch_rng": torch.get_rng_state(),
        "techniques": techniques or {},
        **(extra or {}),
    }


def save_checkpoint(
    directory: str | os.PathLike,
    model,
    optimizer,
    step: int,
    config: dict,
    techniques,
    position: DataPosition,
    rank: int = 0,
    world_size: int = 1,
    rank_extra: dict | None = None,
) -> None:
    """Write this rank's part of a checkpoint into ``directory``: ``state.pt`` on rank 0,
    ``rank{r}.pt`` on every rank (``techniques``: a :class:`~raydrat.core.techniques.bundle.Techniques`;
    ``rank_extra``: more entries for this rank's file), then, last, this rank's manifest
    (:func:`write_manifest`)."""
    os.makedirs(directory, exist_ok=True)
    tech = techniques.state_dict()
    files = [RANK_FILE.format(rank=rank)]
    sharded = getattr(techniques.sync, "sharded", False)
    if sharded:  # FSDP: model and optimizer shards through torch.distributed.checkpoint, every rank
        files += techniques.sync.save_sharded(directory, model, optimizer, rank=rank)
        model = optimizer = None
    if rank == 0:
        state = training_state(model, optimizer, step, config, tech, extra={"sharded": True} if sharded else None)
        torch.save(state, os.path.join(directory, STATE_FILE))
        files.insert(0, STATE_FILE)
    torch.save(
        {**rank_state(optimizer, tech), **(rank_extra or {})},
        os.path.join(directory, RANK_FILE.format(rank=rank)),
    )
    files.append(save_position(directory, position, rank))
    write_manifest(directory, rank, world_size, step, files)


@contextmanager
def temporary_checkpoint(*args, **kwargs) -> Iterator[str]:
    """:func:`save_checkpoint` (same arguments, without the directory) into a temporary
    directory, removed on exit: for a caller that hands the directory on, like
    ``ray.train.report``."""
    with tempfile.TemporaryDirectory(prefix="raydrat-ckpt-") as tmp:
        save_checkpoint(tmp, *args, **kwargs)
        yield tmp


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def write_manifest(directory: str | os.PathLike, rank: int, world_size: int, step: int, files: list[str]) -> str:
    """This rank's ``manifest-rank{r}.json``, written last and atomically (temporary file,
    then rename): the files just written, each with its size and sha256."""
    entries = {}
    for name in files:
        path = os.path.join(directory, name)
        entries[name] = {"size": os.path.getsize(path), "sha256": file_sha256(path)}
    manifest = {"format": MANIFEST_FORMAT, "rank": rank, "world_size": world_size, "step": step, "files": entries}
    final = os.path.join(directory, MANIFEST_FILE.format(rank=rank))
    write_text(final, json.dumps(manifest, indent=1))
    return final


def verify_checkpoint(directory: str | os.PathLike, checksums: bool = True) -> str | None:
    """``None`` when the checkpoint in ``directory`` is complete, else why it is not: no
    manifest, a rank's manifest missing, a listed file missing, of the wrong size or (with
    ``checksums``) of the wrong sha256."""
    directory = str(directory)
    try:
        names = os.listdir(directory)
    except OSError as exc:
        return f"unreadable ({exc.strerror or exc})"
    manifests = {}
    for name in names:
        m = _MANIFEST_RE.match(name)
        if m:
            try:
                with open(os.path.join(directory, name)) as f:
                    manifests[int(m.group(1))] = json.load(f)
            except (OSError, ValueError) as exc:
                return f"{name} is unreadable ({exc})"
    if not manifests:
        return "no manifest: the save was cut off before it finished (or the checkpoint predates checkpoint manifests)"
    world = {m.get("world_size") for m in manifests.values()}
    steps = {m.get("step") for m in manifests.values()}
    if len(world) != 1 or len(steps) != 1:
        return f"the ranks' manifests disagree (world sizes {sorted(world)}, steps {sorted(steps)})"
    (world_size,) = world
    missing = [r for r in range(int(world_size)) if r not in manifests]
    if missing:
        return (
            f"the manifest of rank(s) {', '.join(map(str, missing))} of {world_size} is missing "
            "(that rank's save did not finish)"
        )
    if STATE_FILE not in manifests[0].get("files", {}):
        return f"rank 0's manifest does not list {STATE_FILE}"
    for rank in sorted(manifests):
        for name, want in manifests[rank]["files"].items():
            path = os.path.join(directory, name)
            if not os.path.exists(path):
                return f"{name} (rank {rank}) is missing"
            size = os.path.getsize(path)
            if size != want["size"]:
                return (
                    f"{name} (rank {rank}) is {size} bytes, its manifest says {want['size']} (truncated or rewritten)"
                )
            if checksums and file_sha256(path) != want["sha256"]:
                return f"{name} (rank {rank}) does not match its manifest's sha256 (corrupted)"
    return None


def checkpoint_step(directory: str | os.PathLike) -> int | None:
    """The step of a complete-looking checkpoint, from rank 0's manifest (``None``: none)."""
    try:
        with open(os.path.join(directory, MANIFEST_FILE.format(rank=0))) as f:
            return int(json.load(f)["step"])
    except (OSError, ValueError, KeyError):
        return None


def newest_complete(directories, checksums: bool = True) -> tuple[str | None, list[tuple[str, str]]]:
    """Of ``directories`` (checkpoint directories whose names sort by save time), the
    newest complete one, and ``(directory, reason)`` for each newer one skipped."""
    skipped: list[tuple[str, str]] = []
    for d in sorted({str(d) for d in directories}, key=lambda p: os.path.basename(p), reverse=True):
        reason = verify_checkpoint(d, checksums)
        if reason is None:
            return d, skipped
        skipped.append((d, reason))
    return None, skipped


def load_state(directory: str) -> dict[str, Any]:
    return torch.load(os.path.join(directory, STATE_FILE), map_location="cpu", weights_only=False)


def load_rank_state(directory: str, rank: int) -> dict | None:
    """This rank's state, or ``None`` (a checkpoint from fewer workers, or rank-0 only)."""
    path = os.path.join(directory, RANK_FILE.format(rank=rank))
    if not os.path.exists(path):
        return None
    return torch.load(path, map_location="cpu", weights_only=False)


def restore(
    model,
    optimizer,
    state: dict,
    rank_state: dict | None = None,
    techniques=None,
    position: DataPosition | None = None,
    directory: str | None = None,
) -> int:
    """Load model and optimizer state (this rank's own when saved; a sharded checkpoint's
    from ``directory``, through the sync strategy), the techniques' state (this rank's own
    when saved: gates, slot RNG, precision; the sync strategy's), RNG states and the data
    position; return the step to continue from."""
    if state.get("sharded"):
        if not getattr(getattr(techniques, "sync", None), "sharded", False) or directory is None:
            raise ValueError(
                "this checkpoint holds FSDP shards (sync.mode=fsdp): restore it with "
                "sync.mode=fsdp and the same checkpoint directory"
            )
        techniques.sync.load_sharded(directory, model, optimizer)
    else:
        unwrap(model).load_state_dict(state["model"])
        optimizer.load_state_dict(rank_state["optimizer"] if rank_state else state["optimizer"])
    if techniques is not None:
        techniques.load_state_dict((rank_state or state).get("techniques") or state.get("techniques", {}))
    if rank_state:
        set_rng_state(rank_state["rng"])
    elif "torch_rng" in state:
        torch.set_rng_state(state["torch_rng"])
    if position is not None and directory is not None:
        restore_position(position, directory, rank_state)
    return int(state["step"])


def restore_position(position: DataPosition, directory: str, rank_state: dict | None) -> None:
    """Set ``position`` from the checkpoint in ``directory``. A checkpoint from before global
    positions holds each rank's epoch and micro-batch count in another order: the stream
    starts that epoch again (said in the log)."""
    loaded = load_position(directory)
    if loaded is not None:
        position.blocks, position.streams = loaded.blocks, loaded.streams
        position.stream_count, position.units = loaded.stream_count, loaded.units
        return
    old = (rank_state or {}).get("data") or {}
    epoch = int(old.get("epoch", 0))
    position.blocks, position.streams = 0, {}
    position.start_epoch(epoch)
    log.warning(
        "checkpoint %s predates global data positions: the training data starts epoch %d again (the %d "
        "micro-batches this rank had trained on in it are not skipped)",
        directory,
        epoch,
        int(old.get("batches", 0)),
    )
