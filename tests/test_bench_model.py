"""``raydrat bench model``: its peers are the architectures they claim to be, and the
benchmark reports what its rows say."""

from __future__ import annotations

import json

import pytest
import torch
from torch.testing import assert_close

from raydrat.bench.model import run_model_bench
from raydrat.bench.peers import NanoGPT, TitanLlama, nanogpt_settings, recipe_settings, titan_state_dict
from raydrat.config.loading import load_config
from raydrat.config.model import ModelConfig
from raydrat.core.model.transformer import GPT

TINY = dict(vocab_size=96, seq_len=16, d_model=32, n_layer=2, n_head=4, activation="swiglu")


@pytest.mark.parametrize("n_kv_head", [4, 2, 1])
def test_torchtitan_reference_is_raydrats_function(n_kv_head):
    """raydrat's weights, with q/k rows reordered from rotate-half to adjacent pairs, give
    the same logits in the torchtitan-style model: same architecture, same parameters."""
    cfg = recipe_settings(ModelConfig(**TINY, n_kv_head=n_kv_head))
    torch.manual_seed(0)
    ours, ref = GPT(cfg).eval(), TitanLlama(cfg).eval()
    ref.load_state_dict(titan_state_dict(ours))  # strict: the same parameter set
    assert sum(p.numel() for p in ref.parameters()) == ours.num_params()
    idx = torch.randint(0, cfg.vocab_size, (2, cfg.seq_len))
    targets = torch.randint(0, cfg.vocab_size, (2, cfg.seq_len))
    (logits, loss), (ref_logits, ref_loss) = ours(idx, targets), ref(idx, targets)
    assert_close(ref_logits, logits, rtol=1e-5, atol=1e-5)
    assert_close(ref_loss, loss)


def test_nanogpt_reference_is_gpt2():
    """nanoGPT's model equals transformers' GPT-2 (exact GELU) with the same weights."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    nano = NanoGPT(vocab_size=96, block_size=16, n_layer=2, n_head=4, n_embd=32, bias=True).eval()
    with torch.no_grad():
        for p in nano.parameters():
            p.add_(0.05 * torch.randn_like(p))  # biases and norms away from 0 / 1
    hf = transformers.GPT2LMHeadModel(
        transformers.GPT2Config(
            vocab_size=96,
            n_positions=16,
            n_embd=32,
            n_layer=2,
            n_head=4,
            activation_function="gelu",
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            layer_norm_epsilon=1e-5,
        )
    ).eval()
    conv1d = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
    state = {k: (v.t() if k.endswith(conv1d) else v) for k, v in nano.state_dict().items()}
    missing, unexpected = hf.load_state_dict(state, strict=False)
    assert not unexpected and all(k.endswith("attn.bias") or k.endswith("masked_bias") for k in missing)
    idx = torch.randint(0, 96, (2, 16))
    with torch.no_grad():
        assert_close(nano(idx)[0], hf(input_ids=idx).logits, rtol=1e-5, atol=1e-5)


def test_nanogpt_settings_are_as_close_as_raydrat_goes():
    cfg = nanogpt_settings(ModelConfig(**TINY, n_kv_head=2))
    assert (cfg.norm, cfg.activation, cfg.kv_heads, cfg.ff_dim, cfg.bias) == ("layernorm", "gelu", 4, 128, False)
    ours, nano = GPT(cfg), NanoGPT.like(cfg)
    # the same parameters but nanoGPT's learned position table
    assert sum(p.numel() for p in nano.parameters()) - ours.num_params() == cfg.seq_len * cfg.d_model


def test_bench_model_rows(tmp_path, capsys):
    cfg = load_config("debug", ["train.batch_size=2", "model.seq_len=16", "model.vocab_size=128"])
    path = tmp_path / "model.json"
    rows = run_model_bench(cfg, json_path=str(path), steps=3, warmup=1, only_recipe=True)
    assert [(r["settings"], r["reference"]) for r in rows] == [("recipe", "torchtitan"), ("nanogpt", "nanogpt")]
    for r in rows:
        assert r["tokens_per_s"] > 0 and r["reference_tokens_per_s"] > 0
        assert r["ratio"] == pytest.approx(r["tokens_per_s"] / r["reference_tokens_per_s"])
        assert r["tokens_per_s"] == pytest.approx(2 * 16 / r["step_s_median"])
    assert rows[0]["params"] == rows[0]["reference_params"]
    saved = json.loads(path.read_text())
    assert {k for k in saved["rows"][0]} >= {
        "shape",
        "settings",
        "reference",
        "tokens_per_s",
        "reference_tokens_per_s",
        "ratio",
    }
    out = capsys.readouterr().out
    assert "load average" in out and "torchtitan" in out
