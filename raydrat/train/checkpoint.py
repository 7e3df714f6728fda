"""Checkpoint save/restore through Ray Train checkpoints.

A checkpoint is one directory (Ray Train merges what every rank reports into it):

* ``state.pt`` (rank 0): model, optimizer, step, config, the sync strategy's state (outer
  optimizer and its anchor weights) and whatever the loop passes as ``extra`` (e.g. a
  GradScaler's state under its own key);
* ``rank{r}.pt`` (every rank): that rank's optimizer state (local-update modes keep one
  per worker), its RNG states (torch, CUDA, numpy, python) and its data position (epoch
  and micro-batches consumed in that epoch); the loop adds the IP of the node the rank ran
  on (``node_ip``). On resume the first ``batches`` micro-batches
  of that epoch are read again and discarded, so training continues with the next unseen
  batch (given the same data order, which Ray Data keeps for a single worker and no local
  shuffle).

The scheduler has no state of its own: the learning rate is a function of the step.
"""

from __future__ import annotations

import os
import random
import tempfile
from dataclasses import asdict, dataclass
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

STATE_FILE = "state.pt"
RANK_FILE = "rank{rank}.pt"


@dataclass
class DataPosition:
    """Where this worker is in its data: epoch, and micro-batches consumed in it."""

    epoch: int = 0
    batches: int = 0


def resumable_batches(make_iter, pos: DataPosition):
    """Endless stream of batches from ``make_iter()`` (one call per epoch) that keeps
    ``pos`` current and, when ``pos.batches > 0`` at the start of an epoch, skips that many
    batches first (resuming mid-epoch)."""
    while True:
        skip, yielded = pos.batches, False
        for i, batch in enumerate(make_iter()):
            if i < skip:
                continue
            pos.batches, yielded = i + 1, True
            yield batch
        if not yielded and skip == 0:
            raise RuntimeError("the training data yielded no batch: lower train.batch_size")
        pos.epoch, pos.batches = pos.epoch + 1, 0


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


def rank_state(optimizer, position: DataPosition) -> dict:
    return {"optimizer": optimizer.state_dict(), "rng": rng_state(), "data": asdict(position)}


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The bare model under DDP (and compile) wrappers."""
    while True:
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if inner is None:
            return model
        model = inner


def training_state(model, optimizer, step: int, config: dict, extra: dict | None = None) -> dict:
    return {
        "model": unwrap(model).state_dict(),
        "optimizer": optimizer.state_dict(),
        "step": step,
        "config": config,
        "torch_rng": torch.get_rng_state(),
        **(extra or {}),
    }


@contextmanager
def checkpoint_dir(state: dict | None, rank: int | None = None, per_rank: dict | None = None) -> Iterator[str]:
    """A temporary directory holding ``state`` (rank 0; ``None`` elsewhere) and this rank's
    ``per_rank`` state; remove it after ``ray.train.report``."""
    with tempfile.TemporaryDirectory(prefix="raydrat-ckpt-") as tmp:
        if state is not None:
            torch.save(state, os.path.join(tmp, STATE_FILE))
        if per_rank is not None:
            torch.save(per_rank, os.path.join(tmp, RANK_FILE.format(rank=rank)))
        yield tmp


def newest(restored: "ray.train.Checkpoint | None", on_storage: Path | None) -> "ray.train.Checkpoint | None":
    """The checkpoint to start from: Ray Train's restored one or the newest checkpoint
    directory found on storage, whichever was saved later. Both live in the run's storage
    directory, named ``checkpoint_<timestamp>``, so the later name is the later save."""
    import ray.train

    if on_storage is None:
        return restored
    if restored is None or Path(restored.path).name < on_storage.name:
        return ray.train.Checkpoint(str(on_storage))
    return restored


def load_state(directory: str) -> dict[str, Any]:
    return torch.load(os.path.join(directory, STATE_FILE), map_location="cpu", weights_only=False)


def load_rank_state(directory: str, rank: int) -> dict | None:
    """This rank's state, or ``None`` (a checkpoint from fewer workers, or rank-0 only)."""
    path = os.path.join(directory, RANK_FILE.format(rank=rank))
    if not os.path.exists(path):
        return None
    return torch.load(path, map_location="cpu", weights_only=False)


def restore(model, optimizer, state: dict, rank_state: dict | None = None, strategy=None,
            position: DataPosition | None = None) -> int:
    """Load model and optimizer state (this rank's own when saved), the sync strategy's
    state, RNG states and the data position; return the step to continue from."""
    unwrap(model).load_state_dict(state["model"])
    optimizer.load_state_dict(rank_state["optimizer"] if rank_state else state["optimizer"])
    if strategy is not None and "sync" in state:
        strategy.load_state_dict(state["sync"])
    if rank_state:
        set_rng_state(rank_state["rng"])
        if position is not None:
            position.epoch, position.batches = rank_state["data"]["epoch"], rank_state["data"]["batches"]
    elif "torch_rng" in state:
        torch.set_rng_state(state["torch_rng"])
    return int(state["step"])
