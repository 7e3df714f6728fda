"""Data for replicas that come and go (``sync.engine: torchft``): a replacement resumes the
dead replica's part of the global order from where the replicas last agreed.

Each replica is worker ``r`` of ``W`` in the global order (:mod:`raydrat.core.data.order`);
when ``W`` divides the order's streams, each stream has one reader, so a replica's part is
its own streams and each stream's place is its cursor. At every sync the replicas in the
quorum exchange their streams' cursors (:meth:`StreamTable.encode` / :meth:`StreamTable.record`,
one small all-reduce of ``streams x 10`` integers): the table then holds, for every stream,
its cursor at the last sync its reader took part in. A replacement is healed from a live
peer with the peer's table (:meth:`StreamTable.state` / :meth:`StreamTable.load`) and
:meth:`StreamTable.hand_over` puts its streams back at those cursors, at the world's count
of blocks (so the positions it takes interleave with the survivors' as before).

What a death costs, in blocks: the dead replica's blocks from its last sync to its death are
read again by the replacement (they never reached the shared weights: the dead replica's
local progress since that sync is lost with it), so at most one sync interval of one
replica, ``sync_steps x grad_accum x batch_size`` blocks, is read twice; no block is skipped.
The replacement's streams stay behind the survivors' by that many blocks each: the world's
count ``blocks`` goes on as before, and the lagging streams' cursors (checkpointed like any
other) say where each stream is.
"""

from __future__ import annotations

from dataclasses import astuple, fields

import torch

from raydrat.core.data.errors import DataError
from raydrat.core.data.order import worker_streams
from raydrat.core.data.position import DataPosition, StreamCursor

_FIELDS = len(fields(StreamCursor))


def check_one_reader(stream_count: int, world: int) -> None:
    """Refuse an order whose streams are shared between replicas: a replica's part must be
    its own streams for another to take it over."""
    if stream_count % world:
        raise DataError(
            f"sync.engine=torchft with scaling.num_workers={world} needs the training order's streams ({stream_count}) "
            f"to be a multiple of the workers, so that each replica reads streams of its own: set data.streams to a "
            f"multiple of {world} (at most the corpus's units)"
        )


class StreamTable:
    """Every stream's cursor as of the last sync its reader took part in."""

    def __init__(self, stream_count: int):
        self.stream_count = stream_count
        self.cursors: dict[int, StreamCursor] = {}

    def encode(self, position: DataPosition, rank: int, world: int) -> torch.Tensor:
        """Worker ``rank``'s streams' cursors in ``position`` as a ``(streams, 1 + fields)``
        int64 tensor: row ``c`` is ``(1, *cursor)`` for a stream it reads and holds a cursor
        of, zeros for the others (summed across replicas, every row comes from its one reader)."""
        out = torch.zeros(self.stream_count, 1 + _FIELDS, dtype=torch.int64)
        for c in worker_streams(self.stream_count, rank, world, position.blocks):
            cur = position.streams.get(c)
            if cur is None:
                continue
            out[c, 0] = 1
            out[c, 1:] = torch.tensor(astuple(cur), dtype=torch.int64)
        return out

    def record(self, summed: torch.Tensor) -> None:
        """Take the cursors of the streams some replica in the quorum reported (the sum of
        their :meth:`encode`); the others keep the cursors last agreed."""
        for c in range(self.stream_count):
            if int(summed[c, 0]) == 1:
                self.cursors[c] = StreamCursor(*(int(v) for v in summed[c, 1:].tolist()))

    def hand_over(self, position: DataPosition, rank: int, world: int, blocks: int) -> list[int]:
        """Put worker ``rank``'s streams of ``position`` at their agreed cursors and the world's
        count at ``blocks``; returns the streams handed over (those the table knows)."""
        mine = [c for c in worker_streams(self.stream_count, rank, world, blocks) if c in self.cursors]
        position.blocks = blocks
        position.streams = {c: self.cursors[c] for c in mine} | {
            c: cur for c, cur in position.streams.items() if c not in mine
        }
        return mine

    def state(self) -> dict:
        return {"stream_count": self.stream_count, "cursors": {c: list(astuple(v)) for c, v in self.cursors.items()}}

    def load(self, state: dict) -> None:
        self.stream_count = int(state["stream_count"])
        self.cursors = {int(c): StreamCursor(*v) for c, v in state["cursors"].items()}
