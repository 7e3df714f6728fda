"""The data on Ray: the up-front check and the val split as Ray Data pipelines over the
sampled units (one unit per call, ``batch_size=1``), the per-epoch :class:`DataCounter`, and
:func:`train_stream`, the training stream a Ray Train worker trains on.

The training stream is read inside each worker, not dealt by Ray Data's
``streaming_split``: the split hands a block to whichever worker its dispatcher picks, so
what a worker consumed is a set no position can name, and it cannot start a stream in the
middle of a unit. Each worker instead reads its own part of the global order
(:mod:`raydrat.core.data.order`) from the checkpointed position, a thread ahead of training,
so a worker group of any size continues from any position with nothing repeated or skipped."""

from __future__ import annotations

import os
import queue
import threading
from collections.abc import Iterator

import numpy as np
import pyarrow as pa
import ray
import torch

from raydrat.config import DataConfig
from raydrat.core.data.blocks import VAL_TOKENS_PER_UNIT, scan_unit, unit_runs
from raydrat.core.data.check import DataStats, combine_scans
from raydrat.core.data.plan import Unit
from raydrat.core.data.position import DataPosition
from raydrat.core.data.spec import PackSpec
from raydrat.core.data.stream import MicroBatch, TrainSource, WorkerBlocks

# Ray Data UDFs: a batch is a pyarrow table of unit rows (batch_size=1: one unit per call).


def _scan_batch(batch: pa.Table, spec: PackSpec) -> dict[str, np.ndarray]:
    rows = [scan_unit(Unit.from_row(r), spec) for r in batch.to_pylist()]
    return {k: np.array([r[k] for r in rows]) for k in rows[0]}


def _val_batch(batch: pa.Table, spec: PackSpec) -> Iterator[dict[str, np.ndarray]]:
    for row in batch.to_pylist():
        for run in unit_runs(Unit.from_row(row), spec, "val", max_tokens=VAL_TOKENS_PER_UNIT):
            yield {"tokens": run.blocks, "block_id": run.ids}


@ray.remote(num_cpus=0)
class DataCounter:
    """Counts what the training stream read, unit by unit and epoch by epoch: an epoch is
    complete once every unit of it has been read whole (from its start: a unit a restart
    entered half-way is not counted again). The driver turns this into per-epoch figures
    (:meth:`raydrat.ray_data.bundle.DatasetBundle.epoch_metrics`)."""

    KEYS = (
        "docs",
        "empty_docs",
        "invalid_utf8_docs",
        "skipped_files",
        "corrupt_lines",
        "corrupt_bytes",
        "split_docs",
        "tokens",
        "blocks",
        "dropped_tokens",
    )

    def __init__(self, n_units: int, sources: list[int]):
        self.n_units, self.sources = n_units, sources
        self.read: dict[int, dict[int, dict]] = {}

    def add(self, epoch: int, unit_id: int, counts: dict) -> None:
        self.read.setdefault(epoch, {})[unit_id] = counts

    def epochs(self) -> list[dict[str, float]]:
        """Per complete epoch: the summed counts, and each source's share of the blocks."""
        out = []
        for epoch in sorted(self.read):
            units = self.read[epoch]
            if len(units) < self.n_units:
                continue
            row: dict[str, float] = {"epoch": epoch, **{k: sum(c.get(k, 0) for c in units.values()) for k in self.KEYS}}
            if len(set(self.sources)) > 1:
                for s in sorted(set(self.sources)):
                    mine = sum(c.get("blocks", 0) for u, c in units.items() if self.sources[u] == s)
                    row[f"source{s}_block_share"] = mine / max(1, row["blocks"])
            out.append(row)
        return out


def pool_size(data_cfg: DataConfig, reserved_cpus: float = 0) -> int:
    """Tokenizer actors of ``raydrat data prepare``: ``data.tokenize_actors``, or the
    cluster's CPUs left over."""
    if data_cfg.tokenize_actors:
        return data_cfg.tokenize_actors
    cpus = ray.cluster_resources().get("CPU", 1) if ray.is_initialized() else 1
    return max(1, int(cpus - reserved_cpus))


