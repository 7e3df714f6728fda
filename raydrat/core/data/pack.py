"""Tokenize and pack: a split's documents, in order, form packing groups of
``data.pack_rows`` documents. A group is tokenized (``encode_batch``,
``data.tokenize_batch_size`` documents at a time), joined with the end-of-document token
after each document, and cut into blocks of ``seq_len + 1`` tokens. The group's final
partial block (fewer than ``seq_len + 1`` tokens) is dropped and counted (``leftover``)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from functools import lru_cache

import numpy as np
from tokenizers import Tokenizer

from raydrat.core.data.spec import PackSpec
from raydrat.core.data.tokenizer import tokenizer_from_str


def pack_tokens(docs: Sequence[Sequence[int]], eod_id: int, block_len: int) -> tuple[list[list[int]], int]:
    """Concatenate ``docs``, each followed by ``eod_id``, and cut the stream into blocks of
    ``block_len`` tokens. Returns ``(blocks, leftover)``: the ``leftover`` tokens at the end
    of the stream, too few for a block, are dropped."""
    blocks, leftover = pack_array(docs, eod_id, block_len)
    return blocks.tolist(), leftover


def pack_array(docs: Sequence[Sequence[int]], eod_id: int, block_len: int) -> tuple[np.ndarray, int]:
    """:func:`pack_tokens` as an ``int32`` array of shape ``(n_blocks, block_len)``."""
    stream = np.empty(sum(len(d) + 1 for d in docs), dtype=np.int32)
    pos = 0
    for doc in docs:
        stream[pos : pos + len(doc)] = doc
        pos += len(doc)
        stream[pos] = eod_id
        pos += 1
    n_blocks = len(stream) // block_len
    return stream[: n_blocks * block_len].reshape(n_blocks, block_len), len(stream) % block_len


@lru_cache(maxsize=2)
def cached_tokenizer(tokenizer_json: str) -> Tokenizer:
    """Parsed once per worker process (Ray reuses workers across tasks)."""
    return tokenizer_from_str(tokenizer_json)


def encode(tok: Tokenizer, texts: list[str], batch_size: int) -> list[list[int]]:
    """Token ids of ``texts``, ``batch_size`` documents per ``encode_batch`` call."""
    # encode_batch_fast (tokenizers >= 0.21) is encode_batch without character offsets.
    encode_batch = getattr(tok, "encode_batch_fast", tok.encode_batch)
    return [e.ids for i in range(0, len(texts), batch_size) for e in encode_batch(texts[i : i + batch_size])]


def pack_groups(docs: list[str], spec: PackSpec) -> Iterator[tuple[np.ndarray, int]]:
    """``(blocks, leftover)`` for each packing group of ``docs``."""
    tok = cached_tokenizer(spec.tokenizer_json)
    for start in range(0, len(docs), spec.pack_rows):
        ids = encode(tok, docs[start : start + spec.pack_rows], spec.tokenize_batch_size)
        yield pack_array(ids, spec.eod_id, spec.block_len)


def has_block(docs: list[str], spec: PackSpec) -> bool:
    """Whether ``docs`` pack into at least one block, tokenizing only as far as needed."""
    tok = cached_tokenizer(spec.tokenizer_json)
    for start in range(0, len(docs), spec.pack_rows):
        n = 0
        for doc in docs[start : start + spec.pack_rows]:
            n += len(tok.encode(doc).ids) + 1
            if n >= spec.block_len:
                return True
    return False
