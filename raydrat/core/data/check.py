"""The up-front corpus check (before training starts): every sampled unit is read, split and
its val blocks packed; the counts are summed into :class:`DataStats`, and a corpus that
cannot feed a run (no documents, too short for one block, no val block, no train block) is
refused with a :class:`DataError` that says what to change."""

from __future__ import annotations

from dataclasses import dataclass

from raydrat.core.data.blocks import SCAN_COUNTS
from raydrat.core.data.errors import DataError
from raydrat.core.data.spec import PackSpec


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
    corrupt_lines: int = 0
    """JSON Lines lines that are not JSON, skipped (``data.on_corrupt = skip``)."""
    corrupt_bytes: int = 0
    """Bytes after the last member of gzip files, ignored."""
    val_text_bytes: int = 0
    """UTF-8 bytes of the val documents tokenized (with ``val_tokens``: tokens per byte)."""

    @property
    def train_docs(self) -> int:
        return self.docs - self.val_docs


def combine_scans(rows: list[dict], n_units: int, plan_skipped: int) -> DataStats:
    """The sampled units' :func:`scan_unit` rows summed (the first error in unit order is
    raised as a DataError); ``plan_skipped``: files the plan already left out."""
    rows = sorted(rows, key=lambda r: r["unit_id"])
    errors = [r["error"] for r in rows if r["error"]]
    if errors:
        raise DataError(errors[0])
    sums = {k: int(sum(r[k] for r in rows)) for k in SCAN_COUNTS}
    sums["skipped_files"] += plan_skipped
    return DataStats(
        units=n_units,
        sampled_units=len(rows),
        **sums,
        train_has_block=any(r["train_has_block"] for r in rows),
    )


def check_stats(stats: DataStats, spec: PackSpec, corpus: str, val_fraction: float) -> None:
    no_blocks = f"corpus {corpus} produced no blocks of seq_len+1 = {spec.block_len} tokens"
    if stats.docs == 0:
        raise DataError(
            f"{no_blocks}: all {stats.empty_docs} documents are empty or null; point data.sources at some text"
        )
    if stats.val_blocks == 0 and not stats.train_has_block:
        raise DataError(f"{no_blocks}: its {stats.docs} documents are too short; add text or lower model.seq_len")
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
