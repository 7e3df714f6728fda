"""Prepare once, train many times: ``raydrat data prepare`` and reading its output.

Layout of a prepared directory (local or ``s3://``)::

    OUT/manifest.json                  written LAST: its presence means complete
    OUT/shards-<run>/train/unit-00000042.parquet
    OUT/shards-<run>/val/unit-00000007.parquet
    OUT/shards-<run>/tokenizer.json    copy of the tokenizer the blocks were made with

Every prepare run writes to a fresh ``shards-<run>`` prefix and publishes ``manifest.json``
(temp file + rename locally; a single PUT on S3, which is atomic) only after every shard is
written and every count is in. A crash leaves an unreferenced prefix that no reader trusts;
a re-run replaces the manifest and then removes the prefix it no longer references.

Shards hold rows ``tokens: fixed_size_list<int32>[seq_len + 1]`` and ``block_id: int64``:
the very blocks :func:`raydrat.data.build_datasets` would stream (mixing rates applied), so a
run over prepared data sees the same tokens. The val split is the one of the sampled units
(``data.val_max_units``), as in streaming mode; the manifest counts every held-out document.
"""

from __future__ import annotations

import json
import logging
import os
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray

from raydrat.config import DataConfig
from raydrat.data.errors import DataError
from raydrat.data.pipeline import (
    DatasetBundle,
    PackSpec,
    Unit,
    _unit_blocks,
    make_spec,
    plan_corpus,
    pool_size,
    sample_units,
    split_rule,
)
from raydrat.data.sources import (
    Location,
    describe_os_error,
    file_fingerprint,
    filesystem,
    fs_path,
    location_for,
    uri,
)
from raydrat.data.tokenizer import tokenizer_hash

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
MANIFEST_FORMAT = 1
COUNT_KEYS = ("docs", "empty_docs", "invalid_utf8_docs", "skipped_files", "text_bytes")
SPLIT_KEYS = ("split_docs", "tokens", "blocks", "dropped_tokens")


def _block_table(ids: list[np.ndarray], blocks: list[np.ndarray], block_len: int) -> pa.Table:
    flat = np.concatenate(blocks).reshape(-1) if blocks else np.empty(0, np.int32)
    tokens = pa.FixedSizeListArray.from_arrays(pa.array(flat, pa.int32()), block_len)
    block_id = np.concatenate(ids) if ids else np.empty(0, np.int64)
    return pa.table({"tokens": tokens, "block_id": pa.array(block_id, pa.int64())})


