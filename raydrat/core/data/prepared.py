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
``raydrat data prepare`` (:mod:`raydrat.ray_data.prepare`).

Generations. Each prepare writes a new ``shards-<run>`` *generation* and the manifest lists
the published ones (``published``, newest first). A generation stays on storage while it is
current, among the newest ``keep`` published, or held by a live *lease*: a reader (a
training run's driver, a Tune trial) writes ``OUT/leases/<generation>.<id>.json`` when it
opens the manifest, renews it every :data:`LEASE_RENEW_S` and removes it when it exits; a
prepare holds one on the generation it is writing. A lease is live while its process runs
(same host) or, from another host, for :data:`LEASE_TTL_S` after its last renewal.
:func:`collect_garbage` (every prepare, before and after it writes; ``raydrat data gc``)
removes every other ``shards-*`` prefix: old generations nobody reads, and what a crashed
prepare left."""

from __future__ import annotations

import atexit
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from raydrat.atomic import replacing
from raydrat.core.data.errors import DataError
from raydrat.core.data.sources import (
    Location,
    describe_os_error,
    filesystem,
    fs_path,
    location_for,
    uri,
)

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
SHARDS_PREFIX = "shards-"
LEASES = "leases"
LEASE_RENEW_S = 60.0
LEASE_TTL_S = 600.0
"""A lease from another host not renewed for this long is dead (its reader crashed)."""
DEFAULT_KEEP = 2
"""Published generations a prepare keeps (the current one and the one before), leases aside."""

MANIFEST_FORMAT = 1
COUNT_KEYS = (
    "docs",
    "empty_docs",
    "invalid_utf8_docs",
    "skipped_files",
    "text_bytes",
    "corrupt_lines",
    "corrupt_bytes",
)
"""Counts of a unit's documents, the same for both splits."""
SPLIT_KEYS = ("split_docs", "tokens", "blocks", "dropped_tokens")
"""Counts of one split of a unit (``train_*``, ``val_*`` in the manifest)."""


def shard_path(prefix: str, split: str, unit_id: int) -> str:
    """Where the blocks of one split of one unit are stored under ``prefix``."""
    return f"{prefix}/{split}/unit-{unit_id:08d}.parquet"


SHARD_ROW_GROUP = 4096
"""Blocks per row group of a shard: a resumed stream reads from the row group it stopped in."""


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
        with replacing(f"{root}/{MANIFEST}") as tmp:
            tmp.write_bytes(data)
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
        raise DataError(
            f"{where}: manifest format {manifest.get('format')} is not {MANIFEST_FORMAT}: re-run raydrat data prepare"
        )
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


# --------------------------------------------------------------------------------------
# generations: leases and garbage collection
# --------------------------------------------------------------------------------------


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, someone else's
        return True
    return True


class Lease:
    """A reader's (or a writer's) claim on one generation of a prepared directory: a small
    file under ``OUT/leases/``, renewed by a daemon thread, removed by :meth:`release` or at
    interpreter exit. See the module docstring."""

    def __init__(self, loc: Location, root: str, generation: str, holder: str = ""):
        self.loc, self.root, self.generation = loc, root, generation
        self.path = f"{root}/{LEASES}/{generation}.{uuid.uuid4().hex[:12]}.json"
        self.holder = holder
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _write(self) -> None:
        record = {
            "generation": self.generation,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "holder": self.holder,
            "renewed": time.time(),
        }
        fs = filesystem(self.loc)
        if self.loc.kind == "local":
            fs.create_dir(f"{self.root}/{LEASES}", recursive=True)
        with fs.open_output_stream(self.path) as f:
            f.write(json.dumps(record).encode())

    def _renew(self) -> None:
        while not self._stop.wait(LEASE_RENEW_S):
            try:
                self._write()
            except OSError:  # storage briefly unreachable: the next renewal tries again
                pass

    @classmethod
    def acquire(cls, loc: Location, root: str, generation: str, holder: str = "", required: bool = True) -> Lease:
        """Take a lease (its renewal thread starts). ``required=False`` (a reader): when the
        lease cannot be written (read-only credentials), warn and go on without one."""
        lease = cls(loc, root, generation, holder)
        try:
            lease._write()
        except OSError as exc:
            if required:
                raise describe_os_error(f"writing the lease {uri(loc, lease.path)}", exc, loc) from None
            log.warning(
                "could not write a reader lease under %s (%s): a later `raydrat data prepare` "
                "into it may remove generation %s while this run reads it (keep it with --keep)",
                uri(loc, f"{root}/{LEASES}"),
                str(exc).splitlines()[0] if str(exc) else exc,
                generation,
            )
            lease._stop.set()
            return lease

        lease._thread = threading.Thread(target=lease._renew, name="raydrat-lease", daemon=True)
        lease._thread.start()
        atexit.register(lease.release)
        return lease

    def release(self) -> None:
        if self._stop.is_set():
            return
        self._stop.set()
        atexit.unregister(self.release)
        try:
            filesystem(self.loc).delete_file(self.path)
        except OSError:
            pass
        if self.loc.kind == "local":  # no empty leases/ directory left behind
            try:
                os.rmdir(f"{self.root}/{LEASES}")
            except OSError:
                pass

    def __reduce__(self):  # a lease belongs to the process that took it; copies hold nothing
        return (_no_lease, ())


def _no_lease():
    return None


def _lease_live(record: dict, now: float) -> bool:
    if record.get("host") == socket.gethostname() and isinstance(record.get("pid"), int):
        return _pid_alive(record["pid"])
    return now - float(record.get("renewed", 0)) < LEASE_TTL_S


def leases(loc: Location, root: str, now: float | None = None) -> dict[str, list[dict]]:
    """Live leases by generation (each record with its ``path``); dead ones are removed."""
    fs, now = filesystem(loc), time.time() if now is None else now
    try:
        infos = fs.get_file_info(pafs.FileSelector(f"{root}/{LEASES}", allow_not_found=True))
    except OSError:
        return {}
    out: dict[str, list[dict]] = {}
    for info in infos:
        if info.type != pafs.FileType.File or not info.path.endswith(".json"):
            continue
        try:
            with fs.open_input_stream(info.path, compression=None) as f:
                record = json.loads(f.read())
        except (OSError, ValueError):
            continue
        if _lease_live(record, now):
            out.setdefault(record["generation"], []).append({**record, "path": info.path})
        else:
            try:
                fs.delete_file(info.path)
            except OSError:
                pass
    return out


def generations(loc: Location, root: str) -> list[str]:
    """Every ``shards-*`` prefix under ``root``, sorted (oldest first: names start with the time)."""
    try:
        infos = filesystem(loc).get_file_info(pafs.FileSelector(root, allow_not_found=True))
    except OSError as exc:
        raise describe_os_error(uri(loc, root), exc) from None
    return sorted(
        i.base_name for i in infos if i.type == pafs.FileType.Directory and i.base_name.startswith(SHARDS_PREFIX)
    )


def collect_garbage(loc: Location, root: str, keep: int = DEFAULT_KEEP, dry_run: bool = False) -> dict[str, list[str]]:
    """Remove the generations under ``root`` that no reader can be using: all but the
    current one, the newest ``keep`` published ones and those with a live lease (an
    unpublished prefix without a live lease is what a crashed prepare left). Returns
    ``{"removed": [...], "kept": ["name (why)", ...]}``."""
    try:
        manifest = read_manifest_at(loc, root)
    except DataError:
        manifest = {}
    published = list(manifest.get("published") or ([manifest["shards"]] if manifest.get("shards") else []))
    current = manifest.get("shards")
    held = leases(loc, root)
    fs = filesystem(loc)
    removed, kept = [], []
    for gen in generations(loc, root):
        if gen == current:
            kept.append(f"{gen} (current)")
        elif gen in published[: max(keep, 1)]:
            kept.append(f"{gen} (one of the newest {keep} published)")
        elif gen in held:
            who = ", ".join(f"{r.get('holder') or 'pid'} {r['pid']} on {r['host']}" for r in held[gen])
            kept.append(f"{gen} (leased by {who})")
        else:
            if not dry_run:
                try:
                    fs.delete_dir(f"{root}/{gen}")
                except OSError as exc:
                    kept.append(f"{gen} (could not be removed: {exc})")
                    continue
            removed.append(gen)
    return {"removed": removed, "kept": kept}
