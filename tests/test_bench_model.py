"""``raydrat bench model``: its peers are the real packages at raydrat's architecture (each
computes raydrat's function from raydrat's weights), and the benchmark reports what its
rows say."""

from __future__ import annotations

import json

import pytest
import torch
from torch.testing import assert_close

from raydrat.bench import peers as P
from raydrat.bench.learning import run_learning
from raydrat.bench.model import run_ablation, run_model_bench, shapes
from raydrat.bench.peers import NanoGPT, nanogpt_settings, recipe_settings
from raydrat.config.loading import load_config
from raydrat.config.model import ModelConfig
from raydrat.core.checkpoint.hf import to_hf_state_dict
from raydrat.core.model.transformer import GPT

TINY = dict(vocab_size=96, seq_len=16, d_model=32, n_layer=2, n_head=4, activation="swiglu")


def rotate_half_to_pairs(n_heads: int, head_dim: int) -> torch.Tensor:
    """Row order that turns a q/k projection from the rotate-half layout (raydrat, Hugging
    Face, litgpt: feature i pairs with i + D/2) into adjacent pairs (torchtitan: 2k with 2k + 1)."""
    half = torch.arange(head_dim // 2)
    per_head = torch.stack([half, half + head_dim // 2], dim=-1).flatten()
    return (torch.arange(n_heads)[:, None] * head_dim + per_head).flatten()


def titan_state(ours: GPT) -> dict[str, torch.Tensor]:
    cfg, sd = ours.cfg, ours.state_dict()
    out = {
        "model.tok_embeddings.weight": sd["tok_emb.weight"],
        "model.norm.weight": sd["norm.weight"],
        "model.lm_head.weight": sd["lm_head.weight"],
    }
    names = {
        "attention.qkv_linear.wq.weight": "attn_branch.layer.q_proj.weight",
        "attention.qkv_linear.wk.weight": "attn_branch.layer.k_proj.weight",
        "attention.qkv_linear.wv.weight": "attn_branch.layer.v_proj.weight",
        "attention.wo.weight": "attn_branch.layer.out_proj.weight",
        "feed_forward.w1.weight": "mlp_branch.layer.gate_proj.weight",
        "feed_forward.w3.weight": "mlp_branch.layer.up_proj.weight",
        "feed_forward.w2.weight": "mlp_branch.layer.down_proj.weight",
        "attention_norm.weight": "attn_branch.norm.weight",
        "ffn_norm.weight": "mlp_branch.norm.weight",
    }
    for i in range(cfg.n_layer):
        for theirs, mine in names.items():
            out[f"model.layers.{i}.{theirs}"] = sd[f"layers.{i}.{mine}"]
        q, k = f"model.layers.{i}.attention.qkv_linear.wq.weight", f"model.layers.{i}.attention.qkv_linear.wk.weight"
        out[q] = out[q][rotate_half_to_pairs(cfg.n_head, cfg.head_dim)]
        out[k] = out[k][rotate_half_to_pairs(cfg.kv_heads, cfg.head_dim)]
    return out


def litgpt_state(ours: GPT) -> dict[str, torch.Tensor]:
    sd = ours.state_dict()
    out = {
        "model.transformer.wte.weight": sd["tok_emb.weight"],
        "model.transformer.ln_f.weight": sd["norm.weight"],
        "model.lm_head.weight": sd["lm_head.weight"],
    }
    for i in range(ours.cfg.n_layer):
        a, m, h = f"layers.{i}.attn_branch.", f"layers.{i}.mlp_branch.", f"model.transformer.h.{i}."
        out[h + "attn.qkv.weight"] = torch.cat([sd[a + f"layer.{x}_proj.weight"] for x in "qkv"])
        out[h + "attn.proj.weight"] = sd[a + "layer.out_proj.weight"]
        out[h + "mlp.fc_1.weight"] = sd[m + "layer.gate_proj.weight"]
        out[h + "mlp.fc_2.weight"] = sd[m + "layer.up_proj.weight"]
        out[h + "mlp.proj.weight"] = sd[m + "layer.down_proj.weight"]
        out[h + "norm_1.weight"] = sd[a + "norm.weight"]
        out[h + "norm_2.weight"] = sd[m + "norm.weight"]
    return out


def hf_state(ours: GPT) -> dict[str, torch.Tensor]:
    """The export's weights (a tied head is left out there: transformers ties it on load)."""
    out = {f"model.{k}": v for k, v in to_hf_state_dict(ours.state_dict(), ours.cfg).items()}
    out.setdefault("model.lm_head.weight", ours.state_dict()["lm_head.weight"])
    return out


PEER_WEIGHTS = {
    "transformers": hf_state,
    "torchtitan": titan_state,
    "litgpt": litgpt_state,
}


@pytest.mark.parametrize("n_kv_head", [4, 2, 1])
@pytest.mark.parametrize("peer", ["transformers", "torchtitan", "litgpt"])
def test_each_real_peer_computes_raydrats_function(peer, n_kv_head):
    """raydrat's weights, under the peer's names (torchtitan: q/k rows reordered from
    rotate-half to adjacent pairs), load strictly into the installed peer and give the same
    logits and loss: the same architecture, the same parameters."""
    spec = {p.name: p for p in P.PEERS}[peer]
    pytest.importorskip(spec.distribution)
    cfg = recipe_settings(ModelConfig(**TINY, n_kv_head=n_kv_head))
    torch.manual_seed(0)
    ours, ref = GPT(cfg).eval(), spec.build(cfg).eval()
    with torch.no_grad():
        for p in ours.parameters():
            p.add_(0.05 * torch.randn_like(p))  # norms away from 1
    ref.load_state_dict(PEER_WEIGHTS[peer](ours), strict=True)
    assert sum(p.numel() for p in ref.parameters()) == ours.num_params()
    idx = torch.randint(0, cfg.vocab_size, (2, cfg.seq_len))
    targets = torch.randint(0, cfg.vocab_size, (2, cfg.seq_len))
    with torch.no_grad():
        (logits, loss), (ref_logits, ref_loss) = ours(idx, targets), ref(idx, targets)
    assert_close(ref_logits.float(), logits, rtol=1e-4, atol=1e-4)
    assert_close(ref_loss, loss, rtol=1e-5, atol=1e-5)


def test_a_missing_peer_is_skipped_with_one_line():
    ghost = P.Peer("ghost", "raydrat-no-such-distribution", "recipe", P.LitGPT)
    lines: list[str] = []
    found = P.available(None, lines.append, peers=(ghost, *P.PEERS[-1:]))
    assert [p.name for p in found] == ["nanogpt"]
    assert len(lines) == 1 and "ghost" in lines[0] and "not installed" in lines[0]
    assert found[0].package() == "raydrat nanogpt-reference"


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
    # nanoGPT's init: N(0, 0.02), the residual projections N(0, 0.02 / sqrt(2 * n_layer))
    block = nano.transformer.h[0]
    assert block.mlp.c_fc.weight.std().item() == pytest.approx(0.02, rel=0.1)
    assert block.mlp.c_proj.weight.std().item() == pytest.approx(0.01, rel=0.1)
    assert block.attn.c_proj.weight.std().item() == pytest.approx(0.01, rel=0.2)


def test_shapes_are_the_recipe_and_two_larger_ones():
    cfg = load_config("demo")
    got = [(s.name, s.label()) for s in shapes(cfg)]
    assert got == [
        ("recipe", "4L d128 h4/2 T128 B16"),
        ("6l", "6L d384 h6/3 T256 B8"),
        ("12l", "12L d768 h12/6 T512 B2"),
    ]
    with pytest.raises(ValueError, match="unknown shape"):
        shapes(cfg, ["7l"])


def test_bench_model_rows(tmp_path, capsys):
    cfg = load_config(
        "debug", ["train.batch_size=2", "model.seq_len=16", "model.vocab_size=128", "scaling.cpus_per_worker=1"]
    )
    path = tmp_path / "model.json"
    installed = [p for p in P.PEERS if p.installed()]
    rows = run_model_bench(cfg, json_path=str(path), rounds=5, round_s=0.01, shape_names=["recipe"])
    assert [(r["settings"], r["reference"]) for r in rows] == [(p.settings, p.name) for p in installed]
    for r, p in zip(rows, installed):
        assert r["reference_package"] == p.package()
        assert r["tokens_per_s"] > 0 and r["reference_tokens_per_s"] > 0
        assert r["cpu_ratio_range"][0] <= r["cpu_ratio"] <= r["cpu_ratio_range"][1]
        assert r["ratio_range"][0] <= r["ratio"] <= r["ratio_range"][1]
        assert r["rounds"] == 5 and len(r["load_average"]) == 2
        assert r["verdict"] in (True, False, None) and r["verdict_text"]
        if r["settings"] == "recipe":
            assert r["params"] == r["reference_params"]
    assert rows[-1]["reference_package"] == "raydrat nanogpt-reference"
    saved = json.loads(path.read_text())
    assert saved["rows"] == json.loads(json.dumps(rows))
    out = capsys.readouterr().out
    assert "load average" in out and "verdict" in out
    for p in installed:
        assert p.package() in out


def test_ablation_reverts_each_change_and_times_them_together(capsys):
    cfg = load_config(
        "debug", ["train.batch_size=2", "model.seq_len=16", "model.vocab_size=128", "scaling.cpus_per_worker=1"]
    )
    rows = run_ablation(cfg, rounds=5, round_s=0.01, shape_names=["recipe"])
    assert [r["variant"] for r in rows] == [
        "all changes",
        "without rope",
        "without gqa",
        "without loss",
        "none (before)",
    ]
    assert rows[0]["cpu_speed_vs_all"] == pytest.approx(1.0)
    assert "speed vs all changes" in capsys.readouterr().out


def test_learning_trains_both_on_the_same_tokens_and_compares_val_loss(tmp_path, capsys):
    cfg = load_config(
        "debug",
        [
            "train.steps=4",
            "train.eval_every=2",
            "train.batch_size=4",
            "optim.warmup_steps=1",
            "scaling.cpus_per_worker=1",
        ],
    )
    rows = run_learning(cfg, json_path=str(tmp_path / "learning.json"))
    assert [r["step"] for r in rows] == [2, 4]
    assert rows[-1]["tokens"] == 4 * 4 * cfg.model.seq_len
    for r in rows:
        assert 0 < r["raydrat"] < 10 and 0 < r["nanogpt"] < 10
    saved = json.loads((tmp_path / "learning.json").read_text())
    assert saved["verdict"] == ("not worse" if rows[-1]["raydrat"] <= rows[-1]["nanogpt"] else "worse")
    assert "learning per token" in capsys.readouterr().out
