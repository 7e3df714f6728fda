"""A unit's documents: read in file order (a parquet row group's text column, or text files
decoded with invalid UTF-8 and NUL characters replaced), empty ones (``""`` or null) skipped and counted, the
rest split train/val (:mod:`raydrat.core.data.split`). An unreadable file stops the run, or
is skipped and counted under ``data.on_corrupt = skip``."""

from __future__ import annotations

import io
import json
import logging

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.ipc as ipc
import pyarrow.json as pajson
import pyarrow.parquet as pq

from raydrat.core.data.errors import DataError
from raydrat.core.data.plan import Unit
from raydrat.core.data.sources import (
    CorruptFile,
    decode,
    describe_os_error,
    filesystem,
    is_credential_error,
    read_bytes,
    uri,
)
from raydrat.core.data.spec import PackSpec
from raydrat.core.data.split import Split, split_documents

log = logging.getLogger(__name__)


def _read_row_group(unit: Unit) -> pa.ChunkedArray:
    """The unit's row group's text column. A data page that cannot be decoded (or fails its
    checksum, when the writer stored one) raises :class:`CorruptFile` naming the file and
    the row group; a refused permission or credential is a DataError, never corruption."""
    name = uri(unit.loc, unit.files[0])
    try:
        pf = pq.ParquetFile(filesystem(unit.loc).open_input_file(unit.files[0]), page_checksum_verification=True)
        return pf.read_row_group(unit.row_group, columns=[unit.text_column]).column(0)
    except (OSError, pa.ArrowException, ValueError) as exc:
        if isinstance(exc, OSError) and (is_credential_error(exc) or isinstance(exc, FileNotFoundError)):
            raise describe_os_error(name, exc, unit.loc) from None
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CorruptFile(f"{name} row group {unit.row_group} is corrupt ({first})") from None


def _replace_nul(col: pa.ChunkedArray) -> tuple[pa.ChunkedArray, int]:
    """NUL characters replaced by U+FFFD, and the number of documents that held one."""
    has = pc.match_substring(col, "\x00")
    n = int(pc.sum(has).as_py() or 0)
    return (pc.replace_substring(col, "\x00", "\ufffd") if n else col), n


def _read_arrow(unit: Unit) -> pa.ChunkedArray:
    """The text column of a saved Hugging Face dataset's ``.arrow`` file (an Arrow IPC
    stream, the format ``datasets`` writes and memory-maps)."""
    name = uri(unit.loc, unit.files[0])
    try:
        with filesystem(unit.loc).open_input_file(unit.files[0]) as f:
            return ipc.open_stream(f).read_all().column(unit.text_column)
    except (OSError, pa.ArrowException) as exc:
        if isinstance(exc, OSError) and not isinstance(exc, pa.ArrowException):
            raise describe_os_error(name, exc, unit.loc) from None
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CorruptFile(f"{name} is not a readable Arrow stream ({first})") from None


def jsonl_texts(
    raw: bytes, name: str, field: str, on_corrupt: str, key: str = "data.sources[].text_column"
) -> tuple[list[str | None], int]:
    """The ``field`` of every line of a JSON Lines file, and how many lines were not JSON
    objects (skipped under ``on_corrupt = skip``; else :class:`CorruptFile` names the first,
    by line number). Parsed by pyarrow's JSON reader (the one Ray Data's ``read_json`` uses);
    a file it refuses is read again line by line to find and count the bad lines. A line
    without the field is an empty document; a field that is not text is refused."""
    if not raw.strip():
        return [], 0
    try:
        table = pajson.read_json(
            io.BytesIO(raw), read_options=pajson.ReadOptions(block_size=max(1 << 20, len(raw) + 1))
        )
    except pa.ArrowInvalid:
        return _jsonl_by_line(raw, name, field, on_corrupt, key)
    if field not in table.column_names:
        return [None] * table.num_rows, 0
    col = table.column(field)
    if not (pa.types.is_string(col.type) or pa.types.is_large_string(col.type) or pa.types.is_null(col.type)):
        raise DataError(f"{name}: field {field!r} is {col.type}, not text: set {key} to a text field")
    return col.to_pylist(), 0


def _jsonl_by_line(raw: bytes, name: str, field: str, on_corrupt: str, key: str) -> tuple[list[str | None], int]:
    texts: list[str | None] = []
    bad = 0
    for n, line in enumerate(raw.split(b"\n"), start=1):
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


def _files_of(unit: Unit):
    """``(file, bytes)`` of each file of ``unit``; a read failure is one error naming the file."""
    for f in unit.files:
        try:
            yield f, read_bytes(unit.loc, f)
        except OSError as exc:
            raise describe_os_error(uri(unit.loc, f), exc, unit.loc) from None


def read_documents(unit: Unit, on_corrupt: str = "error") -> tuple[list[str | None], dict[str, int]]:
    """The unit's documents in order and what reading them counted: ``invalid_utf8_docs``
    (invalid bytes or NUL characters replaced by U+FFFD; documents kept) and
    ``corrupt_lines`` (JSON Lines lines that are not JSON, skipped under ``on_corrupt =
    skip``). An unreadable file or row group, or a bad line under ``on_corrupt = error``,
    raises :class:`CorruptFile` (a whole file is skipped with ``on_corrupt = skip``: the
    caller decides)."""
    counts = {"invalid_utf8_docs": 0, "corrupt_lines": 0}
    if unit.format in ("parquet", "hf"):
        col = _read_row_group(unit) if unit.format == "parquet" else _read_arrow(unit)
        col, counts["invalid_utf8_docs"] = _replace_nul(col)
        return col.to_pylist(), counts
    if unit.format == "jsonl":
        texts: list[str | None] = []
        for f, raw in _files_of(unit):
            got, bad = jsonl_texts(
                raw, uri(unit.loc, f), unit.text_column, on_corrupt, f"data.sources[{unit.source}].text_column"
            )
            texts += got
            counts["corrupt_lines"] += bad
        col, counts["invalid_utf8_docs"] = _replace_nul(pa.chunked_array([pa.array(texts, pa.string())]))
        return col.to_pylist(), counts
    texts: list[str | None] = []
    for _, raw in _files_of(unit):
        text, replaced = decode(raw)
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


def read_unit(unit: Unit, spec: PackSpec) -> tuple[dict[Split, list[str]], dict[str, int]]:
    """The unit's documents by split, and its counts (documents, empty, invalid UTF-8,
    skipped files, text bytes)."""
    try:
        texts, counts = read_documents(unit, spec.on_corrupt)
        counts["skipped_files"] = 0
    except CorruptFile as exc:
        if spec.on_corrupt == "error":
            raise DataError(f"{exc}: fix or remove it, or set data.on_corrupt = skip") from None
        texts, counts = [], {"invalid_utf8_docs": 0, "corrupt_lines": 0, "skipped_files": 1}
        log.warning("skipping %s", exc)
    docs, empty = split_documents(texts, spec.split_seed, spec.val_fraction)
    counts.update(
        docs=len(docs["train"]) + len(docs["val"]),
        empty_docs=empty,
        text_bytes=sum(len(t.encode("utf-8")) for t in texts if t),
    )
    return docs, counts
