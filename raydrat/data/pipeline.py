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

:func:`build_datasets` checks the corpus cheaply before training: metadata for every file
(listings, parquet footers), then a read of at most ``data.val_max_units`` units spread over
the corpus, which also hold the (materialized, bounded) val split. Train stays lazy: it
streams through a tokenizer actor pool while training runs, and a :class:`DataCounter`
actor counts what each epoch read. Weighted mixing repeats or skips training blocks by a
per-source rate (see :func:`_mixing_rates`).
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import ray
from tokenizers import Tokenizer

from raydrat.config import DataConfig, SourceConfig
from raydrat.data.demo import CORPUS_DIR, build_demo_corpus, ensure_demo_corpus, tokenizer_file
from raydrat.data.errors import DataError
from raydrat.data.sources import (
    CorruptFile,
    Location,
    decode,
    describe_os_error,
    filesystem,
    list_files,
    location_for,
    read_bytes,
    text_size,
    uri,
)
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
    """One task's worth of documents: a parquet row group, a few text files (``file``
    mode), or one text file (``line`` mode)."""

    unit_id: int
    source: int
    format: Literal["parquet", "text"]
    files: tuple[str, ...]
    row_group: int  # parquet only; -1 for text
    text_column: str
    text_mode: str
    loc: Location
    rate: float = 1.0
    """Training blocks of this unit are emitted ``rate`` times on average (weighted mixing)."""

    def to_row(self) -> dict:
        return {**asdict(self), "files": list(self.files), "loc": asdict(self.loc)}

    @classmethod
    def from_row(cls, row: dict) -> Unit:
        return cls(**{**row, "files": tuple(row["files"]), "loc": Location(**row["loc"])})


@dataclass
class Plan:
    """What the driver learns from metadata alone."""

    units: list[Unit]
    files: list[tuple[Location, pafs.FileInfo]]
    source_bytes: list[int]
    """Estimated text bytes per source (parquet: uncompressed column size)."""
    skipped_files: list[str]
    """Unreadable files left out (``data.on_corrupt = skip``), with the reason."""
    rows: int
    """Rows (parquet) or files (text) in the plan; 0 means the corpus holds nothing."""


def resolve_sources(cfg: DataConfig) -> list[str]:
    """Every input file (as a path or ``s3://`` URI), source by source, each source's files
    sorted. ``path: demo`` builds the demo corpus first if it is missing."""
    return [uri(loc, info.path) for loc, info in plan_corpus(cfg).files]


def _resolve_demo(src: SourceConfig, cfg: DataConfig) -> SourceConfig:
    if src.path != DEMO_SOURCE:
        return src
    demo_dir = Path(cfg.demo_dir).absolute()
    ensure_demo_corpus(demo_dir)
    return src.model_copy(update={"path": str(demo_dir / CORPUS_DIR), "format": "parquet"})


def _parquet_row_groups(
    loc: Location, path: str, column: str, index: int
) -> list[tuple[int, int, int]]:
    """``(row group, rows, text bytes)`` of the non-empty row groups of ``path`` after
    checking that ``column`` holds strings. An unreadable file raises CorruptFile."""
    name = uri(loc, path)
    try:
        pf = pq.ParquetFile(filesystem(loc).open_input_file(path))
        schema = pf.schema_arrow
        meta = pf.metadata
    except OSError as exc:
        if "parquet" in str(exc).lower() or "magic" in str(exc).lower():
            raise CorruptFile(f"{name} is not a readable parquet file ({exc})") from None
        raise describe_os_error(name, exc) from None
    except Exception as exc:  # pyarrow raises several types for unreadable files
        raise CorruptFile(f"{name} is not a readable parquet file ({exc})") from None
    key = f"data.sources[{index}].text_column"
    if column not in schema.names:
        raise DataError(
            f"{name} has no column {column!r} (columns: {', '.join(schema.names)}): set {key}"
        )
    typ = schema.field(column).type
    if not (pa.types.is_string(typ) or pa.types.is_large_string(typ)):
        raise DataError(
            f"column {column!r} of {name} is {typ}, not text: set {key} to a string column"
        )
    out = []
    for rg in range(meta.num_row_groups):
        g = meta.row_group(rg)
        if g.num_rows > 0:
            leaf = next((g.column(c) for c in range(g.num_columns) if g.column(c).path_in_schema.split(".")[0] == column), None)
            size = leaf.total_uncompressed_size if leaf is not None else g.total_byte_size
            out.append((rg, g.num_rows, size))
    return out


