"""Ray Data pipeline: documents → tokens → packed ``seq_len + 1`` blocks, split train/val.

**Plan** (driver, metadata only). Sources resolve to files, files to *units* of work: one
parquet row group, or ``data.pack_rows`` plain-text files (one document per file, ``.gz``
decompressed). Parquet schemas are checked here, so a missing text column fails before any
work starts.

**Per unit** (one Ray task, independent of every other unit):

1. Read the documents in file order. Empty ones (``""`` or null) are skipped and counted.
2. Split: a document goes to val when ``blake2b(text, key=split_seed)`` read as a number in
   [0, 1) is below ``data.val_fraction``. The split depends on the text alone: disjoint by
   construction, identical across runs, clusters and configs, and duplicated documents land on
   the same side.
3. Pack: each split's documents, in order, form packing groups of ``data.pack_rows``
   documents. A group is tokenized (``encode_batch``, ``data.tokenize_batch_size`` documents
   at a time), joined with the end-of-document token after each document, and cut into
   blocks of ``seq_len + 1`` tokens. The group's final partial block (fewer than
   ``seq_len + 1`` tokens) is dropped and counted; groups never span units.

Because a unit's blocks depend only on its data and the config, never on Ray's block sizes,
batch boundaries or execution order, :func:`iter_blocks_local` reproduces them exactly
without Ray. Rows are ``{"tokens": int32[seq_len + 1], "block_id": int64}`` with
``block_id = unit_id << 32 | index of the block within its unit and split``.

:func:`build_datasets` runs one cheap scan (reads everything, tokenizes only the val
documents) to check the corpus and count it, materializes the small val split in the object
store (evaluation re-reads it) and leaves train lazy: it streams while training runs.
"""

from __future__ import annotations

import glob
import gzip
import hashlib
import logging
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, fields
from functools import lru_cache
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray
from tokenizers import Tokenizer

from raydrat.config import DataConfig, SourceConfig
from raydrat.data.demo import CORPUS_DIR, TOKENIZER_FILE, build_demo_corpus, ensure_demo_corpus
from raydrat.data.errors import DataError
from raydrat.data.tokenizer import load_tokenizer, special_ids, tokenizer_from_str, tokenizer_hash

log = logging.getLogger(__name__)

Split = Literal["train", "val"]
DEMO_SOURCE = "demo"


# --------------------------------------------------------------------------------------
# packing (pure)
# --------------------------------------------------------------------------------------


def pack_tokens(
    docs: Sequence[Sequence[int]], eod_id: int, block_len: int
) -> tuple[list[list[int]], int]:
    """Concatenate ``docs``, each followed by ``eod_id``, and cut the stream into blocks of
    ``block_len`` tokens. Returns ``(blocks, leftover)``: the ``leftover`` tokens at the end
    of the stream, too few for a block, are dropped."""
    blocks, leftover = _pack(docs, eod_id, block_len)
    return blocks.tolist(), leftover


def _pack(docs: Sequence[Sequence[int]], eod_id: int, block_len: int) -> tuple[np.ndarray, int]:
    """:func:`pack_tokens` as an ``int32`` array of shape ``(n_blocks, block_len)``."""
    stream = np.empty(sum(len(d) + 1 for d in docs), dtype=np.int32)
    pos = 0
    for doc in docs:
        stream[pos : pos + len(doc)] = doc
        pos += len(doc)
        stream[pos] = eod_id
        pos += 1
    n_blocks = len(stream) // block_len
    return stream[: n_blocks * block_len].reshape(n_blocks, block_len), len(stream) % block_len


# --------------------------------------------------------------------------------------
# sources → files → units
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Unit:
    """One task's worth of documents: a parquet row group, or a few text files."""

    unit_id: int
    format: Literal["parquet", "text"]
    files: tuple[str, ...]
    row_group: int  # parquet only; -1 for text
    text_column: str

    def to_row(self) -> dict:
        return {**asdict(self), "files": list(self.files)}

    @classmethod
    def from_row(cls, row: dict) -> Unit:
        return cls(**{**row, "files": tuple(row["files"])})


