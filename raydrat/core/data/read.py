"""A unit's documents: read in file order (a parquet row group's text column, or text files
decoded with invalid UTF-8 and NUL characters replaced), empty ones (``""`` or null) skipped and counted, the
rest split train/val (:mod:`raydrat.core.data.split`). An unreadable file stops the run, or
is skipped and counted under ``data.on_corrupt = skip``."""

from __future__ import annotations

import logging

import pyarrow as pa
import pyarrow.compute as pc
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


def read_documents(unit: Unit) -> tuple[list[str | None], dict[str, int]]:
    """The unit's documents in order and what reading them counted: ``invalid_utf8_docs``
    (invalid bytes or NUL characters replaced by U+FFFD; documents kept). An unreadable
    file or row group raises :class:`CorruptFile` (skipped with ``on_corrupt = skip``: the
    caller decides)."""
    counts = {"invalid_utf8_docs": 0}
    if unit.format == "parquet":
        col, counts["invalid_utf8_docs"] = _replace_nul(_read_row_group(unit))
        return col.to_pylist(), counts
    texts: list[str | None] = []
    for f in unit.files:
        try:
            raw = read_bytes(unit.loc, f)
        except OSError as exc:
            raise describe_os_error(uri(unit.loc, f), exc, unit.loc) from None
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
        texts, counts = read_documents(unit)
        counts["skipped_files"] = 0
    except CorruptFile as exc:
        if spec.on_corrupt == "error":
            raise DataError(f"{exc}: fix or remove it, or set data.on_corrupt = skip") from None
        texts, counts = [], {"invalid_utf8_docs": 0, "skipped_files": 1}
        log.warning("skipping %s", exc)
    docs, empty = split_documents(texts, spec.split_seed, spec.val_fraction)
    counts.update(
        docs=len(docs["train"]) + len(docs["val"]),
        empty_docs=empty,
        text_bytes=sum(len(t.encode("utf-8")) for t in texts if t),
    )
    return docs, counts