def plan_corpus(cfg: DataConfig) -> Plan:
    """The units of work of every source, in a fixed order (their index is ``unit_id``),
    from metadata only (listings, parquet footers, gzip trailers)."""
    raw: list[tuple[int, dict]] = []
    files: list[tuple[Location, pafs.FileInfo]] = []
    sizes = [0] * len(cfg.sources)
    skipped: list[str] = []
    rows = 0
    for i, src in enumerate(cfg.sources):
        src = _resolve_demo(src, cfg)
        where = f"data.sources[{i}].path = {src.path!r}"
        loc = location_for(src.path, src.endpoint_url, src.region)
        infos = list_files(src.path, loc, ".parquet" if src.format == "parquet" else None, where)
        files += [(loc, info) for info in infos]
        common = dict(source=i, format=src.format, text_column=src.text_column,
                      text_mode=src.text_mode, loc=loc)
        if src.format == "parquet":
            for info in infos:
                try:
                    groups = _parquet_row_groups(loc, info.path, src.text_column, i)
                except CorruptFile as exc:
                    if cfg.on_corrupt == "error":
                        raise DataError(f"{exc}: fix or remove it, or set data.on_corrupt = skip") from None
                    skipped.append(str(exc))
                    continue
                for rg, n, size in groups:
                    raw.append((i, dict(common, files=(info.path,), row_group=rg)))
                    rows += n
                    sizes[i] += size
        else:
            sizes[i] += sum(text_size(loc, info) for info in infos)
            rows += sum(1 for info in infos if info.size > 0)
            step = 1 if src.text_mode == "line" else cfg.pack_rows
            for start in range(0, len(infos), step):
                chunk = tuple(info.path for info in infos[start : start + step])
                raw.append((i, dict(common, files=chunk, row_group=-1)))
    rates = _mixing_rates(cfg, sizes)
    units = [Unit(unit_id=n, rate=rates[i], **kw) for n, (i, kw) in enumerate(raw)]
    return Plan(units, files, sizes, skipped, rows)


def _mixing_rates(cfg: DataConfig, sizes: list[int]) -> list[float]:
    """Per source, how many times each training block is emitted on average so that the
    sources' shares of the stream follow their weights (the epoch keeps about the natural
    total size: over-weighted sources repeat blocks, under-weighted ones skip some)."""
    weights = [s.weight for s in cfg.sources]
    if weights[0] is None or len(weights) == 1:
        return [1.0] * len(weights)
    total_w, total_b = sum(weights), sum(sizes)
    for i, size in enumerate(sizes):
        if size == 0:
            raise DataError(
                f"data.sources[{i}] = {cfg.sources[i].path!r} has weight {weights[i]} but holds "
                "no text: remove it or give it some documents"
            )
    return [(w / total_w) / (b / total_b) for w, b in zip(weights, sizes, strict=True)]


def plan_units(cfg: DataConfig) -> list[Unit]:
    """The units of work of every source (see :func:`plan_corpus`)."""
    return plan_corpus(cfg).units


