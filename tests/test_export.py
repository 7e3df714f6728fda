"""Export round trip through transformers (its own loader is the independent instrument):
logits within 1e-4 in fp32, the same greedy text, the tokenizer loads; options without an
exact counterpart are refused; exports load back into raydrat (``model.init_from``)."""

from __future__ import annotations

import json
import random

import pytest
import torch
from safetensors.torch import load_file
from torch.testing import assert_close

from raydrat.config.base import ConfigError
from raydrat.config.model import ModelConfig
from raydrat.core.checkpoint.export import export_hf, export_safetensors, load_pretrained
from raydrat.core.checkpoint.hf import LLAMA, NEOX, hf_architecture
from raydrat.core.data.tokenizer import load_tokenizer, train_tokenizer
from raydrat.core.model.generate import generate
from raydrat.core.model.transformer import GPT

transformers = pytest.importorskip("transformers")

TOKENIZER_FIXTURE_PATH: list = []
DEBUG = dict(vocab_size=512, seq_len=64, d_model=64, n_layer=2, n_head=4)
WORDS = "the quick brown fox jumps over a lazy dog while seven wizards quietly hex".split()
CASES = {
    "llama-gqa-tied": (LLAMA, dict(n_kv_head=2, activation="swiglu")),
    "llama-geglu-bias-untied": (LLAMA, dict(activation="geglu", bias=True, tie_embeddings=False, rope_theta=500.0)),
    "neox-gelu-nobias": (NEOX, dict(norm="layernorm", activation="gelu")),
    "neox-relu-bias-untied": (NEOX, dict(norm="layernorm", activation="relu", bias=True, tie_embeddings=False)),
}


@pytest.fixture(autouse=True)
def _restore_rng():
    state = torch.get_rng_state()
    yield
    torch.set_rng_state(state)


@pytest.fixture(scope="module")
def tokenizer_path(tmp_path_factory):
    rng = random.Random(0)
    texts = [" ".join(rng.choices(WORDS, k=rng.randint(5, 40))) for _ in range(300)]
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    train_tokenizer(texts, 512, path)
    TOKENIZER_FIXTURE_PATH[:] = [path]
    return path


