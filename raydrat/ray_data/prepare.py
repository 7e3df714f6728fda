"""Prepare once, train many times: ``raydrat data prepare`` writes the core blocks of every
unit as parquet shards on a Ray Data actor pool, then publishes the manifest (format and
layout: :mod:`raydrat.core.data.prepared`).

The output location is checked first (the bucket exists, a probe object can be written), so
a wrong ``--out`` fails before any work. Every prepare run writes to a fresh ``shards-<run>``
prefix (a *generation*, held by a lease while it is written) and publishes
``manifest.json`` only after every shard is written and every count is in. A prepare that
fails removes its own prefix; one that was killed leaves a prefix that no reader trusts and
the next prepare removes. Older generations are removed only when no reader can be using
them: the newest ``keep`` published ones and any a running reader holds a lease on stay
(:func:`raydrat.core.data.prepared.collect_garbage`, also ``raydrat data gc``).

Shards hold the very blocks :func:`raydrat.ray_data.datasets.build_datasets` would stream
(mixing rates applied), so a run over prepared data sees the same tokens. The val split is
the one of the sampled units (``data.val_max_units``), as in streaming mode; the manifest
counts every held-out document.
"""

from __future__ import annotations

import logging
import socket
import time
import uuid
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray

from raydrat.config import DataConfig
from raydrat.core.data.blocks import VAL_TOKENS_PER_UNIT, unit_runs
from raydrat.core.data.errors import DataError
from raydrat.core.data.mixing import with_measured_rates
from raydrat.core.data.plan import Unit, plan_corpus, sample_units
from raydrat.core.data.prepared import (
    COUNT_KEYS,
    DEFAULT_KEEP,
    MANIFEST_FORMAT,
    SHARD_ROW_GROUP,
    SPLIT_KEYS,
    Lease,
    block_table,
    collect_garbage,
    publish_manifest,
    read_manifest_at,
    shard_path,
)
from raydrat.core.data.sources import (
    Location,
    check_writable,
    describe_os_error,
    file_fingerprint,
    filesystem,
    fs_path,
    location_for,
)
from raydrat.core.data.spec import PackSpec, make_spec
from raydrat.core.data.split import split_rule
from raydrat.core.data.tokenizer import tokenizer_hash
from raydrat.core.exceptions import walk_exceptions
from raydrat.ray_data.stream import pool_size, scan_sample, units_dataset

log = logging.getLogger(__name__)


class ShardWriter:
    """Ray Data UDF (on an actor pool): one unit in, its shards written, one row of counts
    out (``error`` holds a DataError's message, which would lose its type crossing Ray)."""

    def __init__(self, spec: PackSpec, out_loc: Location, prefix: str, val_units: set[int]):
        self.spec, self.loc, self.prefix, self.val_units = spec, out_loc, prefix, val_units

    def _write(self, unit: Unit, split: str, counts: dict) -> str | None:
        """The unit's blocks of ``split`` written as they are made (a chunk at a time, in row
        groups of :data:`~raydrat.core.data.prepared.SHARD_ROW_GROUP`): memory stays bounded
        whatever the unit holds. ``None`` when it holds none."""
        fs = filesystem(self.loc)
        path = shard_path(self.prefix, split, unit.unit_id)
        writer = None
        max_tokens = VAL_TOKENS_PER_UNIT if split == "val" else None
        try:
            for run in unit_runs(unit, self.spec, split, counts=counts, max_tokens=max_tokens):
                table = block_table([run.ids], [run.blocks], self.spec.block_len)
                if writer is None:
                    if self.loc.kind == "local":
                        fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
                    writer = pq.ParquetWriter(path, table.schema, filesystem=fs)
                writer.write_table(table, row_group_size=SHARD_ROW_GROUP)
        finally:
            if writer is not None:
                writer.close()
        return path if writer is not None else None

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
                    for _ in unit_runs(unit, self.spec, "val", counts=val):
                        pass
                    val_path = None
                out.update({k: train[k] for k in COUNT_KEYS})
                out.update({f"train_{k}": train[k] for k in SPLIT_KEYS})
                out.update({f"val_{k}": val[k] for k in SPLIT_KEYS})
                out.update(
                    train_path=train_path or "",
                    val_path=val_path or "",
                    val_stored_blocks=val["blocks"] if val_path else 0,
                )
            except DataError as exc:
                out["error"] = str(exc)
            rows.append(out)
        keys = sorted({k for r in rows for k in r})
        return {k: np.array([r.get(k, 0) for r in rows]) for k in keys}


