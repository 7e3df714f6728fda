"""Prepare once, train many times: ``raydrat data prepare`` writes the core blocks of every
unit as parquet shards on a Ray Data actor pool, then publishes the manifest (format and
layout: :mod:`raydrat.core.data.prepared`).

Every prepare run writes to a fresh ``shards-<run>`` prefix and publishes ``manifest.json``
only after every shard is written and every count is in. A crash leaves an unreferenced
prefix that no reader trusts; a re-run replaces the manifest and then removes the prefix it
no longer references.

Shards hold the very blocks :func:`raydrat.ray_data.datasets.build_datasets` would stream
(mixing rates applied), so a run over prepared data sees the same tokens. The val split is
the one of the sampled units (``data.val_max_units``), as in streaming mode; the manifest
counts every held-out document.
"""

from __future__ import annotations

import logging
import time
import uuid
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray

from raydrat.config import DataConfig
from raydrat.core.data.blocks import unit_blocks
from raydrat.core.data.errors import DataError
from raydrat.core.data.plan import Unit, plan_corpus, sample_units
from raydrat.core.data.prepared import (
    COUNT_KEYS,
    MANIFEST_FORMAT,
    SPLIT_KEYS,
    block_table,
    publish_manifest,
    read_manifest_at,
    shard_path,
)
from raydrat.core.data.sources import (
    Location,
    describe_os_error,
    file_fingerprint,
    filesystem,
    fs_path,
    location_for,
)
from raydrat.core.data.spec import PackSpec, make_spec
from raydrat.core.data.split import split_rule
from raydrat.core.data.tokenizer import tokenizer_hash
from raydrat.ray_data.stream import pool_size, units_dataset

log = logging.getLogger(__name__)


class ShardWriter:
    """Ray Data UDF (on an actor pool): one unit in, its shards written, one row of counts
    out (``error`` holds a DataError's message, which would lose its type crossing Ray)."""

    def __init__(self, spec: PackSpec, out_loc: Location, prefix: str, val_units: set[int]):
        self.spec, self.loc, self.prefix, self.val_units = spec, out_loc, prefix, val_units

    def _write(self, unit: Unit, split: str, counts: dict) -> str | None:
        ids, blocks = [], []
        for i, b in unit_blocks(unit, self.spec, split, counts):
            ids.append(i)
            blocks.append(b)
        if not blocks:
            return None
        fs = filesystem(self.loc)
        path = shard_path(self.prefix, split, unit.unit_id)
        if self.loc.kind == "local":
            fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
        pq.write_table(block_table(ids, blocks, self.spec.block_len), path, filesystem=fs)
        return path

    def __call__(self, batch: pa.Table) -> dict[str, np.ndarray]:
        rows = []
        for row in batch.to_pylist():
            unit = Unit.from_row(row)
            out: dict = {"unit_id": unit.unit_id, "source": unit.source, "error": ""}
            try:
                train: dict = {}
                train_path = self._write(unit, "train", train)
                val: dict = {}
                if unit.unit_id in self.val_units:
                    val_path = self._write(unit, "val", val)
                else:  # held out, counted, not stored
                    for _ in unit_blocks(unit, self.spec, "val", val):
                        pass
                    val_path = None
                out.update({k: train[k] for k in COUNT_KEYS})
                out.update({f"train_{k}": train[k] for k in SPLIT_KEYS})
                out.update({f"val_{k}": val[k] for k in SPLIT_KEYS})
                out.update(train_path=train_path or "", val_path=val_path or "",
                           val_stored_blocks=val["blocks"] if val_path else 0)
            except DataError as exc:
                out["error"] = str(exc)
            rows.append(out)
        keys = sorted({k for r in rows for k in r})
        return {k: np.array([r.get(k, 0) for r in rows]) for k in keys}


