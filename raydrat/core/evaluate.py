"""Measuring a trained model on held-out blocks: loss, perplexity and bits per byte.

:func:`evaluate_blocks` computes, batch by batch, the loss the training loop's
:func:`raydrat.core.step.evaluate` computes (the mean of the batches' mean losses), and
beside it the summed negative log-likelihood and the UTF-8 bytes the predicted tokens
stand for. Bits per byte (``nats / ln 2 / bytes``) is comparable across tokenizers, where
loss and perplexity are not. Torch and tokenizers only.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from tokenizers import Tokenizer

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
def evaluate_blocks(
    model: torch.nn.Module,
    batches: Iterable[torch.Tensor],
    max_batches: int | None,
    byte_lengths: torch.Tensor,
    on_batch: Callable[[int], None] | None = None,
) -> EvalResult:
    """Evaluate ``model`` on at most ``max_batches`` batches of ``(B, seq_len + 1)`` blocks
    (``None``: all), with every layer active; ``on_batch(i)`` after each (a progress bar)."""
    was_training = model.training
    model.eval()
    losses, nats, tokens, nbytes = [], 0.0, 0, 0
    try:
        for i, block in enumerate(batches):
            if max_batches is not None and i >= max_batches:
                break
            idx, targets = split_block(block)
            _, loss = model(idx, targets)
            valid = targets != IGNORE_INDEX
            n = int(valid.sum())
            losses.append(loss.float())
            nats += float(loss) * n
            tokens += n
            nbytes += int(byte_lengths.to(targets.device)[targets[valid]].sum())
            if on_batch is not None:
                on_batch(i)
    finally:
        model.train(was_training)
    if not losses:
        raise ValueError("the evaluation data yielded no batch: lower the batch size or give more data")
    mean = torch.stack(losses).mean().item()
    return EvalResult(
        loss=mean,
        perplexity=math.exp(mean),
        bits_per_byte=nats / math.log(2) / max(nbytes, 1),
        tokens=tokens,
        bytes=nbytes,
        batches=len(losses),
    )
