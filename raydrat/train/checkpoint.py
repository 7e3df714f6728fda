"""Checkpoint save/restore through Ray Train checkpoints (a directory with one file)."""

from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from typing import Any, Iterator

import torch

STATE_FILE = "state.pt"


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
def checkpoint_dir(state: dict) -> Iterator[str]:
    """A temporary directory holding ``state``; remove it after ``ray.train.report``."""
    with tempfile.TemporaryDirectory(prefix="raydrat-ckpt-") as tmp:
        torch.save(state, os.path.join(tmp, STATE_FILE))
        yield tmp


def load_state(directory: str) -> dict[str, Any]:
    return torch.load(os.path.join(directory, STATE_FILE), map_location="cpu", weights_only=False)


def restore(model, optimizer, state: dict) -> int:
    """Load model and optimizer state; return the step to continue from."""
    unwrap(model).load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    if "torch_rng" in state:
        torch.set_rng_state(state["torch_rng"])
    return int(state["step"])
