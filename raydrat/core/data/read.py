"""A unit's documents as a stream of bounded *pieces*, each labelled with its split, with
memory independent of the documents' sizes, from the unit's start or from any :class:`Mark`.

* Text files are read and decoded a slice at a time (:mod:`raydrat.core.data.text`: byte
  order marks, ``data.encoding``, gzip members); ``line`` mode ends a document at each
  ``\\n`` (a final newline starts none), ``file`` mode makes the file one document. Parquet
  row groups, the record batches of a saved dataset's ``.arrow`` file and JSON Lines files
  (a few MiB of lines at a time) give one document per row; a ``binary`` text column is
  decoded as UTF-8. Empty and null documents are skipped and counted.
* A document longer than :data:`PIECE_CHARS` characters is cut into pieces
  (:func:`cut_point`): before a space that follows a non-space and precedes one, the first
  such place at or after :data:`PIECE_CHARS` characters into the piece (a hard cut at
  ``PIECE_CHARS + CUT_SLACK`` when there is none). For a byte-level BPE with the GPT-2 split
  pattern (raydrat's own tokenizers) that place is a pre-token boundary, so the pieces'
  tokens are the document's tokens exactly; the cuts depend on the text alone, never on how
  it was read.
* A document's split is decided on its first piece (:mod:`raydrat.core.data.split`).

A :class:`Mark` names the place a piece starts (file or row, character offset, and the split
of the document it continues), so reading can start there again: a text file is decoded
from its start and the characters before the mark skipped (no splitting or tokenizing), a
row group is read and the rows before the mark skipped. An unreadable file stops the run, or
is skipped and counted under ``data.on_corrupt = skip``."""

from __future__ import annotations

import codecs
import io
import json
import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import NamedTuple

import pyarrow as pa
import pyarrow.ipc as ipc
import pyarrow.json as pajson
import pyarrow.parquet as pq

from raydrat.config.data import DataConfig
from raydrat.core.data.errors import DataError
from raydrat.core.data.plan import Unit
from raydrat.core.data.sources import CorruptFile, describe_os_error, filesystem, is_credential_error, uri
from raydrat.core.data.spec import PackSpec
from raydrat.core.data.split import SPLITS, Split, is_val_document
from raydrat.core.data.text import UTF8_BOM, WIDE_BOMS, decode_value, decoded, file_bytes, text_slices

log = logging.getLogger(__name__)

PIECE_CHARS = 1 << 18
"""A longer document is cut into pieces of about this many characters."""
CUT_SLACK = 1 << 12
"""How far past :data:`PIECE_CHARS` a cut looks for a space before cutting anyway."""
JSONL_BATCH_BYTES = 4 << 20
"""JSON Lines are parsed this many bytes of whole lines at a time."""
_SAFE_CUT = re.compile(r"(?<=\S) (?=\S)")

COUNT_KEYS = (
    "docs",
    "empty_docs",
    "invalid_utf8_docs",
    "text_bytes",
    "corrupt_lines",
    "corrupt_bytes",
    "skipped_files",
)
"""What reading a unit counts: non-empty and empty documents, documents with replaced bytes,
UTF-8 bytes of the non-empty documents, JSON Lines lines that are not JSON, gzip trailing
bytes, unreadable files skipped."""


@dataclass(frozen=True)
class ReadSpec:
    """What reading needs of the config (a :class:`~raydrat.core.data.spec.PackSpec` has it
    too): the split rule, ``data.on_corrupt`` and ``data.encoding``."""

    val_fraction: float
    split_seed: int
    on_corrupt: str = "error"
    encoding: str = "utf-8"

    @classmethod
    def of(cls, data_cfg: DataConfig) -> ReadSpec:
        return cls(data_cfg.val_fraction, data_cfg.split_seed, data_cfg.on_corrupt, data_cfg.encoding)


@dataclass(frozen=True)
class Mark:
    """Where a piece starts in its unit."""

    item: int = 0
    """The unit's file (text, JSON Lines) or row (parquet, a saved dataset)."""
    offset: int = 0
    """Characters into that file's decoded text, or into that row's text."""
    label: int = -1
    """-1: a document starts here; 0 or 1: a train (val) document continues here."""


class Piece(NamedTuple):
    text: str
    mark: Mark
    label: int
    """The document's split: 0 train, 1 val."""
    doc_end: bool
    """The document ends with this piece (an end-of-document token follows it)."""


