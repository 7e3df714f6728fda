"""What a checkpoint holds, and restoring it: plain files, no Ray.

A checkpoint is one directory (under Ray Train, Ray merges what every rank reports into it):

* ``state.pt`` (rank 0): model, optimizer, step, config, the techniques' state (the sync
  strategy's outer optimizer and anchors, the gates, the slot schedule's RNG, the precision
  policy's GradScaler) and whatever the caller passes as ``extra``;
* ``rank{r}.pt`` (every rank): that rank's optimizer state (local-update modes keep one
  per worker), its RNG states (torch, CUDA, numpy, python) and its data position (epoch
  and micro-batches consumed in that epoch), its techniques' state, and what the caller
  adds (the Ray adapter: ``node_ip``, the node the rank ran on). On resume the first
  ``batches`` micro-batches of that epoch are read again and discarded, so training
  continues with the next unseen batch (given the same data order: ``data.preserve_order``).

The scheduler has no state of its own: the learning rate is a function of the step.
"""

from __future__ import annotations

import os
import random
import tempfile
from dataclasses import asdict, dataclass
from contextlib import contextmanager
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


def rank_state(optimizer, position: DataPosition, techniques: dict | None = None) -> dict:
    """One rank's own state: optimizer (local-update modes keep one per worker), RNG, data
    position and its techniques' state."""
    return {"optimizer": optimizer.state_dict(), "rng": rng_state(), "data": asdict(position),
            "techniques": techniques or {}}


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The bare model under DDP (and compile) wrappers."""
    while True:
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if inner is None:
            return model
        model = inner


def training_state(model, optimizer, step: int, config: dict, techniques: dict | None = None,
                   extra: dict | None = None) -> dict:
    """Rank 0's ``state.pt``: the model (unwrapped: keys never carry wrapper prefixes), the
    optimizer, the step, the config, the techniques' state and ``extra``."""
    return {
        "model": unwrap(model).state_dict(),
        "optimizer": optimizer.state_dict(),
        "step": step,
        "config": config,
        "torch_rng": torch.get_rng_state(),
        "techniques": techniques or {},
        **(extra or {}),
    }


def save_checkpoint(directory: str | os.PathLike, model, optimizer, step: int, config: dict,
                    techniques, position: DataPosition, rank: int = 0, rank_extra: dict | None = None) -> None:
    """Write this rank's part of a checkpoint into ``directory``: ``state.pt`` on rank 0,
    ``rank{r}.pt`` on every rank (``techniques``: a :class:`~raydrat.core.techniques.bundle.Techniques`;
    ``rank_extra``: more entries for this rank's file)."""
    os.makedirs(directory, exist_ok=True)
    tech = techniques.state_dict()
    if rank == 0:
        torch.save(training_state(model, optimizer, step, config, tech), os.path.join(directory, STATE_FILE))
    torch.save({**rank_state(optimizer, position, tech), **(rank_extra or {})},
               os.path.join(directory, RANK_FILE.format(rank=rank)))


@contextmanager
def temporary_checkpoint(*args, **kwargs) -> Iterator[str]:
    """:func:`save_checkpoint` (same arguments, without the directory) into a temporary
    directory, removed on exit: for a caller that hands the directory on, like
    ``ray.train.report``."""
    with tempfile.TemporaryDirectory(prefix="raydrat-ckpt-") as tmp:
        save_checkpoint(tmp, *args, **kwargs)
        yield tmp


def load_state(directory: str) -> dict[str, Any]:
    return torch.load(os.path.join(directory, STATE_FILE), map_location="cpu", weights_only=False)


def load_rank_state(directory: str, rank: int) -> dict | None:
    """This rank's state, or ``None`` (a checkpoint from fewer workers, or rank-0 only)."""
    path = os.path.join(directory, RANK_FILE.format(rank=rank))
    if not os.path.exists(path):
        return None
    return torch.load(path, map_location="cpu", weights_only=False)


def restore(model, optimizer, state: dict, rank_state: dict | None = None, techniques=None,
            position: DataPosition | None = None) -> int:
    """Load model and optimizer state (this rank's own when saved), the techniques' state
    (this rank's own when saved: gates, slot RNG, precision; the sync strategy's), RNG
    states and the data position; return the step to continue from."""
    unwrap(model).load_state_dict(state["model"])
    optimizer.load_state_dict(rank_state["optimizer"] if rank_state else state["optimizer"])
    if techniques is not None:
        techniques.load_state_dict((rank_state or state).get("techniques") or state.get("techniques", {}))
    if rank_state:
        set_rng_state(rank_state["rng"])
        if position is not None:
            position.epoch, position.batches = rank_state["data"]["epoch"], rank_state["data"]["batches"]
    elif "torch_rng" in state:
        torch.set_rng_state(state["torch_rng"])
    return int(state["step"])
