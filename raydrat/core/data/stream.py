"""The training stream, without Ray: the global order (:mod:`raydrat.core.data.order`) read
from any :class:`~raydrat.core.data.position.DataPosition` by any worker of any world size.

* :class:`TrainSource` is what a worker needs (picklable): the units (of the sources, or the
  shards of a prepared directory), the :class:`~raydrat.core.data.spec.PackSpec`, the number
  of streams and the shuffle window.
* :class:`StreamReader` is one stream from a cursor: its units' blocks (a chunk at a time,
  :func:`~raydrat.core.data.blocks.unit_runs`), cut into windows, each window permuted.
* :class:`WorkerBlocks` is one worker's micro-batches: it walks the global positions of each
  micro-round in order, takes the next block of the position's stream when it reads that
  stream, keeps the positions that are its own, and after each micro-batch has the position
  of the world (every worker ends a micro-batch at the same place). A restart re-reads, per
  stream, the chunk its window starts in; no unit before it is read again.

Memory: per stream one window (``data.shuffle_buffer`` blocks) and the chunk being read."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace

import numpy as np
import pyarrow.parquet as pq

from raydrat.config.data import DataConfig
from raydrat.core.data.blocks import Run, UnitStart, plan_local, unit_runs
from raydrat.core.data.errors import DataError
from raydrat.core.data.order import records_stream, stream_count, stream_units, window_order
from raydrat.core.data.plan import Unit
from raydrat.core.data.position import DataPosition, StreamCursor, worker_slice
from raydrat.core.data.prepared import table_blocks
from raydrat.core.data.read import Mark
from raydrat.core.data.sources import Location, filesystem
from raydrat.core.data.spec import PackSpec, make_spec

OnUnit = Callable[[int, int, dict], None]
"""``(epoch, unit_id, counts)``, called when a stream has read a unit from start to end."""


@dataclass(frozen=True)
class PreparedUnit:
    """The training shard of one unit in a prepared directory (its rows are blocks)."""

    unit_id: int
    path: str
    loc: Location


@dataclass(frozen=True)
class TrainSource:
    """What a worker needs to read the training stream."""

    units: tuple[Unit, ...] | tuple[PreparedUnit, ...]
    spec: PackSpec
    stream_count: int
    """Streams in use (:func:`~raydrat.core.data.order.stream_count`)."""
    window: int
    """Blocks per shuffle window (``data.shuffle_buffer``; at least 1)."""

    @classmethod
    def of(cls, units: tuple, spec: PackSpec, data_cfg: DataConfig) -> TrainSource:
        """The source of ``units`` under ``data.streams`` and ``data.shuffle_buffer``."""
        return cls(units, spec, stream_count(data_cfg.streams, len(units)), max(1, data_cfg.shuffle_buffer))

    def runs(self, unit: Unit | PreparedUnit, start: UnitStart, counts: dict) -> Iterator[Run]:
        """The unit's training blocks from ``start``."""
        if isinstance(unit, PreparedUnit):
            return prepared_runs(unit, self.spec.block_len, start)
        return unit_runs(unit, self.spec, "train", start, counts)


def prepared_runs(unit: PreparedUnit, block_len: int, start: UnitStart) -> Iterator[Run]:
    """A prepared shard's blocks from row ``start.first + start.emitted``, a row group at a
    time (row groups before it are not read)."""
    row = start.first + start.emitted
    pf = pq.ParquetFile(filesystem(unit.loc).open_input_file(unit.path))
    seen = 0
    for rg in range(pf.num_row_groups):
        n = pf.metadata.row_group(rg).num_rows
        if seen + n > row:
            got = table_blocks(pf.read_row_group(rg), block_len)
            k = max(0, row - seen)
            yield Run(got["block_id"][k:], got["tokens"][k:], Mark(), 0, seen + k)
        seen += n


class StreamReader:
    """One stream's blocks in the global order, from ``cursor``."""

    def __init__(
        self, source: TrainSource, seed: int, stream: int, cursor: StreamCursor, on_unit: OnUnit | None = None
    ):
        self.source, self.seed, self.stream, self.on_unit = source, seed, stream, on_unit
        self.cursor = replace(cursor)
        self._raw = self._raw_blocks(cursor)
        self._ids: np.ndarray | None = None
        self._blocks: np.ndarray | None = None
        self._epochs: np.ndarray | None = None

    def _raw_blocks(self, cur: StreamCursor) -> Iterator[tuple[int, np.ndarray, tuple]]:
        """The stream's blocks before shuffling, each with the place it starts at."""
        src, n_units = self.source, len(self.source.units)
        epoch, first, start = cur.epoch, cur.unit, cur.unit_start()
        barren = 0  # units in a row without a training block
        while True:
            order = stream_units(self.seed, epoch, n_units, src.stream_count, self.stream)
            for u in range(first, len(order)):
                unit = src.units[order[u]]
                counts: dict = {}
                got = 0
                for run in src.runs(unit, start, counts):
                    m = run.mark
                    for k in range(len(run.ids)):
                        yield (
                            int(run.ids[k]),
                            run.blocks[k],
                            (epoch, u, m.item, m.offset, m.label, run.first, run.emitted + k),
                        )
                    got += len(run.ids)
                if self.on_unit is not None and start == UnitStart():
                    self.on_unit(epoch, unit.unit_id, counts)
                barren = 0 if got else barren + 1
                if barren > n_units:
                    raise DataError(
                        f"the training split holds no block of seq_len+1 = {src.spec.block_len} tokens in "
                        f"{n_units} units: add documents, lower data.val_fraction or model.seq_len"
                    )
                start = UnitStart()
            epoch, first = epoch + 1, 0

    def _fill(self, window: int, taken: int) -> None:
        ids, blocks, epochs, place = [], [], [], None
        for block_id, block, where in itertools.islice(self._raw, self.source.window):
            place = place or where
            ids.append(block_id)
            blocks.append(block)
            epochs.append(where[0])
        perm = window_order(self.seed, self.stream, window, len(ids))
        self._ids, self._blocks = np.asarray(ids, dtype=np.int64)[perm], np.stack(blocks)[perm]
        self._epochs = np.asarray(epochs, dtype=np.int64)[perm]
        self.cursor = StreamCursor(*place, window=window, taken=taken)

    def next(self) -> tuple[int, np.ndarray, int]:
        """The stream's next block: ``(block_id, tokens, epoch)``."""
        if self._ids is None:
            self._fill(self.cursor.window, self.cursor.taken)
        elif self.cursor.taken == len(self._ids):
            self._fill(self.cursor.window + 1, 0)
        i = self.cursor.taken
        self.cursor.taken += 1
        return int(self._ids[i]), self._blocks[i], int(self._epochs[i])


