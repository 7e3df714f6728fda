"""Sampling tokens from a :class:`~raydrat.core.model.transformer.GPT`: incremental decoding
with a :class:`~raydrat.core.model.transformer.KVCache` (each new token costs one position of
attention, not a forward over the whole context). Torch only.

``generate(model, prompt_ids, max_new_tokens=..., temperature=..., top_k=..., top_p=...,
seed=..., on_token=print)``: the same seed gives the same tokens whatever the global RNG
state (sampling draws from its own ``torch.Generator``). ``temperature=0`` is greedy.

When the prompt and the new tokens outgrow ``model.seq_len``, every further token is
predicted from the last ``seq_len`` tokens, as an uncached model would (nanoGPT's crop): the
cache is rebuilt from them, so the text equals uncached decoding's, and each of those
tokens costs a forward over the window.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Sequence

import torch

from raydrat.core.model.transformer import GPT, KVCache


def sample_next(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> int:
    """One token id from the logits ``(V,)`` of the next position. ``temperature`` 0:
    the most likely token. ``top_k``: only the k most likely tokens may be drawn;
    ``top_p``: only the smallest set of most likely tokens whose probabilities reach p
    (nucleus sampling; the most likely token always stays)."""
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0: greedy), got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1 or None, got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1] or None, got {top_p}")
    logits = logits.float()
    if temperature == 0:
        return int(logits.argmax())
    logits = logits / temperature
    if top_k is not None and top_k < logits.numel():
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = sorted_logits.softmax(-1)
        beyond = probs.cumsum(-1) - probs >= top_p  # mass before this token already reaches p
        logits = logits.scatter(0, order[beyond], float("-inf"))
    probs = logits.softmax(-1)
    return int(torch.multinomial(probs, 1, generator=generator))


@torch.no_grad()
def generate(
    model: GPT,
    prompt_ids: Sequence[int],
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    eos_id: int | None = None,
    on_token: Callable[[int], None] | None = None,
    use_cache: bool = True,
) -> list[int]:
    """Continue ``prompt_ids`` by up to ``max_new_tokens`` tokens; returns the new ones.

    ``on_token`` is called with each new token as soon as it is drawn (streaming). Stops
    early after ``eos_id``. ``seed`` ``None``: a fresh random seed. ``use_cache=False``
    runs a full forward per token (the reference for the cached path). The model is put
    in eval mode for the call and restored afterwards."""
    prompt = [int(t) for t in prompt_ids]
    if not prompt:
        raise ValueError("the prompt is empty: give at least one token (e.g. the end-of-text id)")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if max_new_tokens == 0:
        return []
    vocab = model.cfg.vocab_size
    bad = [t for t in prompt if not 0 <= t < vocab]
    if bad:
        raise ValueError(f"prompt token ids {bad[:5]} are outside the vocabulary (model.vocab_size {vocab})")
    param = next(model.parameters())
    device, window = param.device, model.cfg.seq_len
    generator = torch.Generator(device=device)
    generator.manual_seed(secrets.randbits(63) if seed is None else seed)
    cache = KVCache(model.cfg, 1, device=device, dtype=param.dtype) if use_cache else None

    def forward(ids: list[int]) -> torch.Tensor:  # logits (V,) of the position after ids
        logits, _ = model(torch.tensor([ids], device=device), cache=cache)
        return logits[0, -1]

    def from_window(tokens: list[int]) -> torch.Tensor:  # a fresh cache of the last `window` tokens
        if cache is not None:
            cache.reset()
        return forward(tokens[-window:])

    was_training = model.training
    model.eval()
    try:
        tokens, new = list(prompt), []
        logits = from_window(tokens)
        for i in range(max_new_tokens):
            token = sample_next(logits, temperature, top_k, top_p, generator)
            tokens.append(token)
            new.append(token)
            if on_token is not None:
                on_token(token)
            if token == eos_id or i == max_new_tokens - 1:
                break
            if cache is not None and cache.length < window:
                logits = forward([token])
            else:
                logits = from_window(tokens)
        return new
    finally:
        model.train(was_training)