def trained(**overrides) -> GPT:
    """A debug-shaped model trained a few steps on a repeating pattern (peaked logits, so
    greedy decoding has no near-ties); biases perturbed so that they matter."""
    torch.manual_seed(0)
    model = GPT(ModelConfig(**{**DEBUG, **overrides}))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    ids = load_tokenizer(TOKENIZER_FIXTURE_PATH[0], 512).encode(" ".join(WORDS * 8)).ids
    batch = torch.tensor([ids[s : s + 65] for s in range(0, 16, 4)])
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(15):
        _, loss = model(batch[:, :-1], batch[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


@pytest.mark.parametrize("case", list(CASES))
def test_hf_export_round_trip_through_transformers(case, tokenizer_path, tmp_path):
    arch, overrides = CASES[case]
    model = trained(**overrides)
    assert hf_architecture(model.cfg) == arch
    out = export_hf(model.state_dict(), model.cfg, tmp_path / "hf", tokenizer_path)

    hf = transformers.AutoModelForCausalLM.from_pretrained(str(out), local_files_only=True, dtype=torch.float32).eval()
    assert type(hf).__name__ == arch
    assert sum(p.numel() for p in hf.parameters()) == model.num_params() + (
        0 if model.cfg.bias or arch == LLAMA else hf_zero_bias_count(hf)
    )
    idx = torch.randint(0, 512, (2, 64), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ours, _ = model(idx)
        theirs = hf(input_ids=idx).logits
    diff = (ours - theirs).abs().max().item()
    print(f"{case}: max |logit difference| {diff:.2e}")
    assert diff <= 1e-4

    tok = transformers.AutoTokenizer.from_pretrained(str(out), local_files_only=True)
    assert tok.eos_token == "<|endoftext|>" and tok.pad_token == "<|pad|>"
    prompt = tok("the quick brown fox")["input_ids"]
    eos = tok.eos_token_id
    greedy = generate(model, prompt, 24, temperature=0.0, eos_id=eos)
    with torch.no_grad():
        hf_out = hf.generate(
            torch.tensor([prompt]),
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            max_new_tokens=24,
            do_sample=False,
            eos_token_id=eos,
            pad_token_id=tok.pad_token_id,
        )
    assert hf_out[0, len(prompt) :].tolist() == greedy
    print(f"{case}: greedy continuation of 'the quick brown fox': {tok.decode(greedy)!r}")
    assert set(tok.decode(greedy).split()) <= set(WORDS)  # it learnt the words

    # ... and back into raydrat, from our export and from transformers' own save_pretrained
    assert_state_equal(load_pretrained(out, model.cfg), model.state_dict())
    hf.save_pretrained(str(tmp_path / "resaved"))
    assert_state_equal(load_pretrained(tmp_path / "resaved", model.cfg), model.state_dict())


def hf_zero_bias_count(hf) -> int:
    """Biases GPT-NeoX always has (zeros when raydrat's model has none)."""
    return sum(p.numel() for n, p in hf.named_parameters() if n.endswith("bias"))


def assert_state_equal(loaded: dict, expected: dict) -> None:
    assert loaded.keys() == expected.keys()
    for name in expected:
        assert_close(loaded[name], expected[name], rtol=0, atol=0, msg=name)


@pytest.mark.parametrize(
    "overrides,option",
    [
        (dict(activation="gelu"), "model.activation=gelu with model.norm=rmsnorm"),
        (dict(norm="layernorm", activation="swiglu"), "model.activation=swiglu with model.norm=layernorm"),
        (dict(norm="layernorm", n_kv_head=2), "model.n_kv_head=2"),
    ],
)
def test_options_transformers_cannot_represent_are_refused(overrides, option, tmp_path):
    cfg = ModelConfig(**{**DEBUG, **overrides})
    with pytest.raises(ConfigError, match=option):
        export_hf(GPT(cfg).state_dict(), cfg, tmp_path / "x")
    assert not (tmp_path / "x").exists()  # refused before writing


def test_init_from_mismatches_name_the_option_or_parameter(tokenizer_path, tmp_path):
    model = trained(n_kv_head=2, activation="swiglu")
    out = export_hf(model.state_dict(), model.cfg, tmp_path / "hf")
    cfg = model.cfg
    with pytest.raises(
        ConfigError,
        match=r"model\.layers\.0\.mlp\.gate_proj\.weight \(raydrat's layers\.0\.mlp_branch\."
        r"layer\.gate_proj\.weight\) has shape \(192, 64\) but the config's model "
        r"needs \(128, 64\): set model\.d_ff",
    ):
        load_pretrained(out, cfg.model_copy(update={"d_ff": 128}))
    with pytest.raises(
        ConfigError,
        match=r"model\.embed_tokens\.weight \(raydrat's tok_emb\.weight\) has shape \(512, 64\) "
        r"but the config's model needs \(1024, 64\): set model\.vocab_size",
    ):
        load_pretrained(out, cfg.model_copy(update={"vocab_size": 1024}))
    with pytest.raises(ConfigError, match=r"has 2 layers but model.n_layer is 3: set model.n_layer: 2"):
        load_pretrained(out, cfg.model_copy(update={"n_layer": 3}))
    with pytest.raises(ConfigError, match=r"num_key_value_heads=2 where raydrat's model needs 1: set model.n_kv_head"):
        load_pretrained(out, cfg.model_copy(update={"n_kv_head": 1}))
    with pytest.raises(
        ConfigError, match=r"rope_theta=10000.0 where raydrat's model needs 500.0: set model.rope_theta"
    ):
        load_pretrained(out, cfg.model_copy(update={"rope_theta": 500.0}))
    with pytest.raises(ConfigError, match=r"is a LlamaForCausalLM, the config's model is a GPTNeoXForCausalLM"):
        load_pretrained(out, cfg.model_copy(update={"norm": "layernorm", "activation": "gelu", "n_kv_head": None}))
    with pytest.raises(ConfigError, match="has neither config.json"):
        load_pretrained(tmp_path, cfg)


def test_safetensors_export_round_trip(tokenizer_path, tmp_path):
    model = trained(n_kv_head=2, activation="swiglu")
    out = export_safetensors(model.state_dict(), model.cfg, tmp_path / "st", config={"name": "debug"})
    stored = load_file(str(out / "model.safetensors"))
    assert "lm_head.weight" not in stored  # the tied head is stored once
    meta = json.loads((out / "raydrat_config.json").read_text())
    assert ModelConfig(**meta["model"]) == model.cfg and meta["config"] == {"name": "debug"}
    state = load_pretrained(out, model.cfg)
    assert_state_equal(state, model.state_dict())
    fresh = GPT(model.cfg).eval()
    fresh.load_state_dict(state)
    idx = torch.randint(0, 512, (1, 16))
    assert_close(fresh(idx)[0], model(idx)[0], rtol=0, atol=0)
    with pytest.raises(ConfigError, match=r"saved with model.n_kv_head=2 but the config has None"):
        load_pretrained(out, model.cfg.model_copy(update={"n_kv_head": None}))
