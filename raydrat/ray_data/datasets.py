""":func:`build_datasets`: a run's :class:`~raydrat.ray_data.bundle.DatasetBundle`, from
``data.sources`` (streamed) or from a ``data.prepared`` directory.

From sources, the corpus is checked cheaply before training: metadata for every file
(listings, parquet footers), then a read of at most ``data.val_max_units`` units spread over
the corpus, which also hold the (materialized, bounded) val split. Train stays lazy: a
:class:`~raydrat.core.data.stream.TrainSource` each worker reads its part of the global order
from (:func:`raydrat.ray_data.stream.train_stream`), and a
:class:`~raydrat.ray_data.stream.DataCounter` actor counts what each epoch read. Weighted
mixing repeats or skips training blocks by a per-source rate set from measured sizes
(:mod:`raydrat.core.data.mixing`); the log line and the lineage state each source's
measured size, target share and planned share.

From a prepared directory, the manifest is read first and checked against the run's
tokenizer and ``model.seq_len``; the training stream reads its shards, val is read whole."""

from __future__ import annotations

import logging
import socket
from dataclasses import asdict

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from raydrat.config import DataConfig
from raydrat.core.data.check import check_stats
from raydrat.core.data.errors import DataError
from raydrat.core.data.mixing import mixing_report, with_measured_rates
from raydrat.core.data.plan import plan_corpus, sample_units
from raydrat.core.data.prepared import Lease, check_manifest, read_manifest_at, table_blocks
from raydrat.core.data.sources import Location, filesystem, fs_path, location_for, uri
from raydrat.core.data.spec import PackSpec, make_spec
from raydrat.core.data.split import split_rule
from raydrat.core.data.stream import PreparedUnit, TrainSource
from raydrat.core.data.tokenizer import tokenizer_hash
from raydrat.ray_data.bundle import DatasetBundle
from raydrat.ray_data.stream import DataCounter, scan_sample, units_dataset, val_dataset

log = logging.getLogger(__name__)


def build_datasets(data_cfg: DataConfig, seq_len: int, vocab_size: int) -> DatasetBundle:
    """Check the corpus cheaply and return the training source (read lazily by each worker:
    no Ray CPU of its own) and the val dataset (materialized) of ``seq_len + 1`` token
    blocks."""
    # A prepared directory's manifest is read first: an incomplete output says so before
    # anything else is looked at.
    prepared = _read_prepared(data_cfg) if data_cfg.prepared else None
    spec, tok_path = make_spec(data_cfg, seq_len, vocab_size)
    tokenizer_sha256 = tokenizer_hash(tok_path)
    if prepared is not None:
        parts = _from_prepared(data_cfg, *prepared, spec, tokenizer_sha256, seq_len)
    else:
        parts = _from_sources(data_cfg, spec, tokenizer_sha256, seq_len)
    return DatasetBundle(
        tokenizer_path=str(tok_path),
        tokenizer_sha256=tokenizer_sha256,
        eod_id=spec.eod_id,
        block_len=spec.block_len,
        **parts,
    )


