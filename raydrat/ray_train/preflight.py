"""The checks a run (and ``raydrat data prepare``) makes before it starts Ray: the data it will
read and its tokenizer.

A wrong ``data.sources`` path, a prepared directory without a complete manifest, a
tokenizer of the wrong vocabulary or one prepared for another tokenizer or sequence length
fails here in one line, without waiting for Ray to start. Everything here reads metadata
only (listings, parquet footers, the prepared manifest), as ``raydrat train --dry-run``
does; the demo tokenizer is trained here on first use, which the run would do next anyway.
"""

from __future__ import annotations

from raydrat.config import RaydratConfig
from raydrat.core.data.errors import DataError
from raydrat.core.data.plan import plan_corpus
from raydrat.core.data.prepared import check_manifest, read_manifest_at
from raydrat.core.data.sources import fs_path, location_for
from raydrat.core.data.spec import make_spec
from raydrat.core.data.tokenizer import tokenizer_hash


def check_data(cfg: RaydratConfig) -> None:
    """Raise :class:`DataError` (or ``ConfigError``) when the run's data or tokenizer cannot
    serve it."""
    d = cfg.data
    if not d.prepared:
        check_sources(cfg)
        return
    _, tok_path = make_spec(d, cfg.model.seq_len, cfg.model.vocab_size)
    manifest = read_manifest_at(location_for(d.prepared, d.prepared_endpoint_url), fs_path(d.prepared))
    check_manifest(manifest, f"data.prepared = {d.prepared!r}", tokenizer_hash(tok_path), cfg.model.seq_len)


def check_sources(cfg: RaydratConfig) -> None:
    """``data.sources`` can be read and hold documents, and the tokenizer fits the model (what
    ``raydrat data prepare`` reads too)."""
    d = cfg.data
    make_spec(d, cfg.model.seq_len, cfg.model.vocab_size)
    plan = plan_corpus(d)
    if not plan.units or plan.rows == 0:
        corpus = ", ".join(src.path for src in d.sources)
        raise DataError(f"corpus {corpus} holds no documents: point data.sources at some text")
