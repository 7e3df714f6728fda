"""A unit's blocks: read → split → chunk → tokenize → pack, one unit independent of every
other, a chunk at a time (memory bounded by a chunk, whatever the documents' sizes).
Chunks never span units. Blocks are ``int32[seq_len + 1]`` with ``block_id = unit_id << 32 |
index of the block within its unit and split``. Training blocks are repeated or skipped by
the unit's mixing rate (:func:`emit_counts`).

Because a unit's blocks depend only on its data and the config, never on batch boundaries,
workers or execution order, reading can start at any chunk (:class:`UnitStart`) and
:func:`iter_blocks_local` reproduces the blocks of every unit exactly."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from raydrat.config.data import DataConfig
from raydrat.core.data.errors import DataError
from raydrat.core.data.mixing import with_measured_rates
from raydrat.core.data.pack import Chunker, cached_tokenizer, chunks, encode, pack_chunk
from raydrat.core.data.plan import Plan, Unit, plan_corpus, sample_units
from raydrat.core.data.read import COUNT_KEYS, Mark, unit_pieces
from raydrat.core.data.spec import PackSpec, make_spec
from raydrat.core.data.split import SPLITS, Split

VAL_TOKENS_PER_UNIT = 1 << 20
"""The up-front check tokenizes (and the val split keeps) at most about this many val tokens
of a sampled unit: a unit holding one huge document costs the same as any other."""


def emit_counts(block_ids: np.ndarray, rate: float, seed: int) -> np.ndarray:
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


@dataclass(frozen=True)
class UnitStart:
    """Where reading one split of a unit starts: the chunk starting at ``mark``, whose first
    block is the unit's block ``first``, after skipping ``emitted`` of its emitted blocks."""

    mark: Mark = Mark()
    first: int = 0
    emitted: int = 0


class Run(NamedTuple):
    """Emitted blocks of one chunk (the first run after a start: those not skipped)."""

    ids: np.ndarray
    blocks: np.ndarray
    mark: Mark
    """Where the chunk starts."""
    first: int
    """The unit's block index of the chunk's first block."""
    emitted: int
    """The chunk's emitted blocks before this run's first."""


def unit_runs(
    unit: Unit,
    spec: PackSpec,
    split: Split,
    start: UnitStart | None = None,
    counts: dict | None = None,
    max_tokens: int | None = None,
) -> Iterator[Run]:
    """The emitted blocks of one split of one unit, a chunk at a time, from ``start``
    (default: the unit's start). Training blocks are repeated or skipped by the unit's
    mixing rate. ``counts`` (if given) receives the unit's read counts plus ``split_docs``,
    ``tokens``, ``blocks`` (emitted) and ``dropped_tokens`` of ``split``; ``max_tokens``:
    no block after the chunk that reaches that many tokens (with ``counts``, the rest of
    the unit is still read to count its documents)."""
    start = start or UnitStart()
    label = SPLITS.index(split)
    counted = counts is not None
    counts = {} if counts is None else counts
    counts.update(split_docs=0, tokens=0, blocks=0, dropped_tokens=0)
    first, skip = start.first, start.emitted
    pieces = unit_pieces(unit, spec, start.mark, counts)
    for chunk in chunks(pieces, label, spec.pack_rows):
        blocks, tokens, leftover = pack_chunk(chunk, spec)
        counts["split_docs"] += sum(p.doc_end for p in chunk)
        counts["tokens"] += tokens
        counts["dropped_tokens"] += leftover
        ids = (unit.unit_id << 32) + first + np.arange(len(blocks), dtype=np.int64)
        run_first, first = first, first + len(blocks)
        if split == "train" and unit.rate != 1.0:
            n = emit_counts(ids, unit.rate, spec.split_seed)
            ids, blocks = np.repeat(ids, n), np.repeat(blocks, n, axis=0)
        counts["blocks"] += len(ids)
        if len(ids) > skip:
            yield Run(ids[skip:], blocks[skip:], chunk[0].mark, run_first, skip)
        skip = max(0, skip - len(ids))
        if max_tokens is not None and counts["tokens"] >= max_tokens:
            if counted:  # the rest of the unit is counted, not tokenized
                counts["split_docs"] += sum(1 for p in pieces if p.label == label and p.doc_end)
            return


