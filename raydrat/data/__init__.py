"""Data: sources, the byte-level BPE tokenizer, the Ray Data pipeline that packs documents into
``seq_len + 1`` token blocks split into train/val, and the embedded demo corpus."""

from raydrat.data.demo import build_demo_corpus, ensure_demo_corpus, read_manifest, tokenizer_file
from raydrat.data.errors import DataError
from raydrat.data.pipeline import (
    DatasetBundle,
    DataStats,
    build_datasets,
    is_val_document,
    iter_blocks_local,
    pack_tokens,
    plan_corpus,
    plan_units,
    resolve_sources,
    resolve_tokenizer_path,
)
from raydrat.data.tokenizer import (
    EOD_TOKEN,
    PAD_TOKEN,
    load_tokenizer,
    special_ids,
    tokenizer_hash,
    train_tokenizer,
)

__all__ = [
    "EOD_TOKEN",
    "PAD_TOKEN",
    "DataError",
    "DataStats",
    "DatasetBundle",
    "build_datasets",
    "build_demo_corpus",
    "ensure_demo_corpus",
    "is_val_document",
    "iter_blocks_local",
    "load_tokenizer",
    "pack_tokens",
    "plan_corpus",
    "plan_units",
    "read_manifest",
    "resolve_sources",
    "resolve_tokenizer_path",
    "special_ids",
    "tokenizer_file",
    "tokenizer_hash",
    "train_tokenizer",
]