def resolve_sources(cfg: DataConfig) -> list[str]:
    """Absolute paths of every input file, source by source, each source's files sorted.
    ``path: demo`` builds the demo corpus first if it is missing."""
    return [
        f for i, src in enumerate(cfg.sources) for f in _source_files(_resolve_demo(src, cfg), i)
    ]


def _resolve_demo(src: SourceConfig, cfg: DataConfig) -> SourceConfig:
    if src.path != DEMO_SOURCE:
        return src
    demo_dir = Path(cfg.demo_dir).absolute()
    ensure_demo_corpus(demo_dir)
    return src.model_copy(update={"path": str(demo_dir / CORPUS_DIR), "format": "parquet"})


def _source_files(src: SourceConfig, index: int) -> list[str]:
    where = f"data.sources[{index}].path = {src.path!r}"
    if "://" in src.path:
        raise DataError(
            f"{where}: remote paths are not supported yet; use a local file, directory or glob"
        )
    path = Path(src.path).expanduser()
    if any(ch in src.path for ch in "*?["):
        files = [Path(p) for p in sorted(glob.glob(str(path), recursive=True))]
    elif path.is_dir():
        pattern = "*.parquet" if src.format == "parquet" else "*"
        files = sorted(p for p in path.rglob(pattern) if not _hidden(p.relative_to(path)))
    elif path.exists():
        files = [path]
    else:
        raise DataError(
            f"{where}: {path.absolute()} does not exist: fix data.sources, or use "
            "`path: demo` (`raydrat data demo` builds the demo corpus)"
        )
    files = [p for p in files if p.is_file()]
    if not files:
        raise DataError(f"{where} matches no {src.format} files: fix data.sources")
    return [str(p.absolute()) for p in files]


def _hidden(rel: Path) -> bool:
    """Dot files and ``_``-files (``_SUCCESS``, ``.crc``) written beside data by Spark & co."""
    return any(part.startswith((".", "_")) for part in rel.parts)


def _parquet_row_groups(path: str, column: str, index: int) -> list[int]:
    """Non-empty row groups of ``path`` after checking that ``column`` holds strings."""
    try:
        pf = pq.ParquetFile(path)
    except Exception as exc:  # pyarrow raises several types for unreadable files
        raise DataError(
            f"{path} is not a readable parquet file ({exc}): fix or remove it"
        ) from None
    schema = pf.schema_arrow
    key = f"data.sources[{index}].text_column"
    if column not in schema.names:
        raise DataError(
            f"{path} has no column {column!r} (columns: {', '.join(schema.names)}): set {key}"
        )
    typ = schema.field(column).type
    if not (pa.types.is_string(typ) or pa.types.is_large_string(typ)):
        raise DataError(
            f"column {column!r} of {path} is {typ}, not text: set {key} to a string column"
        )
    meta = pf.metadata
    return [rg for rg in range(meta.num_row_groups) if meta.row_group(rg).num_rows > 0]


def plan_units(cfg: DataConfig) -> list[Unit]:
    """The units of work of every source, in a fixed order (their index is ``unit_id``)."""
    if len({src.weight for src in cfg.sources}) > 1:
        raise DataError(
            "data.sources weights differ: mixing sources by weight is not supported yet; "
            "give every source the same weight"
        )
    units: list[Unit] = []
    for i, src in enumerate(cfg.sources):
        src = _resolve_demo(src, cfg)
        files = _source_files(src, i)
        if src.format == "parquet":
            for f in files:
                for rg in _parquet_row_groups(f, src.text_column, i):
                    units.append(Unit(len(units), "parquet", (f,), rg, src.text_column))
        else:
            for start in range(0, len(files), cfg.pack_rows):
                chunk = tuple(files[start : start + cfg.pack_rows])
                units.append(Unit(len(units), "text", chunk, -1, src.text_column))
    return units


def _read_documents(unit: Unit) -> list[str | None]:
    if unit.format == "parquet":
        table = pq.ParquetFile(unit.files[0]).read_row_group(
            unit.row_group, columns=[unit.text_column]
        )
        return table.column(0).to_pylist()
    return [_read_text_file(f) for f in unit.files]


