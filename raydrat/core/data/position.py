"""Where the world is in the global order (:mod:`raydrat.core.data.order`): a few numbers.

:class:`DataPosition` holds ``blocks``, the positions of the global order consumed so far (the
same count whatever the number of workers), and a :class:`StreamCursor` per stream: which
epoch, unit and chunk its current shuffle window starts at, and how many of the window's
blocks are consumed. The cursors follow from ``blocks`` alone; they are kept so that a
restart finds every stream's place without reading what came before (at most the chunk its
window starts in is read again). :func:`worker_slice` turns a position, a rank and a world
size into what that worker reads, so any worker group, of any size, continues from any saved
position; a replacement worker takes the slice of the one it replaces.

Positions are written into checkpoints as JSON (``data-rank{r}.json``: each stream by the
lowest rank that reads it, :func:`~raydrat.core.data.order.records_stream`) and merged on
restore (:func:`merge`)."""

from __future__ import annotations

from dataclasses import astuple, dataclass, field, fields

from raydrat.core.data.blocks import UnitStart
from raydrat.core.data.errors import DataError
from raydrat.core.data.order import worker_streams
from raydrat.core.data.read import Mark

POSITION_FORMAT = 1


@dataclass
class StreamCursor:
    """Where one stream is: its current window starts at block ``emitted`` of the chunk at
    ``(item, offset, label)`` (whose first block is the unit's block ``first``) of unit
    ``unit`` (an index into the stream's units of ``epoch``); the window is the stream's
    ``window``-th, and ``taken`` of its blocks are consumed."""

    epoch: int = 0
    unit: int = 0
    item: int = 0
    offset: int = 0
    label: int = -1
    first: int = 0
    emitted: int = 0
    window: int = 0
    taken: int = 0

    def unit_start(self) -> UnitStart:
        return UnitStart(Mark(self.item, self.offset, self.label), self.first, self.emitted)


@dataclass
class DataPosition:
    """The world's place in the global order. ``streams`` maps a stream to its cursor (a
    stream without one is at the start of epoch ``first_epoch``)."""

    blocks: int = 0
    streams: dict[int, StreamCursor] = field(default_factory=dict)
    stream_count: int = 0
    """Streams of the order this position is in (0: not known yet, any)."""
    units: int = 0
    """Units of the corpus this position is in (0: not known yet, any)."""
    first_epoch: int = 0
    trace: list | None = field(default=None, compare=False, repr=False)
    """When a list, the stream appends ``(position, block_id, epoch)`` of every block it hands
    to training (not saved): how tests and ``raydrat bench resume`` see what was consumed."""

    @property
    def epoch(self) -> int:
        """The epoch every stream has reached."""
        return min((c.epoch for c in self.streams.values()), default=self.first_epoch)

    def cursor(self, stream: int) -> StreamCursor:
        return self.streams.get(stream) or StreamCursor(epoch=self.first_epoch)

    def start_epoch(self, epoch: int) -> None:
        """Every stream to the start of ``epoch``."""
        self.blocks, self.streams, self.first_epoch = 0, {}, epoch

    def check(self, stream_count: int, units: int, where: str) -> None:
        """Refuse to read this position in an order of another shape (the corpus's units or
        ``data.streams`` changed since it was saved)."""
        if self.stream_count and (self.stream_count, self.units) != (stream_count, units):
            raise DataError(
                f"{where}: the data position is for {self.units} units in {self.stream_count} streams but the "
                f"corpus now has {units} units in {stream_count} streams (its files or data.streams changed): "
                "resume with the corpus and data.streams it was trained on, or start a new run"
            )

    def to_json(self) -> dict:
        """This position as JSON: the count, the shape of the order, the cursors."""
        return {
            "format": POSITION_FORMAT,
            "blocks": self.blocks,
            "stream_count": self.stream_count,
            "units": self.units,
            "first_epoch": self.first_epoch,
            "streams": {str(c): list(astuple(cur)) for c, cur in sorted(self.streams.items())},
        }


CURSOR_FIELDS = tuple(f.name for f in fields(StreamCursor))


def merge(parts: list[dict], where: str) -> DataPosition:
    """One position from the JSON each rank of a checkpoint wrote (:meth:`DataPosition.to_json`)."""
    keys = {(p["blocks"], p["stream_count"], p["units"], p.get("first_epoch", 0)) for p in parts}
    if len(keys) != 1:
        raise DataError(f"{where}: the ranks' data positions disagree ({sorted(keys)}): the save is damaged")
    (blocks, stream_count, units, first_epoch), *_ = keys
    streams: dict[int, StreamCursor] = {}
    for p in parts:
        for c, values in p["streams"].items():
            streams[int(c)] = StreamCursor(**dict(zip(CURSOR_FIELDS, values, strict=True)))
    return DataPosition(blocks, streams, stream_count, units, first_epoch)


@dataclass(frozen=True)
class WorkerSlice:
    """What worker ``rank`` of ``world`` reads from ``position``: the global positions
    ``start + rank, start + rank + world, ...``, drawn from ``streams`` (each from its
    cursor)."""

    start: int
    rank: int
    world: int
    streams: dict[int, StreamCursor]


def worker_slice(position: DataPosition, stream_count: int, rank: int, world: int) -> WorkerSlice:
    """The slice worker ``rank`` of a world of ``world`` workers reads from ``position``."""
    mine = worker_streams(stream_count, rank, world, position.blocks)
    return WorkerSlice(position.blocks, rank, world, {c: position.cursor(c) for c in mine})
