"""Streaming DiLoCo's two additions to local updates: the parameters split into fragments
synced at staggered steps (``sync.fragments``), and exchanges that travel in the background
while training goes on, landing ``sync.delay`` steps after they were launched.

Fragment ``k`` of ``F`` is synced at every step ``done`` with ``done % H == (k + 1) H / F % H``
(``H = sync.sync_steps``): each fragment once every ``H`` steps, one fragment every ``H / F``
steps (:func:`fragment_offset`), so the bytes of one step fall by ``F``.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch

from raydrat.core.techniques.base import unwrap


@dataclass
class Fragment:
    """A share of the parameters synced together: views of whole parameters or of row
    ranges of them (``names`` say which, e.g. ``tok_emb.weight[0:1024]``)."""

    index: int
    names: list[str]
    views: list[torch.Tensor]
    anchor: torch.Tensor | None = None
    """fp32 copy of the fragment (flat) at its last sync: the global weights."""
    outer: torch.optim.Optimizer | None = None
    outer_steps: int = 0
    clean_at: int | None = None
    """The step after which this fragment was last brought into agreement with nothing
    local since (a flush at that step can skip it)."""

    @property
    def numel(self) -> int:
        return sum(v.numel() for v in self.views)

    def flat(self) -> torch.Tensor:
        return torch.cat([v.detach().reshape(-1).float() for v in self.views])

    def assign(self, flat: torch.Tensor) -> None:
        offset = 0
        for v in self.views:
            n = v.numel()
            v.copy_(flat[offset : offset + n].view_as(v))
            offset += n


def split_fragments(model: torch.nn.Module, n_fragments: int) -> list[Fragment]:
    """The model's parameters (each tied tensor once) in ``n_fragments`` fragments.

    One fragment: every parameter whole, in ``parameters()`` order. Several (a model with
    a ``layers`` ModuleDict of blocks, like :class:`~raydrat.core.model.transformer.GPT`):
    block ``i`` goes to fragment ``i % F`` (strided, as in Streaming DiLoCo), and every
    tensor outside the blocks (token embedding, final norm, an untied head) is cut into
    ``F`` row chunks, chunk ``k`` to fragment ``k``. Cutting those keeps the fragments
    even: the embedding is 40% of the demo model, more than one fragment's share."""
    bare = unwrap(model)
    seen: set[int] = set()
    named = []
    for name, p in bare.named_parameters():
        if id(p) not in seen:
            seen.add(id(p))
            named.append((name, p))
    if n_fragments == 1:
        return [Fragment(0, [n for n, _ in named], [p.detach() for _, p in named])]
    layers = getattr(bare, "layers", None)
    if not isinstance(layers, torch.nn.ModuleDict) or len(layers) < n_fragments:
        n = len(layers) if isinstance(layers, torch.nn.ModuleDict) else 0
        raise ValueError(
            f"sync.fragments ({n_fragments}) exceeds the model's {n} blocks: lower sync.fragments "
            f"to at most {max(1, n)}"
        )
    block_of = {}
    for key, block in layers.items():
        for p in block.parameters():
            block_of[id(p)] = int(key)
    frags = [Fragment(k, [], []) for k in range(n_fragments)]
    for name, p in named:
        if id(p) in block_of:
            f = frags[block_of[id(p)] % n_fragments]
            f.names.append(name)
            f.views.append(p.detach())
        elif p.dim() >= 1 and p.shape[0] >= n_fragments:
            bounds = [round(p.shape[0] * k / n_fragments) for k in range(n_fragments + 1)]
            for k, f in enumerate(frags):
                f.names.append(f"{name}[{bounds[k]}:{bounds[k + 1]}]")
                f.views.append(p.detach()[bounds[k] : bounds[k + 1]])
        else:
            frags[0].names.append(name)
            frags[0].views.append(p.detach())
    return frags


def fragment_offset(k: int, sync_steps: int, n_fragments: int) -> int:
    """Fragment ``k`` is synced (its result applied) at steps ``done % sync_steps == offset``."""
    return ((k + 1) * (sync_steps // n_fragments)) % sync_steps


@dataclass
class Pending:
    """A fragment's exchange in flight on the background thread."""

    fragment: Fragment
    future: Future
    due: int
    """The step after which its result is applied."""
    launched: torch.Tensor
    """The fragment's weights when the exchange was launched."""


class DelayedExchanges:
    """Exchanges running one at a time on a background thread, overlapped with the steps
    that follow their launch; each lands at its due step (or at a flush)."""

    def __init__(self):
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="raydrat-sync")
        self.pending: list[Pending] = []

    def launch(
        self, fragment: Fragment, launched: torch.Tensor, exchange: Callable[[], torch.Tensor], due: int
    ) -> None:
        """Start ``exchange()`` (it returns the mean pseudo-gradient) in the background."""
        self.pending.append(Pending(fragment, self._executor.submit(exchange), due, launched))

    def landing(self, done: int | None = None) -> list[Pending]:
        """Take out the exchanges due at step ``done`` (``None``: all of them, a flush); the
        caller waits for each one's ``future``."""
        due: list[Pending] = []
        keep: list[Pending] = []
        for p in self.pending:
            (due if done is None or p.due == done else keep).append(p)
        self.pending = keep
        return due