def _read_text_file(path: str) -> str:
    raw = Path(path).read_bytes()
    if path.endswith(".gz"):
        raw = gzip.decompress(raw)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(
            f"{path} is not UTF-8 text ({exc.reason} at byte {exc.start}): convert it or "
            "leave it out of data.sources"
        ) from None


# --------------------------------------------------------------------------------------
# per-unit work: split, tokenize, pack
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PackSpec:
    """Everything a worker needs to turn a unit into blocks (sent to Ray tasks)."""

    tokenizer_json: str
    eod_id: int
    block_len: int
    val_fraction: float
    split_seed: int
    pack_rows: int
    tokenize_batch_size: int


def is_val_document(text: str, split_seed: int, val_fraction: float) -> bool:
    """The split rule: a keyed hash of the text, as a fraction of 2**64, below
    ``val_fraction``."""
    key = split_seed.to_bytes(8, "little", signed=True)
    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8, key=key).digest()
    return int.from_bytes(digest, "little") < val_fraction * 2**64


def _split_documents(texts: list[str | None], spec: PackSpec) -> tuple[dict[Split, list[str]], int]:
    """Non-empty documents of each split, in order, and the number of empty ones."""
    docs: dict[Split, list[str]] = {"train": [], "val": []}
    for text in texts:
        if text:
            val = is_val_document(text, spec.split_seed, spec.val_fraction)
            docs["val" if val else "train"].append(text)
    return docs, sum(1 for t in texts if not t)


@lru_cache(maxsize=2)
def _tokenizer(tokenizer_json: str) -> Tokenizer:
    """Parsed once per worker process (Ray reuses workers across tasks)."""
    return tokenizer_from_str(tokenizer_json)


def _encode(tok: Tokenizer, texts: list[str], batch_size: int) -> list[list[int]]:
    # encode_batch_fast (tokenizers >= 0.21) is encode_batch without character offsets.
    encode = getattr(tok, "encode_batch_fast", tok.encode_batch)
    return [
        e.ids for i in range(0, len(texts), batch_size) for e in encode(texts[i : i + batch_size])
    ]


def _pack_groups(docs: list[str], spec: PackSpec) -> Iterator[tuple[np.ndarray, int]]:
    """``(blocks, leftover)`` for each packing group of ``docs``."""
    tok = _tokenizer(spec.tokenizer_json)
    for start in range(0, len(docs), spec.pack_rows):
        ids = _encode(tok, docs[start : start + spec.pack_rows], spec.tokenize_batch_size)
        yield _pack(ids, spec.eod_id, spec.block_len)