def prepare(data_cfg: DataConfig, seq_len: int, vocab_size: int, out: str,
            endpoint_url: str | None = None) -> dict:
    """Tokenize and pack the configured sources into ``out``; return the manifest."""
    t0 = time.perf_counter()
    spec, tok_path = make_spec(data_cfg, seq_len, vocab_size)
    plan = plan_corpus(data_cfg)
    corpus = ", ".join(s.path for s in data_cfg.sources)
    if plan.rows == 0:
        raise DataError(f"corpus {corpus} holds no documents: point data.sources at some text")
    out_loc = location_for(out, endpoint_url)
    root = fs_path(out)
    fs = filesystem(out_loc)
    try:
        old = read_manifest_at(out_loc, root)
    except DataError:
        old = None
    run = f"shards-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:8]}"
    prefix = f"{root}/{run}"
    val_units = {u.unit_id for u in sample_units(plan.units, data_cfg.val_max_units)}
    ds = units_dataset(plan.units).map_batches(
        ShardWriter,
        fn_constructor_kwargs=dict(spec=spec, out_loc=out_loc, prefix=prefix, val_units=val_units),
        batch_size=1,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=pool_size(data_cfg)),
    )
    try:
        rows = sorted(ds.take_all(), key=lambda r: r["unit_id"])
    except OSError as exc:
        raise describe_os_error(f"writing {out}", exc) from None
    errors = [r["error"] for r in rows if r["error"]]
    if errors:
        raise DataError(errors[0])

    def total(key: str, source: int | None = None) -> int:
        return int(sum(r[key] for r in rows if source is None or r["source"] == source))

    counts = {k: total(k) for k in COUNT_KEYS}
    counts.update({f"train_{k}": total(f"train_{k}") for k in SPLIT_KEYS})
    counts.update({f"val_{k}": total(f"val_{k}") for k in SPLIT_KEYS})
    counts["val_stored_blocks"] = total("val_stored_blocks")
    counts["skipped_files"] += len(plan.skipped_files)
    if counts["docs"] == 0:
        raise DataError(f"corpus {corpus}: all {counts['empty_docs']} documents are empty: "
                        "point data.sources at some text (nothing was published)")
    if counts["train_blocks"] == 0 or counts["val_stored_blocks"] == 0:
        raise DataError(
            f"corpus {corpus} packs into {counts['train_blocks']} train and "
            f"{counts['val_stored_blocks']} val blocks of seq_len+1 = {spec.block_len} tokens: "
            "add documents, raise data.val_fraction or lower model.seq_len (nothing was published)"
        )
    with fs.open_output_stream(f"{prefix}/tokenizer.json") as f:
        f.write(Path(tok_path).read_bytes())
    manifest = {
        "format": MANIFEST_FORMAT,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "shards": run,
        "train_files": [r["train_path"][len(root) + 1:] for r in rows if r["train_path"]],
        "val_files": [r["val_path"][len(root) + 1:] for r in rows if r["val_path"]],
        "tokenizer_sha256": tokenizer_hash(tok_path),
        "tokenizer_file": f"{run}/tokenizer.json",
        "vocab_size": vocab_size,
        "eod_id": spec.eod_id,
        "seq_len": seq_len,
        "block_len": spec.block_len,
        "pack_rows": data_cfg.pack_rows,
        "split": split_rule(data_cfg),
        "sources": [
            {**s.model_dump(mode="json"), "text_bytes": plan.source_bytes[i],
             "mixing_rate": next((u.rate for u in plan.units if u.source == i), 1.0),
             "docs": total("docs", i), "train_tokens": total("train_tokens", i),
             "train_blocks": total("train_blocks", i)}
            for i, s in enumerate(data_cfg.sources)
        ],
        "files": [file_fingerprint(loc, info) for loc, info in plan.files],
        "counts": counts,
        "skipped": {
            "empty_docs": counts["empty_docs"],
            "corrupt_files": plan.skipped_files + ([] if not counts["skipped_files"] - len(plan.skipped_files) else ["(gzip files skipped while reading; see counts.skipped_files)"]),
            "packing_group_tails_tokens": counts["train_dropped_tokens"] + counts["val_dropped_tokens"],
        },
        "replaced": {"invalid_utf8_docs": counts["invalid_utf8_docs"]},
        "seconds": round(time.perf_counter() - t0, 1),
    }
    publish_manifest(out_loc, root, manifest)
    if old and old.get("shards") and old["shards"] != run:
        try:
            fs.delete_dir(f"{root}/{old['shards']}")
        except OSError:
            log.warning("could not remove the old shards %s/%s", out, old["shards"])
    return manifest
