"""The one evaluation: a model's loss on held-out blocks, and beside it perplexity and bits
per byte.

:func:`evaluate` is what the training loop's periodic validation
(:func:`raydrat.core.fit.fit`) and ``raydrat eval`` both call. Its loss is the mean of the
batches' mean cross-entropy; it also sums the negative log-likelihood and, given the bytes
each token stands for (:func:`token_byte_lengths`), the UTF-8 bytes the predicted tokens
cover. Bits per byte (``nats / ln 2 / bytes``) is comparable across tokenizers, where loss
and perplexity are not. The sums stay on the device until the end (one transfer per
evaluation). Torch and tokenizers only.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from tokenizers import Tokenizer

from raydrat.core.data.errors import DataError
from raydrat.core.model.transformer import IGNORE_INDEX
from raydrat.core.step import split_block


@dataclass(frozen=True)
class EvalResult:
    loss: float
    """Mean of the batches' mean cross-entropy (nats): the training loop's val loss."""
    perplexity: float
    bits_per_byte: float
    tokens: int
    bytes: int
    batches: int

    def metrics(self, prefix: str = "eval/") -> dict[str, float]:
        return {
            f"{prefix}loss": self.loss,
            f"{prefix}perplexity": self.perplexity,
            f"{prefix}bits_per_byte": self.bits_per_byte,
            f"{prefix}tokens": float(self.tokens),
        }

    def lines(self) -> list[str]:
        return [
            f"loss: {self.loss:.4f}",
            f"perplexity: {self.perplexity:.2f}",
            f"bits per byte: {self.bits_per_byte:.4f}",
            f"({self.tokens:,} tokens, {self.bytes:,} bytes, {self.batches} batches)",
        ]


def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet (a printable character per byte), inverted."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, n = list(printable), 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(printable, chars)}


def token_byte_lengths(tok: Tokenizer, vocab_size: int) -> torch.Tensor:
    """``int64[vocab_size]``: the UTF-8 bytes each token id stands for (special tokens 0).
    Byte-level BPE tokens are read character by character through the byte alphabet (a
    token may hold part of a character); other tokenizers through decoding one id."""
    special = {t.content for t in tok.get_added_tokens_decoder().values() if t.special}
    decoder = json.loads(tok.to_str()).get("decoder") or {}
    byte_level = decoder.get("type") == "ByteLevel"
    table = _byte_decoder()
    out = torch.zeros(vocab_size, dtype=torch.long)
    for token, i in tok.get_vocab(with_added_tokens=True).items():
        if i >= vocab_size or token in special:
            continue
        if byte_level and all(ch in table for ch in token):
            out[i] = len(token)
        else:
            out[i] = len(tok.decode([i], skip_special_tokens=False).encode("utf-8"))
    return out


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    batches: Iterable[torch.Tensor],
    max_batches: int | None = None,
    byte_lengths: torch.Tensor | None = None,
    on_batch: Callable[[int], None] | None = None,
) -> EvalResult:
    """Evaluate ``model`` on at most ``max_batches`` batches of ``(B, seq_len + 1)`` blocks
    (``None``: all), in eval mode with every layer active (its mode is restored after).
    ``byte_lengths`` (``int64[vocab_size]``, :func:`token_byte_lengths`): count the bytes
    and give bits per byte (else it is ``nan``); ``on_batch(i)`` after each batch (a
    progress bar)."""
    was_training = model.training
    model.eval()
    losses: list[torch.Tensor] = []
    nats: list[torch.Tensor] = []
    tokens: list[torch.Tensor] = []
    nbytes: list[torch.Tensor] = []
    try:
        for i, block in enumerate(batches):
            if max_batches is not None and i >= max_batches:
                break
            idx, targets = split_block(block)
            _, loss = model(idx, targets)
            valid = targets != IGNORE_INDEX
            n = valid.sum()
            losses.append(loss.float())
            nats.append(loss.double() * n)
            tokens.append(n)
            if byte_lengths is not None:
                nbytes.append(byte_lengths.to(targets.device)[targets[valid]].sum())
            if on_batch is not None:
                on_batch(i)
    finally:
        model.train(was_training)
    if not losses:
        raise DataError(
            "the evaluation data yielded no full batch: lower the batch size (train.batch_size) or give more data"
        )
    mean = torch.stack(losses).mean().double()
    sums = torch.stack([mean, torch.stack(nats).sum(), torch.stack(tokens).sum().double()])
    if nbytes:
        sums = torch.cat([sums, torch.stack(nbytes).sum().double().reshape(1)])
    loss, total_nats, n_tokens, *n_bytes = sums.tolist()  # the one transfer to the host
    n_bytes = int(n_bytes[0]) if n_bytes else 0
    return EvalResult(
        loss=loss,
        perplexity=math.exp(loss),
        bits_per_byte=total_nats / math.log(2) / n_bytes if n_bytes else float("nan"),
        tokens=int(n_tokens),
        bytes=n_bytes,
        batches=len(losses),
    )
