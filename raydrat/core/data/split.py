"""The train/val split: a document goes to val when ``blake2b(text, key=split_seed)`` read as
a number in [0, 1) is below ``data.val_fraction``. The split depends on the text alone:
disjoint by construction, identical across runs, clusters and configs, and duplicated
documents land on the same side. Of a document longer than :data:`SPLIT_PREFIX_BYTES`, the
hash covers that many first bytes: a document of any size is split as soon as its first
piece is read (:mod:`raydrat.core.data.read`), without holding the rest."""

from __future__ import annotations

import hashlib
from typing import Literal

from raydrat.config.data import DataConfig

Split = Literal["train", "val"]
SPLITS: tuple[Split, Split] = ("train", "val")
"""A piece's ``label`` is its split's index here: 0 train, 1 val."""
SPLIT_PREFIX_BYTES = 1 << 18
"""UTF-8 bytes of a document that decide its split (all of a shorter document)."""


def is_val_document(text: str, split_seed: int, val_fraction: float) -> bool:
    """The split rule: a keyed hash of the text (its first :data:`SPLIT_PREFIX_BYTES` bytes),
    as a fraction of 2**64, below ``val_fraction``."""
    key = split_seed.to_bytes(8, "little", signed=True)
    head = text[:SPLIT_PREFIX_BYTES].encode("utf-8")[:SPLIT_PREFIX_BYTES]
    digest = hashlib.blake2b(head, digest_size=8, key=key).digest()
    return int.from_bytes(digest, "little") < val_fraction * 2**64


def split_documents(
    texts: list[str | None], split_seed: int, val_fraction: float
) -> tuple[dict[Split, list[str]], int]:
    """Non-empty documents of each split, in order, and the number of empty ones."""
    docs: dict[Split, list[str]] = {"train": [], "val": []}
    for text in texts:
        if text:
            val = is_val_document(text, split_seed, val_fraction)
            docs["val" if val else "train"].append(text)
    return docs, sum(1 for t in texts if not t)


def split_rule(data_cfg: DataConfig) -> dict:
    """The rule and its settings, as recorded in lineage and prepare manifests."""
    return {
        "rule": f"val iff blake2b(utf8(text)[:{SPLIT_PREFIX_BYTES}], digest_size=8, key=split_seed as int64 LE) "
        "read as little-endian uint64 < val_fraction * 2**64",
        "val_fraction": data_cfg.val_fraction,
        "split_seed": data_cfg.split_seed,
        "val_max_units": data_cfg.val_max_units,
    }
