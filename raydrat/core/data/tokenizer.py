"""Byte-level BPE tokenizer (Hugging Face ``tokenizers``): train, load, inspect.

Every byte is in the base alphabet, so any text encodes without unknown tokens. Two special
tokens are always present: :data:`EOD_TOKEN` separates packed documents, :data:`PAD_TOKEN` is
there for callers that pad. Loaded tokenizers encode special-token strings found *inside*
documents as ordinary text, so a document can never inject an end-of-document id.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from raydrat.core.data.errors import DataError

EOD_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
SPECIAL_TOKENS = (EOD_TOKEN, PAD_TOKEN)
MIN_VOCAB_SIZE = 256 + len(SPECIAL_TOKENS)
"""A byte-level BPE holds at least the 256 byte tokens and the special tokens."""


def train_tokenizer(texts: Iterable[str], vocab_size: int, out_path: str | Path) -> Tokenizer:
    """Train a byte-level BPE of at most ``vocab_size`` tokens on ``texts`` and save it to
    ``out_path`` (written to a temporary file first, then renamed). Deterministic for the same
    texts in the same order. A small corpus may stop short of ``vocab_size``."""
    if vocab_size < MIN_VOCAB_SIZE:
        raise DataError(
            f"model.vocab_size ({vocab_size}) is below the {MIN_VOCAB_SIZE} tokens a byte-level "
            f"BPE needs (256 bytes + {len(SPECIAL_TOKENS)} special tokens): raise model.vocab_size"
        )
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(f".{out_path.name}.tmp-{os.getpid()}")
    tok.save(str(tmp))
    os.replace(tmp, out_path)
    return tokenizer_from_str(tok.to_str())


def tokenizer_from_str(json_text: str) -> Tokenizer:
    """A tokenizer from its JSON text, set up to encode documents (special-token strings in
    the text stay plain text)."""
    tok = Tokenizer.from_str(json_text)
    tok.encode_special_tokens = True
    return tok


def load_tokenizer(path: str | Path, vocab_size: int) -> Tokenizer:
    """Load a ``tokenizers`` JSON file and check that it fits a model of ``vocab_size`` tokens
    and has the special tokens."""
    path = Path(path)
    if not path.is_file():
        raise DataError(
            f"tokenizer {path} not found: run `raydrat data demo` or set data.tokenizer_path"
        )
    try:
        tok = tokenizer_from_str(path.read_text(encoding="utf-8"))
    except Exception as exc:  # tokenizers raises plain Exception subclasses
        raise DataError(
            f"tokenizer {path} is not a valid tokenizers JSON file ({exc}): "
            "point data.tokenizer_path at a tokenizers JSON file"
        ) from None
    n = tok.get_vocab_size(with_added_tokens=True)
    if n > vocab_size:
        raise DataError(
            f"tokenizer {path} has {n} tokens but model.vocab_size is {vocab_size}: raise "
            f"model.vocab_size to at least {n} or use a smaller tokenizer"
        )
    special_ids(tok, origin=str(path))
    return tok


def special_ids(tok: Tokenizer, origin: str = "the tokenizer") -> tuple[int, int]:
    """``(eod_id, pad_id)``."""
    ids = [tok.token_to_id(t) for t in SPECIAL_TOKENS]
    missing = [t for t, i in zip(SPECIAL_TOKENS, ids, strict=True) if i is None]
    if missing:
        raise DataError(
            f"{origin} lacks the special token(s) {', '.join(missing)}: train it with "
            "raydrat.core.data.tokenizer.train_tokenizer or add them"
        )
    return ids[0], ids[1]


def tokenizer_hash(path: str | Path) -> str:
    """sha256 (hex) of the tokenizer file: identifies the tokenizer in manifests and runs."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()
