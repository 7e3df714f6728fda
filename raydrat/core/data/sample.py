"""A sample of the corpus's documents, spread evenly over its units, and ``raydrat data
tokenizer``: a byte-level BPE trained on that sample."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

from raydrat.config.data import DataConfig
from raydrat.core.data.errors import DataError
from raydrat.core.data.plan import plan_corpus
from raydrat.core.data.read import ReadSpec, unit_pieces
from raydrat.core.data.tokenizer import tokenizer_hash, train_tokenizer

SAMPLE_DOC_CHARS = 1 << 20
"""Of a longer document, the sample keeps this many first characters."""


def sample_documents(data_cfg: DataConfig, n_docs: int) -> Iterator[str]:
    """Up to ``n_docs`` non-empty documents (at most :data:`SAMPLE_DOC_CHARS` characters of
    each) read from units spread evenly over every source (whole units, in order, until
    enough)."""
    plan = plan_corpus(data_cfg)
    spec = ReadSpec.of(data_cfg)
    seen = 0
    for idx in spread_order(len(plan.units)):
        parts: list[str] = []
        size = 0
        for piece in unit_pieces(plan.units[idx], spec):
            if size < SAMPLE_DOC_CHARS:
                parts.append(piece.text[: SAMPLE_DOC_CHARS - size])
                size += len(parts[-1])
            if piece.doc_end:
                yield "".join(parts)
                parts, size = [], 0
                seen += 1
                if seen >= n_docs:
                    return


def spread_order(n: int) -> list[int]:
    """0..n-1 in an order that covers the range evenly early (bit-reversal-like)."""
    order, seen = [], set()
    step = 1 << max(0, (n - 1).bit_length())
    while step:
        for i in range(0, n, step):
            if i not in seen:
                seen.add(i)
                order.append(i)
        step //= 2
    return order


def train_tokenizer_on_sources(data_cfg: DataConfig, vocab_size: int, out: str) -> dict:
    """Train a byte-level BPE on a sample of the configured sources and save it to ``out``."""
    t0 = time.perf_counter()
    docs = list(sample_documents(data_cfg, data_cfg.tokenizer_sample_docs))
    if not docs:
        raise DataError(
            "data.sources hold no non-empty documents to train a tokenizer on: point data.sources at some text"
        )
    tok = train_tokenizer(docs, vocab_size, out)
    return {
        "path": str(Path(out).absolute()),
        "docs": len(docs),
        "text_bytes": sum(len(d.encode()) for d in docs),
        "vocab_size": tok.get_vocab_size(with_added_tokens=True),
        "sha256": tokenizer_hash(out),
        "seconds": round(time.perf_counter() - t0, 1),
    }