def _read_documents(unit: Unit) -> tuple[list[str | None], dict[str, int]]:
    """The unit's documents in order and what reading them counted: ``invalid_utf8_docs``
    (bytes replaced), ``corrupt_files`` (unreadable, skipped with ``on_corrupt = skip``:
    the caller decides)."""
    counts = {"invalid_utf8_docs": 0}
    if unit.format == "parquet":
        pf = pq.ParquetFile(filesystem(unit.loc).open_input_file(unit.files[0]))
        col = pf.read_row_group(unit.row_group, columns=[unit.text_column]).column(0)
        return col.to_pylist(), counts
    texts: list[str | None] = []
    for f in unit.files:
        text, replaced = decode(read_bytes(unit.loc, f))
        if unit.text_mode == "line":
            lines = text.split("\n")
            if lines and lines[-1] == "":
                lines.pop()  # a final newline ends the last line; it starts no document
            texts += lines
            if replaced:
                counts["invalid_utf8_docs"] += sum(1 for ln in lines if "\ufffd" in ln)
        else:
            texts.append(text)
            counts["invalid_utf8_docs"] += int(replaced)
    return texts, counts


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
    on_corrupt: str = "error"


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


def _read_unit(unit: Unit, spec: PackSpec) -> tuple[dict[Split, list[str]], dict[str, int]]:
    """The unit's documents by split, and its counts (documents, empty, invalid UTF-8,
    skipped files, text bytes)."""
    try:
        texts, counts = _read_documents(unit)
        counts["skipped_files"] = 0
    except CorruptFile as exc:
        if spec.on_corrupt == "error":
            raise DataError(f"{exc}: fix or remove it, or set data.on_corrupt = skip") from None
        texts, counts = [], {"invalid_utf8_docs": 0, "skipped_files": 1}
        log.warning("skipping %s", exc)
    docs, empty = _split_documents(texts, spec)
    counts.update(
        docs=len(docs["train"]) + len(docs["val"]),
        empty_docs=empty,
        text_bytes=sum(len(t.encode("utf-8")) for t in texts if t),
    )
    return docs, counts


def _copies(block_ids: np.ndarray, rate: float, seed: int) -> np.ndarray:
    """How many times each block is emitted under mixing rate ``rate``: ``floor(rate)``,
    plus one more when a hash of the block id falls below ``rate``'s fraction."""
    whole, frac = int(rate), rate - int(rate)
    if frac == 0:
        return np.full(len(block_ids), whole, dtype=np.int64)
    with np.errstate(over="ignore"):  # splitmix64 wraps by design
        z = block_ids.astype(np.uint64) + np.uint64((0x9E3779B97F4A7C15 + seed) % 2**64)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    u = (z >> np.uint64(11)).astype(np.float64) / 2.0**53
    return whole + (u < frac).astype(np.int64)