def cut_point(buf: str, start: int, end: int, final: bool) -> int | None:
    """Where the piece starting at ``buf[start]`` ends, in a document whose text continues
    to ``buf[end]`` (``final``: and ends there); ``None`` when more text is needed to tell."""
    n = end - start
    if n <= PIECE_CHARS:
        return end if final else None
    if not final and n <= PIECE_CHARS + CUT_SLACK:
        return None
    m = _SAFE_CUT.search(buf, start + PIECE_CHARS, min(end, start + PIECE_CHARS + CUT_SLACK + 1))
    return m.start() if m else min(end, start + PIECE_CHARS + CUT_SLACK)


class _Doc(NamedTuple):
    """A segment of a document as a format reader finds it."""

    item: int
    offset: int
    text: str
    start: bool
    end: bool
    replaced: bool


def _segments(buf: str, start: int, end: int, final: bool) -> tuple[list[tuple[int, int]], int]:
    """``buf[start:end]``, a document's text from ``start`` (``final``: it ends at ``end``),
    cut into pieces: their ``(start, end)``, and where the text not yet cut starts."""
    out = []
    while start < end:
        cut = cut_point(buf, start, end, final)
        if cut is None:
            break
        out.append((start, cut))
        start = cut
    return out, start


def _file_docs(unit: Unit, spec: ReadSpec, item: int, start: Mark, counts: dict) -> Iterator[_Doc]:
    """One text file's documents (``start``: where in it to begin)."""
    line_mode = unit.text_mode == "line"
    skip = start.offset
    doc_start = start.label < 0  # no piece of the open document emitted yet
    base, buf, i = 0, "", 0  # base: characters of the file before buf[0]; buf[i:] not yet cut
    replaced = False
    for text, rep in text_slices(unit.loc, unit.files[item], spec.encoding, counts):
        if skip:
            if len(text) <= skip:
                skip -= len(text)
                base += len(text)
                continue
            text, base, skip = text[skip:], base + skip, 0
        base += i
        buf, i = buf[i:] + text, 0
        replaced = replaced or rep
        while True:
            nl = buf.find("\n", i) if line_mode else -1
            end = nl if nl >= 0 else len(buf)
            segs, i = _segments(buf, i, end, nl >= 0)
            for s, e in segs:
                yield _Doc(item, base + s, buf[s:e], doc_start, nl >= 0 and e == end, replaced)
                doc_start = False
            if nl < 0:
                break
            if not segs:  # an empty line (an empty document), or the end of one already cut
                yield _Doc(item, base + i, "", doc_start, True, False)
            i, doc_start, replaced = nl + 1, True, rep
    segs, i = _segments(buf, i, len(buf), True)
    for s, e in segs:
        yield _Doc(item, base + s, buf[s:e], doc_start, e == len(buf), replaced)
        doc_start = False
    if not line_mode and doc_start and start.offset == 0:  # an empty file: an empty document
        yield _Doc(item, 0, "", True, True, False)


def _text_docs(unit: Unit, spec: ReadSpec, start: Mark, counts: dict) -> Iterator[_Doc]:
    for item in range(start.item, len(unit.files)):
        yield from _file_docs(unit, spec, item, start if item == start.item else Mark(item), counts)


def _value_docs(values: Iterator[tuple[str | None, bool]], start: Mark) -> Iterator[_Doc]:
    """Rows as documents, from row ``start.item``, character ``start.offset``."""
    for item, (text, replaced) in enumerate(values, start=start.item):
        if not text:
            yield _Doc(item, 0, "", True, True, False)
            continue
        offset = start.offset if item == start.item else 0
        segs, _ = _segments(text, offset, len(text), True)
        for s, e in segs:
            yield _Doc(item, s, text[s:e], s == 0, e == len(text), replaced)


def _texts_of(col: pa.ChunkedArray | pa.Array, first: int = 0) -> Iterator[tuple[str | None, bool]]:
    """``(text, replaced)`` of each value from ``first``: strings as they are (NUL replaced),
    binary values decoded as UTF-8 (invalid bytes replaced)."""
    binary = _is_binary(col.type)
    for value in col.slice(first).to_pylist():
        if value is None:
            yield None, False
        elif binary:
            yield decode_value(value)
        elif "\x00" in value:
            yield value.replace("\x00", "\ufffd"), True
        else:
            yield value, False


def _is_binary(typ: pa.DataType) -> bool:
    return pa.types.is_binary(typ) or pa.types.is_large_binary(typ) or pa.types.is_binary_view(typ)


