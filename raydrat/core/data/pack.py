"""Tokenize and pack: a split's pieces, in order, form *chunks* (packing groups). A chunk
ends after the piece that completes its ``data.pack_rows``-th document, or that brings it to
:data:`CHUNK_CHARS` characters (a long document spans several chunks). A chunk's pieces are
tokenized (``encode_batch``, ``data.tokenize_batch_size`` pieces and at most
:data:`ENCODE_CHARS` characters at a time), joined with the end-of-document token after each
document's last piece, and cut into blocks of ``seq_len + 1`` tokens. The chunk's final
partial block (fewer than ``seq_len + 1`` tokens) is dropped and counted (``leftover``).

Chunks are where reading can start again (a chunk's first piece carries a
:class:`~raydrat.core.data.read.Mark`): a resumed stream re-reads at most one chunk."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from functools import lru_cache

import numpy as np
from tokenizers import Tokenizer

from raydrat.core.data.read import Piece
from raydrat.core.data.spec import PackSpec
from raydrat.core.data.tokenizer import tokenizer_from_str

CHUNK_CHARS = 1 << 20
"""A chunk closes once its pieces hold this many characters."""
ENCODE_CHARS = 1 << 20
"""Characters given to one ``encode_batch`` call at most (bounds the tokenizer's own memory)."""


def pack_tokens(docs: Sequence[Sequence[int]], eod_id: int, block_len: int) -> tuple[list[list[int]], int]:
    """Concatenate ``docs``, each followed by ``eod_id``, and cut the stream into blocks of
    ``block_len`` tokens. Returns ``(blocks, leftover)``: the ``leftover`` tokens at the end
    of the stream, too few for a block, are dropped."""
    blocks, leftover = pack_array(docs, eod_id, block_len)
    return blocks.tolist(), leftover


def pack_array(
    docs: Sequence[Sequence[int]], eod_id: int, block_len: int, ends: Sequence[bool] | None = None
) -> tuple[np.ndarray, int]:
    """:func:`pack_tokens` as an ``int32`` array of shape ``(n_blocks, block_len)``; with
    ``ends``, only the pieces whose entry is true are followed by ``eod_id``."""
    ends = [True] * len(docs) if ends is None else ends
    stream = np.empty(sum(len(d) + int(e) for d, e in zip(docs, ends, strict=True)), dtype=np.int32)
    pos = 0
    for doc, end in zip(docs, ends, strict=True):
        stream[pos : pos + len(doc)] = doc
        pos += len(doc)
        if end:
            stream[pos] = eod_id
            pos += 1
    n_blocks = len(stream) // block_len
    return stream[: n_blocks * block_len].reshape(n_blocks, block_len), len(stream) % block_len


@lru_cache(maxsize=2)
def cached_tokenizer(tokenizer_json: str) -> Tokenizer:
    """Parsed once per process."""
    return tokenizer_from_str(tokenizer_json)


def encode(tok: Tokenizer, texts: Sequence[str], batch_size: int) -> list[list[int]]:
    """Token ids of ``texts``, at most ``batch_size`` texts and :data:`ENCODE_CHARS`
    characters per ``encode_batch`` call."""
    # encode_batch_fast (tokenizers >= 0.21) is encode_batch without character offsets.
    encode_batch = getattr(tok, "encode_batch_fast", tok.encode_batch)
    out: list[list[int]] = []
    i = 0
    while i < len(texts):
        j, chars = i, 0
        while j < len(texts) and j - i < batch_size and (j == i or chars + len(texts[j]) <= ENCODE_CHARS):
            chars += len(texts[j])
            j += 1
        out += [e.ids for e in encode_batch(list(texts[i:j]))]
        i = j
    return out


class Chunker:
    """Groups one split's pieces into chunks (see the module docstring): :meth:`add` returns
    the chunk a piece closes, :meth:`finish` what is left."""

    def __init__(self, pack_rows: int):
        self.pack_rows = pack_rows
        self.pieces: list[Piece] = []
        self.docs = self.chars = 0

    def add(self, piece: Piece) -> list[Piece] | None:
        self.pieces.append(piece)
        self.chars += len(piece.text)
        self.docs += int(piece.doc_end)
        if (piece.doc_end and self.docs >= self.pack_rows) or self.chars >= CHUNK_CHARS:
            return self.finish()
        return None

    def finish(self) -> list[Piece] | None:
        chunk, self.pieces, self.docs, self.chars = self.pieces, [], 0, 0
        return chunk or None


def pack_chunk(chunk: list[Piece], spec: PackSpec) -> tuple[np.ndarray, int, int]:
    """``(blocks, tokens, leftover)`` of a chunk: its blocks, its tokens (end-of-document
    tokens included) and the tail dropped."""
    ids = encode(cached_tokenizer(spec.tokenizer_json), [p.text for p in chunk], spec.tokenize_batch_size)
    blocks, leftover = pack_array(ids, spec.eod_id, spec.block_len, [p.doc_end for p in chunk])
    return blocks, len(blocks) * spec.block_len + leftover, leftover


def chunks(pieces: Iterator[Piece], label: int, pack_rows: int) -> Iterator[list[Piece]]:
    """The chunks of the pieces of split ``label`` (0 train, 1 val) among ``pieces``."""
    chunker = Chunker(pack_rows)
    for piece in pieces:
        if piece.label == label and (chunk := chunker.add(piece)):
            yield chunk
    if chunk := chunker.finish():
        yield chunk
