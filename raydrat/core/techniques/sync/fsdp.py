"""FSDP (``sync.mode: fsdp``): PyTorch's ``fully_shard`` (FSDP2) on every transformer
block and on the root, applied from outside like the other techniques, in the sync slot of
the one order (recompute, compile, then sync or FSDP).

Each worker keeps only its shard (``1 / W`` of dim 0) of every parameter, gradient and
optimizer state; a block's full parameters are all-gathered just before its forward (and
again for its backward), and its gradients are reduce-scattered (averaged) right after its
backward. The model's parameter names, and so its ``state_dict`` keys, do not change
(``fully_shard`` swaps the parameters for DTensors in place and changes no module path).

Checkpoints: the model's and the optimizer's sharded state go through
``torch.distributed.checkpoint`` (DCP) into ``dcp/`` inside the checkpoint directory, each
rank writing its own shard file (``__<rank>_0.distcp``) and rank 0 the ``.metadata``; the
state dicts are those of ``torch.distributed.checkpoint.state_dict`` (full parameter names,
the optimizer keyed by them), so DCP can also load onto another number of workers.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from contextlib import AbstractContextManager

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import DTensor

from raydrat.core.techniques.base import unwrap
from raydrat.core.techniques.sync.strategy import SyncStrategy

DCP_DIR = "dcp"
"""Subdirectory of a checkpoint holding the DCP shards of model and optimizer."""


class FSDPStrategy(SyncStrategy):
    """``fully_shard`` per block of ``model.layers``, then on the model (the root group:
    embedding, final norm, head). Gradients are reduce-scattered every optimizer step
    (with ``train.grad_accum``, only after the last micro-batch)."""

    mode = "fsdp"
    sharded = True

    def apply(self, model: torch.nn.Module) -> torch.nn.Module:
        bare = unwrap(model)
        layers = getattr(bare, "layers", None)
        if not isinstance(layers, torch.nn.ModuleDict):
            raise ValueError(
                "sync.mode=fsdp shards per transformer block: the model needs a `layers` "
                "ModuleDict (raydrat's GPT has one)"
            )
        for block in layers.values():
            fully_shard(block)
        fully_shard(bare)
        self.model = model
        return model

    def metrics(self) -> dict[str, float]:
        return {}  # FSDP's collectives run inside fully_shard: not counted here

    def no_sync(self) -> AbstractContextManager:
        return _no_gradient_sync(unwrap(self.model))

    def save_sharded(
        self, directory: str, model: torch.nn.Module, optimizer: torch.optim.Optimizer, rank: int = 0
    ) -> list[str]:
        """Every rank: its shards of model and optimizer into ``directory/dcp`` (a collective).
        Returns the files this rank is answerable for, relative to ``directory`` (its shard
        files; on rank 0 also DCP's ``.metadata``, written once every rank's shards are), for
        the rank's manifest."""
        bare = unwrap(model)
        state = {"model": get_model_state_dict(bare), "optimizer": get_optimizer_state_dict(bare, optimizer)}
        where = os.path.join(directory, DCP_DIR)
        dcp.save(state, checkpoint_id=where)
        mine = sorted(n for n in os.listdir(where) if n.startswith(f"__{rank}_") and n.endswith(".distcp"))
        if rank == 0 and os.path.exists(os.path.join(where, ".metadata")):
            mine.append(".metadata")
        return [os.path.join(DCP_DIR, n) for n in mine]

    def load_sharded(self, directory: str, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """Every rank: load its shards from ``directory/dcp`` (saved by :meth:`save_sharded`)."""
        bare = unwrap(model)
        state = {"model": get_model_state_dict(bare), "optimizer": get_optimizer_state_dict(bare, optimizer)}
        dcp.load(state, checkpoint_id=os.path.join(directory, DCP_DIR))
        set_model_state_dict(bare, state["model"])
        set_optimizer_state_dict(bare, optimizer, state["optimizer"])


def load_full_model(directory: str, model: torch.nn.Module) -> None:
    """One process, no process group: the whole model from a checkpoint's DCP shards
    (:meth:`FSDPStrategy.save_sharded`), resharded into ``model``'s plain tensors (what an
    MLflow model or an export needs)."""
    state = {"model": model.state_dict()}
    dcp.load(state, checkpoint_id=os.path.join(directory, DCP_DIR), no_dist=True)
    model.load_state_dict(state["model"])


@contextlib.contextmanager
def _no_gradient_sync(model: torch.nn.Module) -> Iterator[None]:
    """Accumulate gradients unsharded, without reduce-scattering (micro-batches before the last)."""
    if not isinstance(model, FSDPModule):
        yield
        return
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


def local_bytes(tensors) -> int:
    """Bytes this worker holds for ``tensors`` (a DTensor's local shard only)."""
    total = 0
    for t in tensors:
        if t is None:
            continue
        local = t.to_local() if isinstance(t, DTensor) else t
        total += local.numel() * local.element_size()
    return total


def worker_state_bytes(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, int]:
    """What this worker holds of parameters, gradients and optimizer state, in bytes."""
    params = list({id(p): p for p in model.parameters()}.values())
    states = [v for p in params for v in optimizer.state.get(p, {}).values() if torch.is_tensor(v)]
    return {
        "params": local_bytes(params),
        "grads": local_bytes(p.grad for p in params),
        "optimizer": local_bytes(states),
    }


__all__ = ["DCP_DIR", "FSDPStrategy", "local_bytes", "worker_state_bytes"]