def _parquet_values(unit: Unit, first: int) -> Iterator[tuple[str | None, bool]]:
    """The unit's row group's text column. A data page that cannot be decoded (or fails its
    checksum, when the writer stored one) raises :class:`CorruptFile` naming the file and
    the row group; a refused permission or credential is a DataError, never corruption."""
    name = uri(unit.loc, unit.files[0])
    try:
        pf = pq.ParquetFile(filesystem(unit.loc).open_input_file(unit.files[0]), page_checksum_verification=True)
        col = pf.read_row_group(unit.row_group, columns=[unit.text_column]).column(0)
    except (OSError, pa.ArrowException, ValueError) as exc:
        if isinstance(exc, OSError) and (is_credential_error(exc) or isinstance(exc, FileNotFoundError)):
            raise describe_os_error(name, exc, unit.loc) from None
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CorruptFile(f"{name} row group {unit.row_group} is corrupt ({first_line})") from None
    yield from _texts_of(col, first)


def _arrow_values(unit: Unit, first: int) -> Iterator[tuple[str | None, bool]]:
    """The text column of a saved Hugging Face dataset's ``.arrow`` file (an Arrow IPC
    stream, the format ``datasets`` writes), a record batch at a time."""
    name = uri(unit.loc, unit.files[0])
    try:
        with filesystem(unit.loc).open_input_file(unit.files[0]) as f:
            seen = 0
            for batch in ipc.open_stream(f):
                if seen + batch.num_rows > first:
                    yield from _texts_of(batch.column(unit.text_column), max(0, first - seen))
                seen += batch.num_rows
    except (OSError, pa.ArrowException) as exc:
        if isinstance(exc, OSError) and not isinstance(exc, pa.ArrowException):
            raise describe_os_error(name, exc, unit.loc) from None
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CorruptFile(f"{name} is not a readable Arrow stream ({first_line})") from None


def jsonl_texts(
    raw: bytes, name: str, field: str, on_corrupt: str, key: str = "data.sources[].text_column", first_line: int = 1
) -> tuple[list[str | None], int]:
    """The ``field`` of every line of JSON Lines text ``raw`` (whole lines), and how many
    lines were not JSON objects (skipped under ``on_corrupt = skip``; else
    :class:`CorruptFile` names the first, by line number counted from ``first_line``). Parsed
    by pyarrow's JSON reader (the one Ray Data's ``read_json`` uses); text it refuses is read
    again line by line to find and count the bad lines. A line without the field is an empty
    document; a field that is not text is refused."""
    if not raw.strip():
        return [], 0
    try:
        table = pajson.read_json(
            io.BytesIO(raw), read_options=pajson.ReadOptions(block_size=max(1 << 20, len(raw) + 1))
        )
    except pa.ArrowInvalid:
        return _jsonl_by_line(raw, name, field, on_corrupt, key, first_line)
    if field not in table.column_names:
        return [None] * table.num_rows, 0
    col = table.column(field)
    if not (pa.types.is_string(col.type) or pa.types.is_large_string(col.type) or pa.types.is_null(col.type)):
        raise DataError(f"{name}: field {field!r} is {col.type}, not text: set {key} to a text field")
    return col.to_pylist(), 0


def _jsonl_by_line(
    raw: bytes, name: str, field: str, on_corrupt: str, key: str, first_line: int
) -> tuple[list[str | None], int]:
    texts: list[str | None] = []
    bad = 0
    for n, line in enumerate(raw.split(b"\n"), start=first_line):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
            if not isinstance(obj, dict):
                raise ValueError(f"a JSON {type(obj).__name__}, not an object")
        except ValueError as exc:
            if on_corrupt == "error":
                raise CorruptFile(f"{name} line {n} is not a JSON object ({str(exc)[:80]})") from None
            bad += 1
            continue
        value = obj.get(field)
        if value is not None and not isinstance(value, str):
            raise DataError(
                f"{name} line {n}: field {field!r} is a {type(value).__name__}, not text: set {key} to a text field"
            )
        texts.append(value)
    return texts, bad