def unit_blocks(
    unit: Unit, spec: PackSpec, split: Split, counts: dict | None = None
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """``(block_ids, blocks)`` of one split of one unit, a chunk at a time."""
    for run in unit_runs(unit, spec, split, counts=counts):
        yield run.ids, run.blocks


SCAN_COUNTS = (*COUNT_KEYS, "val_docs", "val_tokens", "val_blocks", "val_dropped_tokens", "val_text_bytes")


def scan_unit(unit: Unit, spec: PackSpec) -> dict[str, int | str]:
    """One unit's counts (the up-front check, and the sample weighted mixing measures its
    sources on: ``val_text_bytes`` with ``val_tokens`` give tokens per byte), read in one
    pass: every document counted, val packed (at most :data:`VAL_TOKENS_PER_UNIT` tokens),
    train tokenized until it holds a block. A DataError's message goes under ``error``
    (exceptions lose their type on the way out of a Ray task; this keeps the message)."""
    counts: dict = {k: 0 for k in SCAN_COUNTS}
    try:
        has_block = _scan(unit, spec, counts)
    except DataError as exc:
        return {**{k: 0 for k in SCAN_COUNTS}, "unit_id": unit.unit_id, "source": unit.source, "error": str(exc),
                "train_has_block": False}  # fmt: skip
    return {"unit_id": unit.unit_id, "source": unit.source, "error": "", **counts, "train_has_block": has_block}


def _scan(unit: Unit, spec: PackSpec, counts: dict) -> bool:
    tok = cached_tokenizer(spec.tokenizer_json)
    val, train = Chunker(spec.pack_rows), Chunker(spec.pack_rows)
    train_tokens, has_block = 0, False

    def pack(chunk: list) -> None:
        blocks, tokens, leftover = pack_chunk(chunk, spec)
        counts["val_docs"] += sum(p.doc_end for p in chunk)
        counts["val_tokens"] += tokens
        counts["val_blocks"] += len(blocks)
        counts["val_dropped_tokens"] += leftover
        counts["val_text_bytes"] += sum(len(p.text.encode("utf-8")) for p in chunk)

    for piece in unit_pieces(unit, spec, counts=counts):
        if piece.label == 1:
            if counts["val_tokens"] < VAL_TOKENS_PER_UNIT and (chunk := val.add(piece)):
                pack(chunk)
        elif not has_block:
            train_tokens += len(encode(tok, [piece.text], 1)[0]) + int(piece.doc_end)
            has_block = train_tokens >= spec.block_len
            if train.add(piece):  # a chunk closed short of a block: its tokens are dropped
                train_tokens = 0
    if counts["val_tokens"] < VAL_TOKENS_PER_UNIT and (chunk := val.finish()):
        pack(chunk)
    return has_block


def plan_local(data_cfg: DataConfig, spec: PackSpec) -> Plan:
    """The plan with weighted mixing's rates measured on the sampled units, as
    :func:`raydrat.ray_data.datasets.build_datasets` measures them on Ray (unweighted
    sources: the plan as it is, nothing read)."""
    plan = plan_corpus(data_cfg)
    if not any(s.weight for s in data_cfg.sources):
        return plan
    scans = [scan_unit(u, spec) for u in sample_units(plan.units, data_cfg.val_max_units)]
    return with_measured_rates(data_cfg, plan, scans)


def no_text_error(where: str, counts: dict) -> DataError:
    """What a read that found no non-empty document says, in one line."""
    if counts.get("empty_docs"):
        return DataError(
            f"{where} holds no text: all {counts['empty_docs']} documents are empty or null: point it at some text"
        )
    return DataError(f"{where} holds no documents: point it at some text")


def iter_blocks_local(data_cfg: DataConfig, seq_len: int, vocab_size: int, split: Split) -> Iterator[np.ndarray]:
    """The blocks of ``split`` (``int32[seq_len + 1]`` each), computed in this process without
    Ray: the same blocks the training stream and the val split are made of, in unit order.
    A corpus without one non-empty document raises a DataError saying so."""
    spec, _ = make_spec(data_cfg, seq_len, vocab_size)
    units = plan_local(data_cfg, spec).units
    if split == "val":
        units = sample_units(units, data_cfg.val_max_units)
    totals: dict = {}
    for unit in units:
        counts: dict = {}
        for run in unit_runs(unit, spec, split, counts=counts):
            yield from run.blocks
        for k in ("docs", "empty_docs"):
            totals[k] = totals.get(k, 0) + counts.get(k, 0)
    if not totals.get("docs"):
        raise no_text_error(f"data.sources ({', '.join(s.path for s in data_cfg.sources)})", totals)