def prepare(
    data_cfg: DataConfig,
    seq_len: int,
    vocab_size: int,
    out: str,
    endpoint_url: str | None = None,
    keep: int = DEFAULT_KEEP,
) -> dict:
    """Tokenize and pack the configured sources into ``out``; return the manifest. ``keep``:
    published generations kept (beyond those a running reader holds)."""
    t0 = time.perf_counter()
    out_loc = location_for(out, endpoint_url)
    root = fs_path(out)
    check_writable(out_loc, root, f"--out {out}")  # before any work
    spec, tok_path = make_spec(data_cfg, seq_len, vocab_size)
    plan = plan_corpus(data_cfg)
    corpus = ", ".join(s.path for s in data_cfg.sources)
    if plan.rows == 0:
        raise DataError(f"corpus {corpus} holds no documents: point data.sources at some text")
    if any(s.weight for s in data_cfg.sources):  # weights met in tokens: measured on the sample
        sample = units_dataset(sample_units(plan.units, data_cfg.val_max_units))
        plan = with_measured_rates(data_cfg, plan, scan_sample(sample, spec, len(plan.units), 0)[1])
    fs = filesystem(out_loc)
    try:
        old = read_manifest_at(out_loc, root)
    except DataError:
        old = None
    cleaned = collect_garbage(out_loc, root, keep)["removed"]  # what crashed prepares left
    if cleaned:
        log.info("removed %d unreferenced shard prefix(es) of %s: %s", len(cleaned), out, ", ".join(cleaned))
    run = f"shards-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:8]}"
    prefix = f"{root}/{run}"
    lease = Lease.acquire(out_loc, root, run, holder=f"raydrat data prepare on {socket.gethostname()}")
    try:
        manifest = _write_generation(
            data_cfg, spec, tok_path, plan, corpus, out, out_loc, root, run, old, seq_len, vocab_size, keep, t0
        )
    except BaseException:  # nothing half-written: the prefix of a failed prepare goes
        try:
            fs.delete_dir(prefix)
        except OSError:
            pass
        raise
    finally:
        lease.release()
    removed = collect_garbage(out_loc, root, keep)["removed"]
    if removed:
        log.info("removed %d old generation(s) of %s no reader holds: %s", len(removed), out, ", ".join(removed))
    return manifest


def _write_generation(
    data_cfg: DataConfig,
    spec: PackSpec,
    tok_path: Path,
    plan,
    corpus: str,
    out: str,
    out_loc: Location,
    root: str,
    run: str,
    old: dict | None,
    seq_len: int,
    vocab_size: int,
    keep: int,
    t0: float,
) -> dict:
    """Write generation ``run`` of ``out`` and publish its manifest (the shards, then the
    counts, then the manifest, last)."""
    fs = filesystem(out_loc)
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
    except OSError as exc:  # Ray's copy of a worker's error: describe the worker's own
        cause = next((e for e in walk_exceptions(exc) if not type(e).__module__.startswith("ray")), exc)
        raise describe_os_error(f"writing {out}", cause, out_loc) from None
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
        raise DataError(
            f"corpus {corpus}: all {counts['empty_docs']} documents are empty: "
            "point data.sources at some text (nothing was published)"
        )
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
        "train_files": [r["train_path"][len(root) + 1 :] for r in rows if r["train_path"]],
        "val_files": [r["val_path"][len(root) + 1 :] for r in rows if r["val_path"]],
        "tokenizer_sha256": tokenizer_hash(tok_path),
        "tokenizer_file": f"{run}/tokenizer.json",
        "vocab_size": vocab_size,
        "eod_id": spec.eod_id,
        "seq_len": seq_len,
        "block_len": spec.block_len,
        "pack_rows": data_cfg.pack_rows,
        "split": split_rule(data_cfg),
        "sources": [
            {
                **s.model_dump(mode="json"),
                "text_bytes": total("text_bytes", i),
                "mixing_rate": next((u.rate for u in plan.units if u.source == i), 1.0),
                "docs": total("docs", i),
                "train_tokens": total("train_tokens", i),
                "train_blocks": total("train_blocks", i),
            }
            for i, s in enumerate(data_cfg.sources)
        ],
        "files": [file_fingerprint(loc, info) for loc, info in plan.files],
        "counts": counts,
        "skipped": {
            "empty_docs": counts["empty_docs"],
            "corrupt_files": plan.skipped_files
            + (
                []
                if not counts["skipped_files"] - len(plan.skipped_files)
                else ["(gzip files skipped while reading; see counts.skipped_files)"]
            ),
            "packing_group_tails_tokens": counts["train_dropped_tokens"] + counts["val_dropped_tokens"],
        },
        "replaced": {"invalid_utf8_docs": counts["invalid_utf8_docs"]},
        "seconds": round(time.perf_counter() - t0, 1),
    }
    previous = (old or {}).get("published") or ([old["shards"]] if old and old.get("shards") else [])
    manifest["published"] = [run, *(g for g in previous if g != run)][: max(keep, 1)]
    publish_manifest(out_loc, root, manifest)
    return manifest
