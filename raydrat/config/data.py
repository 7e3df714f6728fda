"""Where the documents come from and how they become blocks (section ``data:``)."""

from __future__ import annotations

import codecs
from typing import Literal

from pydantic import Field, field_validator, model_validator

from raydrat.config.base import Section


class SourceConfig(Section):
    path: str
    """A file, a directory, a glob, an ``s3://bucket/prefix`` URI (a key, a prefix or a
    glob), or ``demo`` for the embedded corpus (built on first use from the running
    interpreter's standard library)."""
    format: Literal["parquet", "text", "jsonl", "hf"] | None = None
    """``parquet``: one document per row of ``text_column``. ``text``: plain text files
    (``.gz`` decompressed), split into documents by ``text_mode``. ``jsonl``: JSON Lines
    files (``.jsonl``, ``.ndjson``, ``.gz`` decompressed), one document per line, its text in
    the field ``text_column``; a line that is not JSON stops the run, or is skipped and
    counted (``corrupt_lines``) with ``on_corrupt: skip``. ``hf``: a Hugging Face ``datasets``
    dataset written by ``save_to_disk`` (a directory with ``state.json`` and ``.arrow`` files;
    one split of a ``DatasetDict``), one document per row of ``text_column``. ``None``: from
    the file names: ``.parquet`` is parquet, ``.jsonl``/``.ndjson`` (``.gz`` too) is jsonl, a
    directory with ``state.json`` is hf, any other file is text; a directory, prefix or glob
    is parquet when it holds ``.parquet`` files, else jsonl when it holds JSON Lines files,
    else text."""

    text_column: str = "text"
    """Column (parquet, hf) or JSON field (jsonl) holding the document text; other columns
    and fields are ignored."""
    text_mode: Literal["file", "line"] = "file"
    """Plain text only: ``file``: one document per file; ``line``: one per line (empty
    lines are counted as empty documents)."""
    weight: float | None = Field(None, gt=0)
    """Relative share of training tokens when several sources are mixed: a source's
    training blocks are repeated or subsampled (deterministically, by block) so that its
    share of the training stream is ``weight / sum(weights)`` (shares estimated from the
    sources' sizes). ``None`` on every source: sources are concatenated in their natural
    proportions. Give every source a weight or none."""
    endpoint_url: str | None = None
    """S3 only: endpoint of an S3-compatible store (MinIO, Ceph, GCS interop), e.g.
    ``http://127.0.0.1:9000``. ``None``: AWS. Credentials come from the standard chain
    (``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``, ``~/.aws``, instance roles)."""
    region: str | None = None
    """S3 only: the bucket's region (``None``: ``AWS_DEFAULT_REGION`` or ``us-east-1``)."""


class DataConfig(Section):
    sources: list[SourceConfig] = Field(default_factory=lambda: [SourceConfig(path="demo")], min_length=1)
    """Where the documents come from."""
    demo_dir: str = "data/demo"
    """Where the embedded demo corpus and its tokenizer are written (relative paths are
    resolved against the working directory)."""
    tokenizer_path: str | None = None
    """A ``tokenizers`` JSON file, or a directory saved by transformers (``tokenizer.json``
    inside). ``None``: ``tokenizer-<vocab_size>.json`` beside the demo corpus, trained on first use."""
    eod_token: str | None = None
    """The token that ends each packed document (e.g. ``</s>``). ``None``: the ``eos_token`` of
    a transformers directory's ``tokenizer_config.json``, else ``<|endoftext|>``. A tokenizer
    without a pad token pads with this one."""
    val_fraction: float = Field(0.05, gt=0.0, lt=0.5)
    """Share of documents held out for validation: a document goes to val when a keyed
    hash of its text (key ``split_seed``) falls below this fraction, so the split is
    deterministic, disjoint, and independent of file order and cluster size."""
    split_seed: int = 0
    """Seed of the train/val split hash."""
    tokenize_batch_size: int = Field(64, ge=1)
    """Documents (pieces of documents) per ``encode_batch`` call when tokenizing."""
    pack_rows: int = Field(256, ge=1)
    """Documents per packing group (and plain-text files per unit of work): a group's
    documents are concatenated (each followed by the end-of-document token) and cut into
    ``seq_len + 1`` blocks; the group's last partial block is dropped and counted. A group
    also ends once it holds 2**20 characters (a long document spans several groups)."""
    streams: int = Field(12, ge=1)
    """Canonical streams the global training order interleaves (docs/data.md): the order is
    a function of ``train.seed`` and the epoch alone, the same for any number of workers. A
    worker count that divides it reads every unit once (12: 1, 2, 3, 4, 6 or 12 workers);
    another count still trains on the same order, some units being read by several workers.
    A corpus of fewer units uses the largest divisor of it that is at most its units."""
    shuffle_buffer: int = Field(256, ge=0)
    """Blocks per window of each stream's seeded local shuffle: a stream's blocks are cut
    into windows of this many, each emitted in its own seeded order (0 or 1: no local
    shuffle). The world mixes ``streams`` windows at any time; a resume re-reads at most one
    window's start per stream."""
    prefetch_batches: int = Field(2, ge=0)
    """Micro-batches each Train worker reads ahead (in a thread) of the one it trains on."""
    tokenize_actors: int = Field(0, ge=0)
    """``raydrat data prepare``: size of its tokenizer actor pool (each actor loads the
    tokenizer once). 0: the cluster's CPUs."""
    encoding: str = "utf-8"
    """How text files without a byte order mark are decoded (a Python codec name:
    ``utf-16-le``, ``latin-1``, ``cp1252``...). A file's byte order mark (UTF-8, UTF-16 or
    UTF-32) overrides it."""
    on_corrupt: Literal["error", "skip"] = "error"
    """A parquet, Arrow or gzip file that cannot be read, or a JSON Lines line that is not
    JSON: ``error`` stops and names it; ``skip`` leaves it out and counts it
    (``skipped_files`` / ``corrupt_lines`` in the metrics and the manifest). Bytes after a
    gzip file's last member are never fatal: logged and counted (``corrupt_bytes``)."""
    val_max_units: int = Field(32, ge=1)
    """The val split is drawn from at most this many units of work (parquet row groups or
    groups of text files), spread evenly over the corpus, so building it costs the same for
    any corpus size. Val-rule documents of the other units are held out too (never
    trained on)."""
    prepared: str | None = None
    """A directory written by ``raydrat data prepare`` (local or ``s3://``): train on its
    blocks instead of reading ``sources``. Its manifest must match the tokenizer and
    ``model.seq_len``."""
    prepared_endpoint_url: str | None = None
    """S3-compatible endpoint for ``prepared`` (see ``sources[].endpoint_url``)."""
    tokenizer_sample_docs: int = Field(20000, ge=1)
    """``raydrat data tokenizer``: documents sampled (evenly over the units) to train the BPE."""

    @field_validator("encoding")
    @classmethod
    def _known_encoding(cls, value: str) -> str:
        try:
            codecs.lookup(value)
        except LookupError:
            raise ValueError(
                f"unknown encoding {value!r}: give a Python codec name like utf-8, utf-16-le or latin-1"
            ) from None
        return value

    @model_validator(mode="after")
    def _check_weights(self) -> DataConfig:
        weighted = [s.weight is not None for s in self.sources]
        if any(weighted) and not all(weighted):
            missing = [str(i) for i, w in enumerate(weighted) if not w]
            raise ValueError(
                f"data.sources[{', '.join(missing)}].weight is missing: give every source a "
                "weight, or none (natural proportions)"
            )
        return self
