"""The prepared format, read and written without Ray. Layout of a prepared directory (local
or ``s3://``)::

    OUT/manifest.json                  written LAST: its presence means complete
    OUT/shards-<run>/train/unit-00000042.parquet
    OUT/shards-<run>/val/unit-00000007.parquet
    OUT/shards-<run>/tokenizer.json    copy of the tokenizer the blocks were made with

Shards hold rows ``tokens: fixed_size_list<int32>[seq_len + 1]`` and ``block_id: int64``
(:func:`block_table`, :func:`table_blocks`). The manifest is published by
:func:`publish_manifest` (temp file + rename locally; a single PUT on S3, which is atomic);
:func:`check_manifest` refuses one that does not match the run. Writing the shards is
``raydrat data prepare`` (:mod:`raydrat.ray_data.prepare`)."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from raydrat.core.data.errors import DataError
from raydrat.core.data.sources import (
    Location,
    describe_os_error,
    filesystem,
    fs_path,
    location_for,
    uri,
)

MANIFEST = "manifest.json"
MANIFEST_FORMAT = 1
COUNT_KEYS = ("docs", "empty_docs", "invalid_utf8_docs", "skipped_files", "text_bytes")
"""Counts of a unit's documents, the same for both splits."""
SPLIT_KEYS = ("split_docs", "tokens", "blocks", "dropped_tokens")
"""Counts of one split of a unit (``train_*``, ``val_*`` in the manifest)."""


def shard_path(prefix: str, split: str, unit_id: int) -> str:
    """Where the blocks of one split of one unit are stored under ``prefix``."""
    return f"{prefix}/{split}/unit-{unit_id:08d}.parquet"


def block_table(ids: list[np.ndarray], blocks: list[np.ndarray], block_len: int) -> pa.Table:
    """A shard: ``(block_ids, blocks)`` pieces as one table of ``tokens`` and ``block_id``."""
    flat = np.concatenate(blocks).reshape(-1) if blocks else np.empty(0, np.int32)
    tokens = pa.FixedSizeListArray.from_arrays(pa.array(flat, pa.int32()), block_len)
    block_id = np.concatenate(ids) if ids else np.empty(0, np.int64)
    return pa.table({"tokens": tokens, "block_id": pa.array(block_id, pa.int64())})


def table_blocks(batch: pa.Table, block_len: int) -> dict[str, np.ndarray]:
    """A shard's (or a batch of it) rows as ``tokens: int32[n, block_len]`` and ``block_id``."""
    col = batch.column("tokens").combine_chunks()
    tokens = col.flatten().to_numpy(zero_copy_only=False).astype(np.int32).reshape(-1, block_len)
    return {"tokens": tokens, "block_id": batch.column("block_id").to_numpy()}


def publish_manifest(loc: Location, root: str, manifest: dict) -> None:
    """Write ``root/manifest.json`` atomically: the prepared directory is complete from now on."""
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


def read_manifest_at(loc: Location, root: str) -> dict:
    """The manifest under ``root`` of ``loc`` (DataError if it is missing or unreadable)."""
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
    return read_manifest_at(loc, fs_path(prepared))


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


def iter_prepared_blocks(prepared: str, split: str, endpoint_url: str | None = None) -> Iterator[np.ndarray]:
    """The blocks of a prepared directory's ``split``, file by file, without Ray."""
    loc = location_for(prepared, endpoint_url)
    root = fs_path(prepared)
    manifest = read_manifest_at(loc, root)
    for f in manifest[f"{split}_files"]:
        table = pq.read_table(f"{root}/{f}", filesystem=filesystem(loc))
        yield from table_blocks(table, manifest["block_len"])["tokens"]