def _unit_blocks(
    unit: Unit, spec: PackSpec, split: Split
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """``(block_ids, blocks)`` of one split of one unit, a packing group at a time."""
    docs, _ = _split_documents(_read_documents(unit), spec)
    first = 0
    for blocks, _ in _pack_groups(docs[split], spec):
        if len(blocks):
            yield (unit.unit_id << 32) + first + np.arange(len(blocks), dtype=np.int64), blocks
            first += len(blocks)


def _has_block(docs: list[str], spec: PackSpec) -> bool:
    """Whether ``docs`` pack into at least one block, tokenizing only as far as needed."""
    tok = _tokenizer(spec.tokenizer_json)
    for start in range(0, len(docs), spec.pack_rows):
        n = 0
        for doc in docs[start : start + spec.pack_rows]:
            n += len(tok.encode(doc).ids) + 1
            if n >= spec.block_len:
                return True
    return False


@dataclass(frozen=True)
class DataStats:
    """What the scan counted. Tokens include one end-of-document token per document. Train
    is lazy, so its tokens and blocks are not counted; val's ``val_dropped_tokens`` shows
    what packing drops (the tail of every packing group)."""

    units: int
    """Units of work (parquet row groups, groups of text files)."""
    docs: int
    """Non-empty documents (both splits)."""
    empty_docs: int
    """Empty or null documents, skipped."""
    text_bytes: int
    """UTF-8 bytes of the non-empty documents."""
    val_docs: int
    val_tokens: int
    """Tokens of the val documents, one end-of-document token each included."""
    val_blocks: int
    val_dropped_tokens: int
    """``val_tokens - val_blocks * (seq_len + 1)``: the tails of val's packing groups."""
    train_has_block: bool
    """Whether train packs into at least one block (checked, not counted)."""

    @property
    def train_docs(self) -> int:
        return self.docs - self.val_docs


def _scan_unit(unit: Unit, spec: PackSpec) -> dict[str, int | str]:
    """One unit's :class:`DataStats` counts, or its DataError's message under ``error``
    (exceptions lose their type on the way out of a Ray task; this keeps the message)."""
    try:
        texts = _read_documents(unit)
    except DataError as exc:
        zeros = {f.name: 0 for f in fields(DataStats)}
        return {**zeros, "unit_id": unit.unit_id, "error": str(exc), "train_has_block": False}
    docs, empty = _split_documents(texts, spec)
    val_blocks = val_dropped = 0
    for blocks, leftover in _pack_groups(docs["val"], spec):
        val_blocks += len(blocks)
        val_dropped += leftover
    return {
        "unit_id": unit.unit_id,
        "error": "",
        "units": 1,
        "docs": len(docs["train"]) + len(docs["val"]),
        "empty_docs": empty,
        "text_bytes": sum(len(t.encode("utf-8")) for t in texts if t),
        "val_docs": len(docs["val"]),
        "val_tokens": val_blocks * spec.block_len + val_dropped,
        "val_blocks": val_blocks,
        "val_dropped_tokens": val_dropped,
        "train_has_block": _has_block(docs["train"], spec),
    }


# Ray Data UDFs: a batch is a pyarrow table of unit rows (batch_size=1: one unit per call).


def _scan_batch(batch: pa.Table, spec: PackSpec) -> dict[str, np.ndarray]:
    rows = [_scan_unit(Unit.from_row(r), spec) for r in batch.to_pylist()]
    return {k: np.array([r[k] for r in rows]) for k in rows[0]}


def _pack_batch(batch: pa.Table, spec: PackSpec, split: Split) -> Iterator[dict[str, np.ndarray]]:
    for row in batch.to_pylist():
        for block_ids, blocks in _unit_blocks(Unit.from_row(row), spec, split):
            yield {"tokens": blocks, "block_id": block_ids}


# --------------------------------------------------------------------------------------
# entry points
# --------------------------------------------------------------------------------------


@dataclass
class DatasetBundle:
    train: ray.data.Dataset
    """Lazy: rows ``{"tokens": int32[seq_len + 1], "block_id": int64}``, order not fixed."""
    val: ray.data.Dataset
    """Same rows, materialized in the object store."""
    tokenizer_path: str
    tokenizer_sha256: str
    eod_id: int
    block_len: int
    stats: DataStats


def resolve_tokenizer_path(data_cfg: DataConfig, vocab_size: int) -> Path:
    """``data.tokenizer_path``, or the demo tokenizer (trained on first use)."""
    if data_cfg.tokenizer_path:
        return Path(data_cfg.tokenizer_path).expanduser().absolute()
    return build_demo_corpus(data_cfg.demo_dir, vocab_size) / TOKENIZER_FILE


def _plan(data_cfg: DataConfig, seq_len: int, vocab_size: int) -> tuple[list[Unit], PackSpec, Path]:
    tok_path = resolve_tokenizer_path(data_cfg, vocab_size)
    tok = load_tokenizer(tok_path, vocab_size)
    spec = PackSpec(
        tokenizer_json=tok.to_str(),
        eod_id=special_ids(tok, str(tok_path))[0],
        block_len=seq_len + 1,
        val_fraction=data_cfg.val_fraction,
        split_seed=data_cfg.split_seed,
        pack_rows=data_cfg.pack_rows,
        tokenize_batch_size=data_cfg.tokenize_batch_size,
    )
    return plan_units(data_cfg), spec, tok_path


def iter_blocks_local(
    data_cfg: DataConfig, seq_len: int, vocab_size: int, split: Split
) -> Iterator[np.ndarray]:
    """The blocks of ``split`` (``int32[seq_len + 1]`` each), computed in this process without
    Ray: the same blocks as :func:`build_datasets`, in unit order."""
    units, spec, _ = _plan(data_cfg, seq_len, vocab_size)
    for unit in units:
        for _, blocks in _unit_blocks(unit, spec, split):
            yield from blocks


def build_datasets(data_cfg: DataConfig, seq_len: int, vocab_size: int) -> DatasetBundle:
    """Plan the corpus, scan and check it, and return the train (lazy) and val
    (materialized) datasets of ``seq_len + 1`` token blocks."""
    units, spec, tok_path = _plan(data_cfg, seq_len, vocab_size)
    corpus = ", ".join(src.path for src in data_cfg.sources)
    if not units:
        raise DataError(
            f"corpus {corpus} produced no blocks of seq_len+1 = {spec.block_len} tokens: "
            "it holds no documents; point data.sources at some text"
        )
    ds = ray.data.from_items([u.to_row() for u in units], override_num_blocks=len(units))
    stats = _scan(_map_units(ds, _scan_batch, spec))
    _check(stats, spec, corpus, data_cfg.val_fraction)
    log.info(
        "data: %d documents (%d empty skipped), %.1f MB in %d units; val: %d documents, %d "
        "blocks, %.1f%% of its tokens dropped at packing-group ends",
        stats.docs,
        stats.empty_docs,
        stats.text_bytes / 1e6,
        stats.units,
        stats.val_docs,
        stats.val_blocks,
        100 * stats.val_dropped_tokens / max(stats.val_tokens, 1),
    )
    return DatasetBundle(
        train=_map_units(ds, _pack_batch, spec, split="train"),
        val=_map_units(ds, _pack_batch, spec, split="val").materialize(),
        tokenizer_path=str(tok_path),
        tokenizer_sha256=tokenizer_hash(tok_path),
        eod_id=spec.eod_id,
        block_len=spec.block_len,
        stats=stats,
    )


def _map_units(ds: ray.data.Dataset, fn, spec: PackSpec, **kwargs) -> ray.data.Dataset:
    """``fn`` over the unit rows, one unit per task (tasks, not actors: nothing holds CPUs
    once the data is produced; the tokenizer is parsed once per worker process)."""
    return ds.map_batches(
        fn, batch_size=1, batch_format="pyarrow", fn_kwargs={"spec": spec, **kwargs}
    )


def _scan(ds: ray.data.Dataset) -> DataStats:
    rows = sorted(ds.take_all(), key=lambda r: r["unit_id"])
    errors = [r["error"] for r in rows if r["error"]]
    if errors:
        raise DataError(errors[0])
    counts = [f.name for f in fields(DataStats) if f.name != "train_has_block"]
    return DataStats(
        **{k: int(sum(r[k] for r in rows)) for k in counts},
        train_has_block=any(r["train_has_block"] for r in rows),
    )


def _check(stats: DataStats, spec: PackSpec, corpus: str, val_fraction: float) -> None:
    no_blocks = f"corpus {corpus} produced no blocks of seq_len+1 = {spec.block_len} tokens"
    if stats.docs == 0:
        raise DataError(
            f"{no_blocks}: all {stats.empty_docs} documents are empty; "
            "point data.sources at some text"
        )
    if stats.val_blocks == 0 and not stats.train_has_block:
        raise DataError(
            f"{no_blocks}: its {stats.docs} documents are too short; "
            "add text or lower model.seq_len"
        )
    if stats.val_blocks == 0:
        raise DataError(
            f"corpus {corpus} is too small to hold out a validation block with "
            f"data.val_fraction = {val_fraction} ({stats.val_docs} of {stats.docs} documents, "
            f"{stats.val_tokens} tokens < {spec.block_len}): raise data.val_fraction, "
            "add documents or lower model.seq_len"
        )
    if not stats.train_has_block:
        raise DataError(
            f"corpus {corpus} leaves no training block after holding out data.val_fraction = "
            f"{val_fraction}: lower data.val_fraction or add documents"
        )