def _from_sources(data_cfg: DataConfig, spec: PackSpec, tokenizer_sha256: str, seq_len: int) -> dict:
    """train, val, stats, lineage and counter of the streamed sources."""
    plan = plan_corpus(data_cfg)
    corpus = ", ".join(src.path for src in data_cfg.sources)
    if not plan.units or plan.rows == 0:
        raise DataError(
            f"corpus {corpus} produced no blocks of seq_len+1 = {spec.block_len} tokens: "
            "it holds no documents; point data.sources at some text"
        )
    sample = units_dataset(sample_units(plan.units, data_cfg.val_max_units))
    stats, scans = scan_sample(sample, spec, len(plan.units), len(plan.skipped_files))
    check_stats(stats, spec, corpus, data_cfg.val_fraction)
    plan = with_measured_rates(data_cfg, plan, scans)  # weights met in tokens, not in footer sizes
    sources = mixing_report(data_cfg, plan, scans)
    log.info(
        "data: %d units (%d checked): %d documents (%d empty, %d with invalid UTF-8), %.1f MB; "
        "val: %d documents, %d blocks; %d files skipped%s%s",
        stats.units,
        stats.sampled_units,
        stats.docs,
        stats.empty_docs,
        stats.invalid_utf8_docs,
        stats.text_bytes / 1e6,
        stats.val_docs,
        stats.val_blocks,
        stats.skipped_files,
        f", {stats.corrupt_lines} JSON Lines lines that are not JSON skipped" if stats.corrupt_lines else "",
        f", {stats.corrupt_bytes} bytes after gzip members ignored" if stats.corrupt_bytes else "",
    )
    if len(sources) > 1:
        log.info(
            "data mixing (shares of training tokens, from the sizes measured on the checked units): "
            + "; ".join(
                f"sources[{i}] {s['path']}: ~{s['tokens_estimated'] / 1e6:.2f}M tokens, natural "
                f"{s['token_share_natural']:.1%}, target {s['token_share_target']:.1%}, planned "
                f"{s['token_share_planned']:.1%} (rate {s['rate']:.3g})"
                for i, s in enumerate(sources)
            )
        )
    source = TrainSource.of(tuple(plan.units), spec, data_cfg)
    lineage = {
        "kind": "sources",
        "sources": [s.model_dump(mode="json") for s in data_cfg.sources],
        "source_sizes": sources,
        "source_text_bytes": [s["text_bytes_estimated"] for s in sources],
        "mixing_rates": [s["rate"] for s in sources],
        "files": [{"path": uri(loc, i.path), "size": i.size} for loc, i in plan.files],
        "skipped_files": plan.skipped_files,
        "tokenizer_sha256": tokenizer_sha256,
        "seq_len": seq_len,
        "split": split_rule(data_cfg),
        "order": {"units": len(plan.units), "streams": source.stream_count, "shuffle_window": source.window},
        "checked_sample": asdict(stats),
    }
    # on the driver's node: a worker node that dies (or is preempted) must not take the counts with it
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=True)
    counter = DataCounter.options(scheduling_strategy=here).remote(len(plan.units), [u.source for u in plan.units])
    return {
        "train": source,
        "val": val_dataset(sample, spec),
        "stats": stats,
        "lineage": lineage,
        "counter": counter,
    }


def _read_prepared(data_cfg: DataConfig) -> tuple[Location, str, dict]:
    """Where ``data.prepared`` is, and its manifest (DataError if it is incomplete)."""
    loc = location_for(data_cfg.prepared, data_cfg.prepared_endpoint_url)
    root = fs_path(data_cfg.prepared)
    return loc, root, read_manifest_at(loc, root)


def _from_prepared(
    data_cfg: DataConfig, loc: Location, root: str, manifest: dict, spec: PackSpec, tokenizer_sha256: str, seq_len: int
) -> dict:
    """train, val and lineage of a prepared directory whose manifest is ``manifest``."""
    check_manifest(manifest, f"data.prepared = {data_cfg.prepared!r}", tokenizer_sha256, seq_len)
    # while this process runs, no prepare into the same directory removes the shards it reads
    lease = Lease.acquire(loc, root, manifest["shards"], holder=f"reader on {socket.gethostname()}", required=False)
    fs = filesystem(loc)

    def dataset(files: list[str]) -> ray.data.Dataset:
        paths = [f"{root}/{f}" for f in files]
        ds = ray.data.read_parquet(paths, filesystem=fs)
        return ds.map_batches(table_blocks, batch_format="pyarrow", fn_kwargs={"block_len": spec.block_len})

    units = tuple(
        PreparedUnit(int(f.rsplit("unit-", 1)[1].split(".")[0]), f"{root}/{f}", loc) for f in manifest["train_files"]
    )
    return {
        "train": TrainSource.of(units, spec, data_cfg),
        "val": dataset(manifest["val_files"]).materialize(),
        "stats": None,
        "lineage": {"kind": "prepared", "prepared": data_cfg.prepared, "manifest": manifest},
        "lease": lease,
    }
