"""Incremental decoding: cached logits equal a full forward, seeded sampling reproduces."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from raydrat.config.model import ModelConfig
from raydrat.core.model.generate import generate, sample_next
from raydrat.core.model.transformer import GPT, KVCache
from raydrat.core.techniques.recompute.wrapper import apply_recompute

TINY = dict(vocab_size=64, seq_len=24, d_model=32, n_layer=2, n_head=4, activation="swiglu")


def build(seed: int = 0, **overrides) -> GPT:
    torch.manual_seed(seed)
    return GPT(ModelConfig(**{**TINY, **overrides})).eval()


@pytest.fixture(autouse=True)
def _restore_rng():
    state = torch.get_rng_state()
    yield
    torch.set_rng_state(state)


@pytest.mark.parametrize("n_kv_head", [4, 2, 1])  # MHA, GQA, MQA
@pytest.mark.parametrize("enable_gqa", [True, False])  # SDPA's grouped heads, or repeated kv heads
def test_cached_decoding_logits_equal_uncached(n_kv_head, enable_gqa):
    model = build(n_kv_head=n_kv_head)
    for layer in model.layers.values():
        layer.attn_branch.layer.enable_gqa = enable_gqa
    B, T = 3, model.cfg.seq_len
    idx = torch.randint(0, model.cfg.vocab_size, (B, T), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full, _ = model(idx)
        cache = KVCache(model.cfg, B)
        pieces = []
        # a prompt, single tokens, then a chunk of several (the masked path), then singles again
        for lo, hi in [(0, 7), (7, 8), (8, 9), (9, 15), (15, 16), (16, T)]:
            logits, _ = model(idx[:, lo:hi], cache=cache)
            pieces.append(logits)
            assert cache.length == hi
    assert cache.keys[0].shape == (B, n_kv_head, T, model.cfg.head_dim)  # kv heads, not query heads
    assert_close(torch.cat(pieces, dim=1), full, rtol=1e-5, atol=1e-5)


def test_cache_misuse_is_refused():
    model = build()
    cache = KVCache(model.cfg, 1)
    with torch.no_grad():
        model(torch.zeros(1, 20, dtype=torch.long), cache=cache)
        with pytest.raises(ValueError, match=r"holds 20 tokens; 5 more exceed model\.seq_len \(24\)"):
            model(torch.zeros(1, 5, dtype=torch.long), cache=cache)
        with pytest.raises(ValueError, match="holds 1 sequences, idx has 2"):
            model(torch.zeros(2, 1, dtype=torch.long), cache=KVCache(model.cfg, 1))


@pytest.mark.parametrize("n_kv_head", [4, 2])
def test_generate_cached_equals_uncached_past_the_context(n_kv_head):
    model = build(n_kv_head=n_kv_head)
    prompt = [3, 1, 4, 1, 5, 9, 2, 6]
    n = 30  # prompt + new tokens outgrow seq_len (24): the window slides
    for kwargs in ({"temperature": 0.0}, {"temperature": 1.0, "seed": 7}):
        cached = generate(model, prompt, n, use_cache=True, **kwargs)
        uncached = generate(model, prompt, n, use_cache=False, **kwargs)
        assert cached == uncached, kwargs
        assert len(cached) == n


def test_seeded_generation_reproducible_and_independent_of_global_rng():
    model = build()
    streamed = []
    torch.manual_seed(0)
    first = generate(model, [1, 2, 3], 20, temperature=1.0, top_k=20, top_p=0.9, seed=42, on_token=streamed.append)
    torch.manual_seed(12345)
    torch.rand(100)  # move the global RNG on
    second = generate(model, [1, 2, 3], 20, temperature=1.0, top_k=20, top_p=0.9, seed=42)
    other = generate(model, [1, 2, 3], 20, temperature=1.0, top_k=20, top_p=0.9, seed=43)
    assert first == second == streamed
    assert first != other


def test_generate_restores_training_mode_and_stops_at_eos():
    model = build().train()
    greedy = generate(model, [5, 6], 10, temperature=0.0)
    assert model.training
    eos = greedy[3]
    stopped = generate(model, [5, 6], 10, temperature=0.0, eos_id=eos)
    assert stopped == greedy[: greedy.index(eos) + 1]


def test_sampling_filters():
    logits = torch.tensor([0.0, 3.0, 1.0, 2.0, -1.0])
    g = torch.Generator().manual_seed(0)
    assert sample_next(logits, temperature=0.0) == 1
    assert {sample_next(logits, top_k=2, generator=g) for _ in range(200)} == {1, 3}
    probs = logits.softmax(-1)  # p(1) = 0.64, p(3) = 0.24: top_p 0.8 keeps exactly those two
    assert probs[1] < 0.8 < probs[1] + probs[3]
    assert {sample_next(logits, top_p=0.8, generator=g) for _ in range(200)} == {1, 3}
    assert {sample_next(logits, top_p=0.5, generator=g) for _ in range(50)} == {1}
    with pytest.raises(ValueError, match="top_p"):
        sample_next(logits, top_p=1.5)
    with pytest.raises(ValueError, match="temperature"):
        sample_next(logits, temperature=-1)


def test_generate_bad_prompt():
    model = build()
    with pytest.raises(ValueError, match="prompt is empty"):
        generate(model, [], 5)
    with pytest.raises(ValueError, match=r"outside the vocabulary \(model\.vocab_size 64\)"):
        generate(model, [1, 64], 5)


def test_decoding_passes_recompute_wrappers():
    model = build(n_kv_head=2)
    plain = generate(model, [1, 2, 3], 8, temperature=0.0)
    apply_recompute(model, "full")
    assert generate(model, [1, 2, 3], 8, temperature=0.0) == plain
