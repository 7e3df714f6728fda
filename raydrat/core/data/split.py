"""The train/val split: a document goes to val when ``blake2b(text, key=split_seed)`` read as
a number in [0, 1) is below ``data.val_fraction``. The split depends on the text alone:
disjoint by construction, identical across runs, clusters and configs, and duplicated
documents land on the same side."""

from __future__ import annotations

import hashlib
from typing import Literal

from raydrat.config.data import DataConfig

Split = Literal["train", "val"]


def is_val_document(text: str, split_seed: int, val_fraction: float) -> bool:
    """The split rule: a keyed hash of the text, as a fraction of 2**64, below
    ``val_fraction``."""
    key = split_seed.to_bytes(8, "little", signed=True)
    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8, key=key).digest()
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
        "rule": "val iff blake2b(utf8(text), digest_size=8, key=split_seed as int64 LE) "
        "read as little-endian uint64 < val_fraction * 2**64",
        "val_fraction": data_cfg.val_fraction,
        "split_seed": data_cfg.split_seed,
        "val_max_units": data_cfg.val_max_units,
    }