def _jsonl_lines(unit: Unit, spec: ReadSpec, counts: dict) -> Iterator[tuple[int, bytes]]:
    """``(number of the first line, whole lines)`` of the unit's JSON Lines file, about
    :data:`JSONL_BATCH_BYTES` at a time, as UTF-8 (a UTF-16/32 file, by its byte order mark
    or ``data.encoding``, is decoded first; a UTF-8 byte order mark is dropped)."""
    path = unit.files[0]
    raw = file_bytes(unit.loc, path, counts)
    head = next(raw, b"")
    if head.startswith(WIDE_BOMS) or codecs.lookup(spec.encoding).name != "utf-8":
        chunks = (t.encode("utf-8") for t, _ in decoded(_chain([head], raw), uri(unit.loc, path), spec.encoding))
    else:
        chunks = _chain([head.removeprefix(UTF8_BOM)], raw)
    line, buf = 1, b""
    for chunk in chunks:
        buf += chunk
        if len(buf) >= JSONL_BATCH_BYTES:
            cut = buf.rfind(b"\n") + 1
            if cut:
                yield line, buf[:cut]
                line += buf.count(b"\n", 0, cut)
                buf = buf[cut:]
    if buf:
        yield line, buf


def _chain(first, rest: Iterator[bytes]) -> Iterator[bytes]:
    yield from first
    yield from rest


def _jsonl_values(unit: Unit, spec: ReadSpec, first: int, counts: dict) -> Iterator[tuple[str | None, bool]]:
    name = uri(unit.loc, unit.files[0])
    key = f"data.sources[{unit.source}].text_column"
    seen = 0
    for line, raw in _jsonl_lines(unit, spec, counts):
        texts, bad = jsonl_texts(raw, name, unit.text_column, spec.on_corrupt, key, line)
        counts["corrupt_lines"] = counts.get("corrupt_lines", 0) + bad
        if seen + len(texts) > first:
            for text in texts[max(0, first - seen) :]:
                if text is not None and "\x00" in text:
                    yield text.replace("\x00", "\ufffd"), True
                else:
                    yield text, False
        seen += len(texts)


def _documents(unit: Unit, spec: ReadSpec, start: Mark, counts: dict) -> Iterator[_Doc]:
    if unit.format == "text":
        return _text_docs(unit, spec, start, counts)
    if unit.format == "parquet":
        values = _parquet_values(unit, start.item)
    elif unit.format == "hf":
        values = _arrow_values(unit, start.item)
    else:
        values = _jsonl_values(unit, spec, start.item, counts)
    return _value_docs(values, start)


def unit_pieces(
    unit: Unit, spec: ReadSpec | PackSpec, start: Mark | None = None, counts: dict | None = None
) -> Iterator[Piece]:
    """The unit's non-empty documents as labelled pieces, from ``start`` (default: the
    unit's start). ``counts`` (when given) receives :data:`COUNT_KEYS`. An unreadable file
    raises DataError, or under ``data.on_corrupt = skip`` ends the unit (counted in
    ``skipped_files``)."""
    start = start or Mark()
    counts = {} if counts is None else counts
    for k in COUNT_KEYS:
        counts.setdefault(k, 0)
    label = start.label
    invalid = False
    try:
        for doc in _documents(unit, spec, start, counts):
            if doc.start:
                if not doc.text:
                    counts["empty_docs"] += 1
                    continue
                counts["docs"] += 1
                label = int(is_val_document(doc.text, spec.split_seed, spec.val_fraction))
                invalid = False
            if doc.replaced and not invalid and "\ufffd" in doc.text:
                counts["invalid_utf8_docs"] += 1
                invalid = True
            counts["text_bytes"] += len(doc.text.encode("utf-8"))
            yield Piece(doc.text, Mark(doc.item, doc.offset, -1 if doc.start else label), label, doc.end)
    except CorruptFile as exc:
        if spec.on_corrupt == "error":
            raise DataError(f"{exc}: fix or remove it, or set data.on_corrupt = skip") from None
        counts["skipped_files"] += 1
        log.warning("skipping %s", exc)


def read_unit(unit: Unit, spec: ReadSpec | PackSpec) -> tuple[dict[Split, list[str]], dict[str, int]]:
    """The unit's whole documents by split, and its counts: for small units (tests, the
    tokenizer's sample); training reads :func:`unit_pieces`."""
    docs: dict[Split, list[str]] = {"train": [], "val": []}
    counts: dict = {}
    parts: list[str] = []
    for piece in unit_pieces(unit, spec, counts=counts):
        parts.append(piece.text)
        if piece.doc_end:
            docs[SPLITS[piece.label]].append("".join(parts))
            parts = []
    return docs, counts
