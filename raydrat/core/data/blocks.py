"""A unit's blocks: read → split → tokenize → pack, one unit independent of every other.
Packing groups never span units. Rows are ``{"tokens": int32[seq_len + 1], "block_id":
int64}`` with ``block_id = unit_id << 32 | index of the block within its unit and split``.
Training blocks are repeated or skipped by the unit's mixing rate (:func:`emit_counts`).

Because a unit's blocks depend only on its data and the config, never on Ray's block sizes,
batch boundaries or execution order, :func:`iter_blocks_local` reproduces the blocks that
:func:`raydrat.ray_data.datasets.build_datasets` streams, exactly and without Ray."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from raydrat.config.data import DataConfig
from raydrat.core.data.errors import DataError
from raydrat.core.data.mixing import with_measured_rates
from raydrat.core.data.pack import has_block, pack_groups
from raydrat.core.data.plan import Plan, Unit, plan_corpus, sample_units
from raydrat.core.data.read import read_unit
from raydrat.core.data.spec import PackSpec, make_spec
from raydrat.core.data.split import Split


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


def unit_blocks(
    unit: Unit, spec: PackSpec, split: Split, counts: dict | None = None
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """``(block_ids, blocks)`` of one split of one unit, a packing group at a time. Training
    blocks are repeated or skipped by the unit's mixing rate. ``counts`` (if given) receives
    the unit's counts plus ``tokens``, ``blocks`` and ``dropped_tokens`` of ``split``."""
    docs, unit_counts = read_unit(unit, spec)
    yield from _blocks(unit, spec, split, docs, unit_counts, counts)


def _blocks(
    unit: Unit, spec: PackSpec, split: Split, docs: dict, unit_counts: dict, counts: dict | None
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    first = tokens = dropped = emitted = 0
    for blocks, leftover in pack_groups(docs[split], spec):
        tokens += len(blocks) * spec.block_len + leftover
        dropped += leftover
        if len(blocks):
            ids = (unit.unit_id << 32) + first + np.arange(len(blocks), dtype=np.int64)
            first += len(blocks)
            if split == "train" and unit.rate != 1.0:
                n = emit_counts(ids, unit.rate, spec.split_seed)
                ids, blocks = np.repeat(ids, n), np.repeat(blocks, n, axis=0)
            emitted += len(blocks)
            if len(blocks):
                yield ids, blocks
    if counts is not None:
        counts.update(unit_counts, split_docs=len(docs[split]), tokens=tokens, blocks=emitted, dropped_tokens=dropped)


SCAN_COUNTS = (
    "docs",
    "empty_docs",
    "invalid_utf8_docs",
    "skipped_files",
    "text_bytes",
    "val_docs",
    "val_tokens",
    "val_blocks",
    "val_dropped_tokens",
    "corrupt_lines",
)


def scan_unit(unit: Unit, spec: PackSpec) -> dict[str, int | str]:
    """One unit's counts (the up-front check, and the sample weighted mixing measures its
    sources on: ``val_text_bytes`` with ``val_tokens`` give tokens per byte), or its
    DataError's message under ``error`` (exceptions lose their type on the way out of a Ray
    task; this keeps the message)."""
    try:
        docs, unit_counts = read_unit(unit, spec)
        counts: dict = {}
        for _ in _blocks(unit, spec, "val", docs, unit_counts, counts):
            pass
    except DataError as exc:
        return {
            **{k: 0 for k in SCAN_COUNTS},
            "unit_id": unit.unit_id,
            "source": unit.source,
            "error": str(exc),
            "val_text_bytes": 0,
            "train_has_block": False,
        }
    return {
        "unit_id": unit.unit_id,
        "source": unit.source,
        "error": "",
        **{
            k: counts[k]
            for k in ("docs", "empty_docs", "invalid_utf8_docs", "skipped_files", "text_bytes", "corrupt_lines")
        },
        "val_docs": counts["split_docs"],
        "val_tokens": counts["tokens"],
        "val_blocks": counts["blocks"],
        "val_dropped_tokens": counts["dropped_tokens"],
        "val_text_bytes": sum(len(d.encode("utf-8")) for d in docs["val"]),
        "train_has_block": has_block(docs["train"], spec),
    }


def plan_local(data_cfg: DataConfig, spec: PackSpec) -> Plan:
    """The plan with weighted mixing's rates measured on the sampled units, as
    :func:`raydrat.ray_data.datasets.build_datasets` measures them on Ray (unweighted
    sources: the plan as it is, nothing read)."""
    plan = plan_corpus(data_cfg)
    if not any(s.weight for s in data_cfg.sources):
        return plan
    scans = [scan_unit(u, spec) for u in sample_units(plan.units, data_cfg.val_max_units)]
    return with_measured_rates(data_cfg, plan, scans)


def iter_blocks_local(data_cfg: DataConfig, seq_len: int, vocab_size: int, split: Split) -> Iterator[np.ndarray]:
    """The blocks of ``split`` (``int32[seq_len + 1]`` each), computed in this process without
    Ray: the same blocks as :func:`raydrat.ray_data.datasets.build_datasets`, in unit order."""
    spec, _ = make_spec(data_cfg, seq_len, vocab_size)
    units = plan_local(data_cfg, spec).units
    if split == "val":
        units = sample_units(units, data_cfg.val_max_units)
    for unit in units:
        for _, blocks in unit_blocks(unit, spec, split):
            yield from blocks