def units_dataset(units: list[Unit]) -> ray.data.Dataset:
    """The unit rows, one Ray Data block per unit. A DataError raised while reading a unit
    reaches the caller as itself (Ray Data would wrap it in a ``UserCodeException`` that
    holds only its text), so it ends as one ``raydrat: error:`` line wherever it is found."""
    ray.data.DataContext.get_current().raise_original_map_exception = True
    return ray.data.from_items([u.to_row() for u in units], override_num_blocks=max(1, len(units)))


def map_units(ds: ray.data.Dataset, fn, spec: PackSpec, **kwargs) -> ray.data.Dataset:
    """``fn`` over the unit rows, one unit per task."""
    return ds.map_batches(fn, batch_size=1, batch_format="pyarrow", fn_kwargs={"spec": spec, **kwargs})


def scan_sample(
    sample: ray.data.Dataset, spec: PackSpec, n_units: int, plan_skipped: int
) -> tuple[DataStats, list[dict]]:
    """The up-front check's counts over ``sample`` (unit rows), one task per unit, and the
    units' scan rows (weighted mixing measures its sources on them)."""
    rows = map_units(sample, _scan_batch, spec).take_all()
    return combine_scans(rows, n_units, plan_skipped), rows


def val_dataset(sample: ray.data.Dataset, spec: PackSpec) -> ray.data.Dataset:
    """The val blocks of the sampled units (at most
    :data:`~raydrat.core.data.blocks.VAL_TOKENS_PER_UNIT` tokens each), materialized in the
    object store."""
    return map_units(sample, _val_batch, spec).materialize()


_END = object()


def train_stream(
    source: TrainSource,
    position: DataPosition,
    rank: int,
    world: int,
    batch_size: int,
    seed: int,
    device: torch.device | str = "cpu",
    prefetch: int = 2,
    counter=None,
) -> Iterator[torch.Tensor]:
    """Worker ``rank`` of ``world``'s training micro-batches (``(batch_size, seq_len + 1)``
    long tensors on ``device``) in the global order from ``position``, read
    ``prefetch`` micro-batches ahead in a thread. ``position`` is kept at the world's place
    after the last micro-batch handed out (what a checkpoint saves: no block in flight), and
    gets each block's ``(position, block_id, epoch)`` when ``position.trace`` is a list.
    ``counter`` (a :class:`DataCounter`) gets each unit's counts once it is read whole."""
    os.environ.setdefault("RAYON_NUM_THREADS", "1")  # the tokenizer's own pool: one thread beside training
    on_unit = None if counter is None else (lambda epoch, unit, counts: counter.add.remote(epoch, unit, counts))
    blocks = WorkerBlocks(source, seed, position, rank, world, batch_size, on_unit)
    ready: queue.Queue = queue.Queue(maxsize=max(1, prefetch))
    stop = threading.Event()

    def produce() -> None:
        try:
            for batch in blocks:
                while not stop.is_set():
                    try:
                        ready.put(batch, timeout=0.5)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
        except BaseException as exc:  # handed to the consumer, which raises it
            ready.put(exc)
        ready.put(_END)

    thread = threading.Thread(target=produce, name="raydrat-train-stream", daemon=True)
    thread.start()
    try:
        while True:
            item = ready.get()
            if isinstance(item, BaseException):
                raise item
            if item is _END:
                return
            mb: MicroBatch = item
            position.blocks, position.streams = mb.position.blocks, mb.position.streams
            position.stream_count, position.units = mb.position.stream_count, mb.position.units
            if position.trace is not None:
                position.trace.extend(zip(mb.positions.tolist(), mb.ids.tolist(), mb.epochs.tolist(), strict=True))
            yield torch.from_numpy(mb.tokens).to(device=device, dtype=torch.long)
    finally:
        stop.set()
