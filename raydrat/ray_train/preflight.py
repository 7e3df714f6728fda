"""The checks a run (and ``raydrat data prepare``) makes before it starts Ray: the data it will
read and its tokenizer.

A wrong ``data.sources`` path, a prepared directory without a complete manifest, a
tokenizer of the wrong vocabulary or one prepared for another tokenizer or sequence length
fails here in one line, without waiting for Ray to start. Everything here reads metadata
only (listings, parquet footers, the prepared manifest) and writes nothing, as ``raydrat
train --dry-run`` does: the demo corpus and its tokenizer, when not built yet, are left to the
run, which builds them after the checks that need the Ray cluster (a demo corpus refused on a
cluster of several nodes is never built); built from this Python's standard library at the
model's vocabulary size, they always serve it.
"""

from __future__ import annotations

from pathlib import Path

from raydrat.config import RaydratConfig
from raydrat.core.data.demo import read_manifest, tokenizer_file
from raydrat.core.data.errors import DataError
from raydrat.core.data.plan import DEMO_SOURCE, plan_corpus
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
    ``raydrat data prepare`` reads too). A demo corpus or demo tokenizer not built yet is
    not built here (see the module's docstring)."""
    d = cfg.data
    demo_dir = Path(d.demo_dir).absolute()
    if d.tokenizer_path or (demo_dir / tokenizer_file(cfg.model.vocab_size)).is_file():
        make_spec(d, cfg.model.seq_len, cfg.model.vocab_size)
    built = read_manifest(demo_dir) is not None
    sources = [src for src in d.sources if built or src.path != DEMO_SOURCE]
    if not sources:
        return  # the demo corpus alone, to build: it holds documents
    plan = plan_corpus(d.model_copy(update={"sources": sources}))
    if (not plan.units or plan.rows == 0) and len(sources) == len(d.sources):
        corpus = ", ".join(src.path for src in d.sources)
        raise DataError(f"corpus {corpus} holds no documents: point data.sources at some text")
