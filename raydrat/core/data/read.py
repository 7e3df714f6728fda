"""A unit's documents: read in file order (a parquet row group's text column, or text files
decoded with invalid UTF-8 replaced), empty ones (``""`` or null) skipped and counted, the
rest split train/val (:mod:`raydrat.core.data.split`). An unreadable file stops the run, or
is skipped and counted under ``data.on_corrupt = skip``."""

from __future__ import annotations

import logging

import pyarrow.parquet as pq

from raydrat.core.data.errors import DataError
from raydrat.core.data.plan import Unit
from raydrat.core.data.sources import CorruptFile, decode, filesystem, read_bytes
from raydrat.core.data.spec import PackSpec
from raydrat.core.data.split import Split, split_documents

log = logging.getLogger(__name__)


def read_documents(unit: Unit) -> tuple[list[str | None], dict[str, int]]:
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