class ShardWriter:
    """Ray Data UDF (on an actor pool): one unit in, its shards written, one row of counts
    out (``error`` holds a DataError's message, which would lose its type crossing Ray)."""

    def __init__(self, spec: PackSpec, out_loc: Location, prefix: str, val_units: set[int]):
        self.spec, self.loc, self.prefix, self.val_units = spec, out_loc, prefix, val_units

    def _write(self, unit: Unit, split: str, counts: dict) -> str | None:
        ids, blocks = [], []
        for i, b in _unit_blocks(unit, self.spec, split, counts):
            ids.append(i)
            blocks.append(b)
        if not blocks:
            return None
        fs = filesystem(self.loc)
        path = f"{self.prefix}/{split}/unit-{unit.unit_id:08d}.parquet"
        if self.loc.kind == "local":
            fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
        pq.write_table(_block_table(ids, blocks, self.spec.block_len), path, filesystem=fs)
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
                    for _ in _unit_blocks(unit, self.spec, "val", val):
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
        old = _read_manifest(out_loc, root)
    except DataError:
        old = None
    run = f"shards-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:8]}"
    prefix = f"{root}/{run}"
    val_units = {u.unit_id for u in sample_units(plan.units, data_cfg.val_max_units)}
    ds = ray.data.from_items([u.to_row() for u in plan.units], override_num_blocks=len(plan.units))
    ds = ds.map_batches(
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
    _publish(out_loc, root, manifest)
    if old and old.get("shards") and old["shards"] != run:
        try:
            fs.delete_dir(f"{root}/{old['shards']}")
        except OSError:
            log.warning("could not remove the old shards %s/%s", out, old["shards"])
    return manifest


def _publish(loc: Location, root: str, manifest: dict) -> None:
    data = (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode()
    fs = filesystem(loc)
    if loc.kind == "local":
        tmp = f"{root}/.{MANIFEST}.tmp-{os.getpid()}"
        with fs.open_output_stream(tmp) as f:
            f.write(data)
        os.replace(tmp, f"{root}/{MANIFEST}")
    else:
        with fs.open_output_stream(f"{root}/{MANIFEST}") as f:
            f.write(data)


def _read_manifest(loc: Location, root: str) -> dict:
    name = uri(loc, f"{root}/{MANIFEST}")
    try:
        with filesystem(loc).open_input_stream(f"{root}/{MANIFEST}", compression=None) as f:
            return json.loads(f.read())
    except FileNotFoundError:
        raise DataError(
            f"{name} not found: data.prepared must point at a complete `raydrat data prepare` "
            "output (the manifest is written last; without it the output is incomplete): "
            "re-run prepare or fix data.prepared"
        ) from None
    except OSError as exc:
        raise describe_os_error(f"data.prepared = {uri(loc, root)!r}", exc) from None
    except ValueError as exc:
        raise DataError(f"{name} is not valid JSON ({exc}): re-run raydrat data prepare") from None


def read_manifest(prepared: str, endpoint_url: str | None = None) -> dict:
    """The manifest of a prepared directory (DataError if it is not complete)."""
    loc = location_for(prepared, endpoint_url)
    return _read_manifest(loc, fs_path(prepared))


def check_manifest(manifest: dict, where: str, tokenizer_sha256: str, seq_len: int) -> None:
    """Refuse a manifest that does not match the run's tokenizer or ``model.seq_len``."""
    if manifest.get("format") != MANIFEST_FORMAT:
        raise DataError(f"{where}: manifest format {manifest.get('format')} is not "
                        f"{MANIFEST_FORMAT}: re-run raydrat data prepare")
    if manifest["tokenizer_sha256"] != tokenizer_sha256:
        raise DataError(
            f"{where} was prepared with tokenizer {manifest['tokenizer_sha256'][:12]}… but the "
            f"config's tokenizer is {tokenizer_sha256[:12]}…: set data.tokenizer_path to the "
            f"copy at {manifest['tokenizer_file']} inside it, or re-run raydrat data prepare"
        )
    if manifest["seq_len"] != seq_len:
        raise DataError(
            f"{where} holds blocks for seq_len {manifest['seq_len']} but model.seq_len is "
            f"{seq_len}: set model.seq_len = {manifest['seq_len']} or re-run raydrat data prepare"
        )


def _to_numpy(batch: pa.Table, block_len: int) -> dict[str, np.ndarray]:
    col = batch.column("tokens").combine_chunks()
    tokens = col.flatten().to_numpy(zero_copy_only=False).astype(np.int32).reshape(-1, block_len)
    return {"tokens": tokens, "block_id": batch.column("block_id").to_numpy()}


def open_prepared(data_cfg: DataConfig, seq_len: int, vocab_size: int) -> DatasetBundle:
    """The train (lazy) and val (materialized) datasets of a prepared directory."""
    where = f"data.prepared = {data_cfg.prepared!r}"
    loc = location_for(data_cfg.prepared, data_cfg.prepared_endpoint_url)
    root = fs_path(data_cfg.prepared)
    manifest = _read_manifest(loc, root)
    spec, tok_path = make_spec(data_cfg, seq_len, vocab_size)
    check_manifest(manifest, where, tokenizer_hash(tok_path), seq_len)
    fs = filesystem(loc)

    def dataset(files: list[str]) -> ray.data.Dataset:
        paths = [f"{root}/{f}" for f in files]
        ds = ray.data.read_parquet(paths, filesystem=fs)
        return ds.map_batches(_to_numpy, batch_format="pyarrow", fn_kwargs={"block_len": spec.block_len})

    return DatasetBundle(
        train=dataset(manifest["train_files"]),
        val=dataset(manifest["val_files"]).materialize(),
        tokenizer_path=str(tok_path),
        tokenizer_sha256=manifest["tokenizer_sha256"],
        eod_id=spec.eod_id,
        block_len=spec.block_len,
        stats=None,
        lineage={"kind": "prepared", "prepared": data_cfg.prepared, "manifest": manifest},
    )


def iter_prepared_blocks(prepared: str, split: str, endpoint_url: str | None = None) -> Iterator[np.ndarray]:
    """The blocks of a prepared directory's ``split``, file by file, without Ray."""
    loc = location_for(prepared, endpoint_url)
    root = fs_path(prepared)
    manifest = _read_manifest(loc, root)
    for f in manifest[f"{split}_files"]:
        table = pq.read_table(f"{root}/{f}", filesystem=filesystem(loc))
        yield from _to_numpy(table, manifest["block_len"])["tokens"]


# --------------------------------------------------------------------------------------
# raydrat data tokenizer
# --------------------------------------------------------------------------------------


def sample_documents(data_cfg: DataConfig, n_docs: int) -> Iterator[str]:
    """Up to ``n_docs`` non-empty documents read from units spread evenly over every source
    (whole units, in order, until enough)."""
    from raydrat.data.pipeline import _read_documents

    plan = plan_corpus(data_cfg)
    seen = 0
    for idx in _spread(len(plan.units)):
        texts, _ = _read_documents(plan.units[idx])
        for t in texts:
            if t:
                yield t
                seen += 1
                if seen >= n_docs:
                    return


def _spread(n: int) -> list[int]:
    """0..n-1 in an order that covers the range evenly early (bit-reversal-like)."""
    order, seen = [], set()
    step = 1 << max(0, (n - 1).bit_length())
    while step:
        for i in range(0, n, step):
            if i not in seen:
                seen.add(i)
                order.append(i)
        step //= 2
    return order


def train_tokenizer_on_sources(data_cfg: DataConfig, vocab_size: int, out: str) -> dict:
    """Train a byte-level BPE on a sample of the configured sources and save it to ``out``."""
    from raydrat.data.tokenizer import train_tokenizer

    t0 = time.perf_counter()
    docs = list(sample_documents(data_cfg, data_cfg.tokenizer_sample_docs))
    if not docs:
        raise DataError("data.sources hold no non-empty documents to train a tokenizer on: "
                        "point data.sources at some text")
    tok = train_tokenizer(docs, vocab_size, out)
    return {"path": str(Path(out).absolute()), "docs": len(docs),
            "text_bytes": sum(len(d.encode()) for d in docs),
            "vocab_size": tok.get_vocab_size(with_added_tokens=True),
            "sha256": tokenizer_hash(out), "seconds": round(time.perf_counter() - t0, 1)}


