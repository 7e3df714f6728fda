"""The core blocks streamed on Ray Data. A dataset of unit rows (one Ray Data block per
unit) is mapped one unit per call, ``batch_size=1``: training through a pool of tokenizer
actors (:class:`PackActor`) that a :class:`DataCounter` actor tells what each epoch read;
the up-front check and the val split through plain tasks over the sampled units."""

from __future__ import annotations

import os
from collections.abc import Iterator

import numpy as np
import pyarrow as pa
import ray

from raydrat.config import DataConfig
from raydrat.core.data.blocks import unit_blocks
from raydrat.core.data.check import DataStats, combine_scans, scan_unit
from raydrat.core.data.pack import cached_tokenizer
from raydrat.core.data.plan import Unit
from raydrat.core.data.spec import PackSpec
from raydrat.core.data.split import Split

# Ray Data UDFs: a batch is a pyarrow table of unit rows (batch_size=1: one unit per call).


def _scan_batch(batch: pa.Table, spec: PackSpec) -> dict[str, np.ndarray]:
    rows = [scan_unit(Unit.from_row(r), spec) for r in batch.to_pylist()]
    return {k: np.array([r[k] for r in rows]) for k in rows[0]}


def _pack_batch(batch: pa.Table, spec: PackSpec, split: Split) -> Iterator[dict[str, np.ndarray]]:
    for row in batch.to_pylist():
        for block_ids, blocks in unit_blocks(Unit.from_row(row), spec, split):
            yield {"tokens": blocks, "block_id": block_ids}


class PackActor:
    """The pack UDF on an actor: the tokenizer is parsed once, when the actor starts. Each
    actor holds one CPU and encodes on one thread (``RAYON_NUM_THREADS=1`` unless set):
    the pool, not the tokenizer's own thread pool, spreads work over the cores, so actors
    do not oversubscribe them."""

    def __init__(self, spec: PackSpec, split: Split, counter=None):
        os.environ.setdefault("RAYON_NUM_THREADS", "1")  # before the Rust pool starts
        self.spec, self.split, self.counter = spec, split, counter
        cached_tokenizer(spec.tokenizer_json)

    def __call__(self, batch: pa.Table) -> Iterator[dict[str, np.ndarray]]:
        for row in batch.to_pylist():
            counts: dict = {}
            unit = Unit.from_row(row)
            for block_ids, blocks in unit_blocks(unit, self.spec, self.split, counts):
                yield {"tokens": blocks, "block_id": block_ids}
            if self.counter is not None:
                self.counter.add.remote(unit.unit_id, counts)


@ray.remote(num_cpus=0)
class DataCounter:
    """Counts what the training stream actually read, unit by unit and pass by pass: an
    epoch is complete once every unit has been read that many times. The driver turns this
    into per-epoch metrics (:meth:`raydrat.ray_data.bundle.DatasetBundle.epoch_metrics`)."""

    def __init__(self, n_units: int):
        self.n_units = n_units
        self.passes: dict[int, list[dict]] = {}

    def add(self, unit_id: int, counts: dict) -> None:
        self.passes.setdefault(unit_id, []).append(counts)

    def epochs(self) -> list[dict[str, int]]:
        if len(self.passes) < self.n_units:
            done = 0
        else:
            done = min(len(v) for v in self.passes.values())
        keys = (
            "docs",
            "empty_docs",
            "invalid_utf8_docs",
            "skipped_files",
            "corrupt_lines",
            "split_docs",
            "tokens",
            "blocks",
            "dropped_tokens",
        )
        return [{k: int(sum(p[e].get(k, 0) for p in self.passes.values())) for k in keys} for e in range(done)]


def pool_size(data_cfg: DataConfig, reserved_cpus: float = 0) -> int:
    """Tokenizer actors: ``data.tokenize_actors``, or the cluster's CPUs left over."""
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


def pack_dataset(units: list[Unit], spec: PackSpec, split: Split, actors: int, counter=None) -> ray.data.Dataset:
    """Lazy blocks of ``split`` over ``units`` on a pool of ``actors`` tokenizer actors
    (0: plain tasks), reporting each unit's counts to ``counter`` (a DataCounter) if given."""
    ds = units_dataset(units)
    if actors == 0:
        return map_units(ds, _pack_batch, spec, split=split)
    return ds.map_batches(
        PackActor,
        fn_constructor_kwargs={"spec": spec, "split": split, "counter": counter},
        batch_size=1,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=actors),
    )


def scan_sample(
    sample: ray.data.Dataset, spec: PackSpec, n_units: int, plan_skipped: int
) -> tuple[DataStats, list[dict]]:
    """The up-front check's counts over ``sample`` (unit rows), one task per unit, and the
    units' scan rows (weighted mixing measures its sources on them)."""
    rows = map_units(sample, _scan_batch, spec).take_all()
    return combine_scans(rows, n_units, plan_skipped), rows


def val_dataset(sample: ray.data.Dataset, spec: PackSpec) -> ray.data.Dataset:
    """The val blocks of the sampled units, materialized in the object store."""
    return map_units(sample, _pack_batch, spec, split="val").materialize()
