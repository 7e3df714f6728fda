"""The data hand-over between replicas (sync.engine: torchft), on block identities and
without Ray: two replicas read their parts of the global order and agree on their streams'
cursors at every sync; one dies between syncs; its replacement, healed at a later sync with
a survivor's table, reads the dead replica's streams from the last agreed cursors. Every
stream's committed blocks are then its own prefix, in order, with nothing skipped, and what
was read twice is exactly what the dead replica read after its last sync."""

from __future__ import annotations

from collections import defaultdict

import pytest
import torch
from test_data_order import SEED, corpus, make_source  # noqa: F401 (corpus: the fixture)

from raydrat.core.data.errors import DataError
from raydrat.core.data.handover import StreamTable, check_one_reader
from raydrat.core.data.position import DataPosition
from raydrat.core.data.stream import WorkerBlocks

BATCH, H, WORLD = 2, 2, 2
DIES_AFTER, REJOINS_AT, END = 5, 8, 14
"""Replica 1 dies after step 5 (its last sync was step 4); its replacement joins at the sync
of step 8; the run ends at step 14."""


class Replica:
    """One replica's reader, keeping its position as the training stream does."""

    def __init__(self, source, rank: int, position: DataPosition):
        self.rank, self.position = rank, position
        self.blocks = WorkerBlocks(source, SEED, position, rank, WORLD, BATCH)
        self.read: list[tuple[int, int, int]] = []  # (stream, block id, epoch)

    def step(self, stream_count: int) -> None:
        mb = next(self.blocks)
        self.position.blocks, self.position.streams = mb.position.blocks, mb.position.streams
        self.position.stream_count, self.position.units = mb.position.stream_count, mb.position.units
        self.read += [(p % stream_count, i, e) for p, i, e in zip(mb.positions, mb.ids, mb.epochs, strict=True)]


def _sync(table: StreamTable, alive: list[Replica]) -> None:
    table.record(sum(table.encode(r.position, r.rank, WORLD) for r in alive))


def test_a_replacement_reads_the_dead_replicas_streams_from_the_last_agreed_cursors(corpus):  # noqa: F811
    source = make_source(corpus, shuffle_buffer=4)
    S = source.stream_count
    assert S % WORLD == 0
    # every stream's blocks in order: stream c holds the global positions c, c + S, ...
    walk = WorkerBlocks(source, SEED, DataPosition(), 0, 1, S)
    order = defaultdict(list)
    for _ in range(40):
        mb = next(walk)
        for p, i, e in zip(mb.positions, mb.ids, mb.epochs, strict=True):
            order[p % S].append((int(i), int(e)))

    tables = [StreamTable(S), StreamTable(S)]  # each replica's own copy
    survivor, dead = Replica(source, 0, DataPosition()), Replica(source, 1, DataPosition())
    committed_dead = 0
    for step in range(1, DIES_AFTER + 1):
        survivor.step(S)
        dead.step(S)
        if step % H == 0:
            for t in tables:
                _sync(t, [survivor, dead])
            committed_dead = len(dead.read)
    for step in range(DIES_AFTER + 1, REJOINS_AT + 1):
        survivor.step(S)
        if step % H == 0:
            _sync(tables[0], [survivor])

    # the replacement starts from a checkpoint's position (here the start), is healed with the
    # survivor's table and world count, and takes part in the sync it joined at
    position = DataPosition()
    handed = StreamTable(S)
    handed.load(tables[0].state())
    streams = handed.hand_over(position, 1, WORLD, survivor.position.blocks)
    assert sorted(streams) == [c for c in range(S) if c % WORLD == 1]
    replacement = Replica(source, 1, position)
    _sync(tables[0], [survivor, replacement])
    for _ in range(REJOINS_AT + 1, END + 1):
        survivor.step(S)
        replacement.step(S)

    # read twice: exactly the dead replica's blocks after its last sync (at most one interval)
    # (per stream: the replacement's positions interleave its streams from the world's count)
    repeated = dead.read[committed_dead:]
    assert len(repeated) == (DIES_AFTER - 4) * BATCH <= H * BATCH
    for c in {c for c, _, _ in repeated}:
        again = [b for b in repeated if b[0] == c]
        assert [b for b in replacement.read if b[0] == c][: len(again)] == again
    # every stream's committed blocks are a prefix of it, in order: nothing skipped or repeated
    committed = survivor.read + dead.read[:committed_dead] + replacement.read
    per_stream = defaultdict(list)
    for c, i, e in committed:
        per_stream[c].append((int(i), int(e)))
    for c, got in per_stream.items():
        assert got == order[c][: len(got)], f"stream {c}"
    # the survivor's streams went on as without a death; the replacement's lag by what was lost
    assert sorted(per_stream) == list(range(S))
    ahead = sum(len(per_stream[c]) for c in range(0, S, WORLD))
    behind = sum(len(per_stream[c]) for c in range(1, S, WORLD))
    assert ahead == END * BATCH
    assert behind == (4 + END - REJOINS_AT) * BATCH


def test_streams_shared_between_replicas_are_refused():
    check_one_reader(12, 2)
    with pytest.raises(DataError, match=r"streams \(9\).*set data.streams to a multiple of 2"):
        check_one_reader(9, 2)


def test_the_agreed_cursors_keep_a_dead_replicas_streams_at_its_last_sync():
    table = StreamTable(4)
    a = torch.zeros(4, 10, dtype=torch.int64)
    a[1] = torch.tensor([1, 0, 3, 0, 0, -1, 0, 7, 2, 1])
    table.record(a)
    assert table.cursors[1].unit == 3 and table.cursors[1].emitted == 7
    table.record(torch.zeros(4, 10, dtype=torch.int64))  # its reader was not in this quorum
    assert table.cursors[1].unit == 3
