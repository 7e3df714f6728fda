"""Byte-level BPE tokenizer (Hugging Face ``tokenizers``): train, load, inspect.

Every byte is in the base alphabet, so any text encodes without unknown tokens. Two special
tokens are always present in the tokenizers raydrat trains: :data:`EOD_TOKEN` separates
packed documents, :data:`PAD_TOKEN` is there for callers that pad. Loaded tokenizers encode
special-token strings found *inside* documents as ordinary text, so a document can never
inject an end-of-document id.

Tokenizers people already have load too: any ``tokenizers`` JSON file, or a directory saved
by transformers (``tokenizer.json`` inside; its ``tokenizer_config.json`` names the
end-of-text and pad tokens). One with no pad token pads with its end-of-text token (logged);
one with no end-of-text token is refused unless ``data.eod_token`` names it.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from raydrat.atomic import replacing
from raydrat.core.data.errors import DataError

log = logging.getLogger(__name__)

EOD_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
SPECIAL_TOKENS = (EOD_TOKEN, PAD_TOKEN)
MIN_VOCAB_SIZE = 256 + len(SPECIAL_TOKENS)
"""A byte-level BPE holds at least the 256 byte tokens and the special tokens."""
HF_TOKENIZER_FILE = "tokenizer.json"
HF_TOKENIZER_CONFIG = "tokenizer_config.json"
"""The files of a tokenizer directory saved by transformers (``save_pretrained``)."""


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
    with replacing(out_path) as tmp:
        tok.save(str(tmp))
    return tokenizer_from_str(tok.to_str())


def tokenizer_from_str(json_text: str) -> Tokenizer:
    """A tokenizer from its JSON text, set up to encode documents (special-token strings in
    the text stay plain text)."""
    tok = Tokenizer.from_str(json_text)
    tok.encode_special_tokens = True
    return tok


def resolve_tokenizer_file(path: str | Path) -> Path:
    """The tokenizers JSON file at ``path``: the file itself, or ``tokenizer.json`` inside a
    directory saved by transformers."""
    path = Path(path)
    if path.is_dir():
        inner = path / HF_TOKENIZER_FILE
        if not inner.is_file():
            raise DataError(
                f"tokenizer directory {path} has no {HF_TOKENIZER_FILE}: save a fast tokenizer into it "
                "with transformers' save_pretrained, or point data.tokenizer_path at a tokenizers JSON file"
            )
        return inner
    return path


def declared_special_tokens(path: str | Path) -> dict[str, str]:
    """``eos_token`` / ``pad_token`` named by the ``tokenizer_config.json`` beside a
    ``tokenizer.json`` (transformers' layout); empty when there is none."""
    config = resolve_tokenizer_file(path).parent / HF_TOKENIZER_CONFIG
    if not config.is_file():
        return {}
    try:
        data = json.loads(config.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise DataError(f"{config} is not valid JSON ({exc}): fix or remove it") from None
    out = {}
    for key in ("eos_token", "pad_token"):
        value = data.get(key)
        if isinstance(value, dict):  # an AddedToken written out: {"content": ..., ...}
            value = value.get("content")
        if isinstance(value, str) and value:
            out[key] = value
    return out


def vocab_size_of(tok: Tokenizer) -> int:
    """Ids the tokenizer can emit: the highest id + 1 (added tokens included)."""
    return max(tok.get_vocab(with_added_tokens=True).values()) + 1


def load_tokenizer(path: str | Path, vocab_size: int, eod_token: str | None = None) -> Tokenizer:
    """Load a ``tokenizers`` JSON file (or a transformers tokenizer directory) and check
    that it fits a model of ``vocab_size`` tokens and has an end-of-text token
    (``eod_token``, as ``data.eod_token``, names it when the tokenizer does not)."""
    given = Path(path)
    path = resolve_tokenizer_file(given)
    if not path.is_file():
        raise DataError(f"tokenizer {given} not found: run `raydrat data demo` or set data.tokenizer_path")
    try:
        tok = tokenizer_from_str(path.read_text(encoding="utf-8"))
    except Exception as exc:  # tokenizers raises plain Exception subclasses
        raise DataError(
            f"tokenizer {path} is not a valid tokenizers JSON file ({exc}): "
            "point data.tokenizer_path at a tokenizers JSON file"
        ) from None
    n = vocab_size_of(tok)
    if n > vocab_size:
        raise DataError(
            f"tokenizer {path} has {n} tokens but model.vocab_size is {vocab_size}: raise "
            f"model.vocab_size to at least {n} or use a smaller tokenizer"
        )
    tokenizer_special_ids(path, tok, eod_token, announce=True)
    return tok


def special_ids(
    tok: Tokenizer,
    origin: str = "the tokenizer",
    eod_token: str | None = None,
    declared: dict[str, str] | None = None,
    announce: bool = False,
) -> tuple[int, int]:
    """``(eod_id, pad_id)``. The end-of-text token is ``eod_token`` when given, else the
    ``eos_token`` a transformers config declares (``declared``), else :data:`EOD_TOKEN`; the
    pad token is the declared ``pad_token`` or :data:`PAD_TOKEN`, and the end-of-text token
    when the tokenizer has neither (said in the log when ``announce``)."""
    declared = declared or {}
    if eod_token is not None:
        eod_id = tok.token_to_id(eod_token)
        if eod_id is None:
            raise DataError(
                f"{origin} has no token {eod_token!r} (data.eod_token): set data.eod_token to "
                "the tokenizer's end-of-text token"
            )
    else:
        eod_token = declared.get("eos_token", EOD_TOKEN)
        eod_id = tok.token_to_id(eod_token)
        if eod_id is None:
            raise DataError(
                f"{origin} has no end-of-text token {eod_token}: set data.eod_token to the token "
                "that ends a document (e.g. </s> or <|end_of_text|>)"
            )
    pad_token = declared.get("pad_token", PAD_TOKEN)
    pad_id = tok.token_to_id(pad_token)
    if pad_id is None:
        pad_id = eod_id
        if announce:
            log.warning("%s has no pad token: padding with its end-of-text token %s (id %d)", origin, eod_token, eod_id)
    return eod_id, pad_id


def tokenizer_special_ids(
    path: str | Path, tok: Tokenizer, eod_token: str | None = None, announce: bool = False
) -> tuple[int, int]:
    """:func:`special_ids` of the tokenizer loaded from ``path``, reading the special tokens
    its transformers config declares."""
    return special_ids(tok, str(path), eod_token, declared_special_tokens(path), announce)


def tokenizer_hash(path: str | Path) -> str:
    """sha256 (hex) of the tokenizer file: identifies the tokenizer in manifests and runs."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()