@dataclass
class MicroBatch:
    ids: np.ndarray
    """The blocks' ids."""
    tokens: np.ndarray
    """``int32[batch_size, seq_len + 1]``."""
    positions: np.ndarray
    """Their global positions."""
    epochs: np.ndarray
    """The epoch each block belongs to."""
    position: DataPosition
    """The world's position once every worker has taken its part of this micro-round (this
    worker's streams only: what it writes into a checkpoint)."""


class WorkerBlocks:
    """Worker ``rank`` of ``world``'s micro-batches of ``batch_size`` blocks from ``position``."""

    def __init__(
        self,
        source: TrainSource,
        seed: int,
        position: DataPosition,
        rank: int = 0,
        world: int = 1,
        batch_size: int = 1,
        on_unit: OnUnit | None = None,
    ):
        position.check(source.stream_count, len(source.units), "the training stream")
        part = worker_slice(position, source.stream_count, rank, world)
        self.first_epoch = position.first_epoch
        self.source, self.rank, self.world, self.batch_size = source, rank, world, batch_size
        self.readers = {c: StreamReader(source, seed, c, cur, on_unit) for c, cur in part.streams.items()}
        self.start = self.next_position = part.start
        self.recorded = [c for c in self.readers if records_stream(source.stream_count, c, rank, world, part.start)]

    def _pass(self, end: int) -> tuple[list[int], list[np.ndarray], list[int], list[int]]:
        """Walk the global positions up to ``end``, keeping this worker's."""
        ids, blocks, positions, epochs = [], [], [], []
        n = self.source.stream_count
        for p in range(self.next_position, end):
            reader = self.readers.get(p % n)
            if reader is None:
                continue
            block_id, block, epoch = reader.next()
            if (p - self.start) % self.world == self.rank:
                ids.append(block_id)
                blocks.append(block)
                positions.append(p)
                epochs.append(epoch)
        self.next_position = end
        return ids, blocks, positions, epochs

    def position(self) -> DataPosition:
        """The world's position after the positions walked so far (this worker's streams)."""
        cursors = {c: replace(self.readers[c].cursor) for c in self.recorded}
        return DataPosition(
            self.next_position, cursors, self.source.stream_count, len(self.source.units), self.first_epoch
        )

    def advance(self, end: int) -> list[tuple[int, int]]:
        """Walk the positions up to ``end`` (a reference walk); ``(block_id, epoch)`` of the
        blocks this worker passed that are its own."""
        ids, _, _, epochs = self._pass(end)
        return list(zip(ids, epochs, strict=True))

    def __iter__(self) -> Iterator[MicroBatch]:
        return self

    def __next__(self) -> MicroBatch:
        ids, blocks, positions, epochs = self._pass(self.next_position + self.world * self.batch_size)
        return MicroBatch(
            np.asarray(ids, dtype=np.int64),
            np.stack(blocks),
            np.asarray(positions),
            np.asarray(epochs),
            self.position(),
        )


def epoch_blocks(source: TrainSource, seed: int, epoch: int = 0) -> list[tuple[int, np.ndarray]]:
    """``(block_id, tokens)`` of every block of ``epoch`` in the global order (read by one
    worker from the start until every stream has passed that epoch)."""
    walk = WorkerBlocks(source, seed, DataPosition(), batch_size=source.stream_count)
    out = []
    while True:
        batch = next(walk)
        out += [
            (i, b)
            for i, b, e in zip(batch.ids.tolist(), batch.tokens, batch.epochs.tolist(), strict=True)
            if e == epoch
        ]
        if all(r.cursor.epoch > epoch for r in walk.readers.values()):
            return out


def local_source(data_cfg: DataConfig, seq_len: int, vocab_size: int) -> TrainSource:
    """The training source of ``data_cfg`` built in this process, without Ray (mixing rates
    measured as :func:`raydrat.ray_data.datasets.build_datasets` measures them)."""
    spec, _ = make_spec(data_cfg, seq_len, vocab_size)
    return TrainSource.of(tuple(plan_local(data_cfg, spec).units), spec, data_cfg)


def position_at(source: TrainSource, seed: int, blocks: int) -> DataPosition:
    """The position after the world consumed ``blocks`` blocks (read from the start: the
    reference a saved position is checked against)."""
    walk = WorkerBlocks(source, seed, DataPosition())
    walk.advance(blocks)
    return walk.position()