def _unit_blocks(
    unit: Unit, spec: PackSpec, split: Split, counts: dict | None = None
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """``(block_ids, blocks)`` of one split of one unit, a packing group at a time. Training
    blocks are repeated or skipped by the unit's mixing rate. ``counts`` (if given) receives
    the unit's counts plus ``tokens``, ``blocks`` and ``dropped_tokens`` of ``split``."""
    docs, unit_counts = _read_unit(unit, spec)
    first = tokens = dropped = emitted = 0
    for blocks, leftover in _pack_groups(docs[split], spec):
        tokens += len(blocks) * spec.block_len + leftover
        dropped += leftover
        if len(blocks):
            ids = (unit.unit_id << 32) + first + np.arange(len(blocks), dtype=np.int64)
            first += len(blocks)
            if split == "train" and unit.rate != 1.0:
                n = _copies(ids, unit.rate, spec.split_seed)
                ids, blocks = np.repeat(ids, n), np.repeat(blocks, n, axis=0)
            emitted += len(blocks)
            if len(blocks):
                yield ids, blocks
    if counts is not None:
        counts.update(unit_counts, split_docs=len(docs[split]), tokens=tokens,
                      blocks=emitted, dropped_tokens=dropped)


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
    """What the up-front check counted on the *sampled* units (``sampled_units`` of
    ``units``; all of them for corpora of at most ``data.val_max_units`` units). Tokens
    include one end-of-document token per document. Train is lazy: its tokens and blocks
    are counted by ``raydrat data prepare`` (exact, in the manifest), not here."""

    units: int
    """Units of work in the whole corpus (parquet row groups, groups of text files)."""
    sampled_units: int
    """Units read by the check (and holding the val split)."""
    docs: int
    """Non-empty documents (both splits) of the sampled units."""
    empty_docs: int
    """Empty or null documents, skipped."""
    invalid_utf8_docs: int
    """Documents with invalid UTF-8 (bytes replaced by U+FFFD, document kept)."""
    skipped_files: int
    """Unreadable files skipped (``data.on_corrupt = skip``), plan and sample together."""
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


_SCAN_COUNTS = ("docs", "empty_docs", "invalid_utf8_docs", "skipped_files", "text_bytes",
                "val_docs", "val_tokens", "val_blocks", "val_dropped_tokens")


def _scan_unit(unit: Unit, spec: PackSpec) -> dict[str, int | str]:
    """One unit's counts, or its DataError's message under ``error`` (exceptions lose
    their type on the way out of a Ray task; this keeps the message)."""
    try:
        counts: dict = {}
        for _ in _unit_blocks(unit, spec, "val", counts):
            pass
        docs, _ = _read_unit(unit, spec)
    except DataError as exc:
        return {**{k: 0 for k in _SCAN_COUNTS}, "unit_id": unit.unit_id, "error": str(exc),
                "train_has_block": False}
    return {
        "unit_id": unit.unit_id,
        "error": "",
        **{k: counts[k] for k in ("docs", "empty_docs", "invalid_utf8_docs", "skipped_files", "text_bytes")},
        "val_docs": counts["split_docs"],
        "val_tokens": counts["tokens"],
        "val_blocks": counts["blocks"],
        "val_dropped_tokens": counts["dropped_tokens"],
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


class PackActor:
    """The pack UDF on an actor: the tokenizer is parsed once, when the actor starts. Each
    actor holds one CPU and encodes on one thread (``RAYON_NUM_THREADS=1`` unless set):
    the pool, not the tokenizer's own thread pool, spreads work over the cores, so actors
    do not oversubscribe them."""

    def __init__(self, spec: PackSpec, split: Split, counter=None):
        os.environ.setdefault("RAYON_NUM_THREADS", "1")  # before the Rust pool starts
        self.spec, self.split, self.counter = spec, split, counter
        _tokenizer(spec.tokenizer_json)

    def __call__(self, batch: pa.Table) -> Iterator[dict[str, np.ndarray]]:
        for row in batch.to_pylist():
            counts: dict = {}
            unit = Unit.from_row(row)
            for block_ids, blocks in _unit_blocks(unit, self.spec, self.split, counts):
                yield {"tokens": blocks, "block_id": block_ids}
            if self.counter is not None:
                self.counter.add.remote(unit.unit_id, counts)


@ray.remote(num_cpus=0)
class DataCounter:
    """Counts what the training stream actually read, unit by unit and pass by pass: an
    epoch is complete once every unit has been read that many times. The driver turns this
    into per-epoch metrics (:meth:`DatasetBundle.epoch_metrics`)."""

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
        keys = ("docs", "empty_docs", "invalid_utf8_docs", "skipped_files", "split_docs",
                "tokens", "blocks", "dropped_tokens")
        return [{k: int(sum(p[e].get(k, 0) for p in self.passes.values())) for k in keys}
                for e in range(done)]


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
    stats: DataStats | None
    lineage: dict = field(default_factory=dict)
    """The run's data lineage (logged to MLflow as ``data/lineage.json``): the prepare
    manifest, or the sources with sizes, the tokenizer hash, the split rule and counts."""

    counter: object = None
    """The :class:`DataCounter` of the streaming train split (``None`` for prepared data)."""

    def epoch_metrics(self) -> list[dict[str, float]]:
        """Per completed epoch of the train stream: documents read, training documents,
        tokens, blocks, packing-group tails, empty / invalid-UTF-8 documents and skipped
        files (``data_epoch_*``; prepared data: the manifest's counts, every epoch alike)."""
        if self.counter is not None:
            epochs = ray.get(self.counter.epochs.remote())
        elif self.lineage.get("kind") == "prepared":
            c = self.lineage["manifest"]["counts"]
            epochs = [{"docs": c["docs"], "split_docs": c["train_split_docs"],
                       "tokens": c["train_tokens"], "blocks": c["train_blocks"]}]
        else:
            epochs = []
        return [{f"data_epoch_{k}": float(v) for k, v in e.items()} for e in epochs]

    def metrics(self) -> dict[str, float]:
        """The data counts as run metrics (``data_*``): the manifest's exact counts for
        prepared data, the checked sample's otherwise (``data_sampled_units`` of
        ``data_units``)."""
        if self.lineage.get("kind") == "prepared":
            counts = self.lineage["manifest"]["counts"]
        else:
            counts = {k: v for k, v in asdict(self.stats).items() if not isinstance(v, bool)}
        return {f"data_{k}": float(v) for k, v in counts.items()}


def resolve_tokenizer_path(data_cfg: DataConfig, vocab_size: int) -> Path:
    """``data.tokenizer_path``, or the demo tokenizer of this vocab size (trained on first
    use)."""
    if data_cfg.tokenizer_path:
        return Path(data_cfg.tokenizer_path).expanduser().absolute()
    return build_demo_corpus(data_cfg.demo_dir, vocab_size) / tokenizer_file(vocab_size)


def make_spec(data_cfg: DataConfig, seq_len: int, vocab_size: int) -> tuple[PackSpec, Path]:
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
        on_corrupt=data_cfg.on_corrupt,
    )
    return spec, tok_path


def sample_units(units: list[Unit], n: int) -> list[Unit]:
    """At most ``n`` units spread evenly over ``units`` (all of them when there are few)."""
    if len(units) <= n:
        return list(units)
    return [units[(i * len(units)) // n] for i in range(n)]


def iter_blocks_local(
    data_cfg: DataConfig, seq_len: int, vocab_size: int, split: Split
) -> Iterator[np.ndarray]:
    """The blocks of ``split`` (``int32[seq_len + 1]`` each), computed in this process without
    Ray: the same blocks as :func:`build_datasets`, in unit order."""
    spec, _ = make_spec(data_cfg, seq_len, vocab_size)
    units = plan_corpus(data_cfg).units
    if split == "val":
        units = sample_units(units, data_cfg.val_max_units)
    for unit in units:
        for _, blocks in _unit_blocks(unit, spec, split):
            yield from blocks


def split_rule(data_cfg: DataConfig) -> dict:
    return {
        "rule": "val iff blake2b(utf8(text), digest_size=8, key=split_seed as int64 LE) "
        "read as little-endian uint64 < val_fraction * 2**64",
        "val_fraction": data_cfg.val_fraction,
        "split_seed": data_cfg.split_seed,
        "val_max_units": data_cfg.val_max_units,
    }


def build_datasets(
    data_cfg: DataConfig, seq_len: int, vocab_size: int, reserved_cpus: float = 0
) -> DatasetBundle:
    """Check the corpus cheaply and return the train (lazy, streaming) and val
    (materialized) datasets of ``seq_len + 1`` token blocks. ``reserved_cpus``: CPUs the
    Train workers will hold (the tokenizer pool sizes itself to the rest)."""
    if data_cfg.prepared:
        from raydrat.data.prepare import open_prepared

        return open_prepared(data_cfg, seq_len, vocab_size)
    spec, tok_path = make_spec(data_cfg, seq_len, vocab_size)
    plan = plan_corpus(data_cfg)
    corpus = ", ".join(src.path for src in data_cfg.sources)
    if not plan.units or plan.rows == 0:
        raise DataError(
            f"corpus {corpus} produced no blocks of seq_len+1 = {spec.block_len} tokens: "
            "it holds no documents; point data.sources at some text"
        )
    sample = sample_units(plan.units, data_cfg.val_max_units)
    ds_sample = _units_dataset(sample)
    stats = _scan(_map_units(ds_sample, _scan_batch, spec), len(plan.units), len(plan.skipped_files))
    _check(stats, spec, corpus, data_cfg.val_fraction)
    log.info(
        "data: %d units (%d checked): %d documents (%d empty, %d with invalid UTF-8), %.1f MB; "
        "val: %d documents, %d blocks; %d files skipped",
        stats.units, stats.sampled_units, stats.docs, stats.empty_docs, stats.invalid_utf8_docs,
        stats.text_bytes / 1e6, stats.val_docs, stats.val_blocks, stats.skipped_files,
    )
    lineage = {
        "kind": "sources",
        "sources": [s.model_dump(mode="json") for s in data_cfg.sources],
        "source_text_bytes": plan.source_bytes,
        "mixing_rates": sorted({(u.source, u.rate) for u in plan.units}),
        "files": [{"path": uri(loc, i.path), "size": i.size} for loc, i in plan.files],
        "skipped_files": plan.skipped_files,
        "tokenizer_sha256": tokenizer_hash(tok_path),
        "seq_len": seq_len,
        "split": split_rule(data_cfg),
        "checked_sample": asdict(stats),
    }
    counter = DataCounter.remote(len(plan.units))
    return DatasetBundle(
        train=pack_dataset(plan.units, spec, "train", pool_size(data_cfg, reserved_cpus), counter),
        val=_map_units(ds_sample, _pack_batch, spec, split="val").materialize(),
        tokenizer_path=str(tok_path),
        tokenizer_sha256=lineage["tokenizer_sha256"],
        eod_id=spec.eod_id,
        block_len=spec.block_len,
        stats=stats,
        lineage=lineage,
        counter=counter,
    )


def pool_size(data_cfg: DataConfig, reserved_cpus: float = 0) -> int:
    """Tokenizer actors: ``data.tokenize_actors``, or the cluster's CPUs left over."""
    if data_cfg.tokenize_actors:
        return data_cfg.tokenize_actors
    cpus = ray.cluster_resources().get("CPU", 1) if ray.is_initialized() else 1
    return max(1, int(cpus - reserved_cpus))


def pack_dataset(units: list[Unit], spec: PackSpec, split: Split, actors: int,
                 counter=None) -> ray.data.Dataset:
    """Lazy blocks of ``split`` over ``units`` on a pool of ``actors`` tokenizer actors
    (0: plain tasks), reporting each unit's counts to ``counter`` (a DataCounter) if given."""
    ds = _units_dataset(units)
    if actors == 0:
        return _map_units(ds, _pack_batch, spec, split=split)
    return ds.map_batches(
        PackActor,
        fn_constructor_kwargs={"spec": spec, "split": split, "counter": counter},
        batch_size=1,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=actors),
    )


def _units_dataset(units: list[Unit]) -> ray.data.Dataset:
    return ray.data.from_items([u.to_row() for u in units], override_num_blocks=max(1, len(units)))


def _map_units(ds: ray.data.Dataset, fn, spec: PackSpec, **kwargs) -> ray.data.Dataset:
    """``fn`` over the unit rows, one unit per task."""
    return ds.map_batches(
        fn, batch_size=1, batch_format="pyarrow", fn_kwargs={"spec": spec, **kwargs}
    )


def _scan(ds: ray.data.Dataset, n_units: int, plan_skipped: int) -> DataStats:
    rows = sorted(ds.take_all(), key=lambda r: r["unit_id"])
    errors = [r["error"] for r in rows if r["error"]]
    if errors:
        raise DataError(errors[0])
    sums = {k: int(sum(r[k] for r in rows)) for k in _SCAN_COUNTS}
    sums["skipped_files"] += plan_skipped
    return DataStats(
        units=n_units,
        sampled_units=len(rows),
        **sums,
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
            "data.val_max_units, add documents or lower model.seq_len"
        )
    if not stats.train_has_block:
        raise DataError(
            f"corpus {corpus} leaves no training block after holding out data.val_fraction = "
            f"{val_fraction}: lower data.val_fraction or add documents"
        )
