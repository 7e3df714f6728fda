"""raydrat's model as transformers' ``LlamaForCausalLM`` or ``GPTNeoXForCausalLM``: which
architecture computes exactly the same function (:func:`hf_architecture`), its
``config.json`` (:func:`hf_config`), and the state dict in either naming
(:func:`to_hf_state_dict`, :func:`from_hf_state_dict`, which names an option or a parameter
that does not match). Writing and reading export directories is :mod:`.export`'s job."""

from __future__ import annotations

import math
from typing import Any

import torch

from raydrat.config.base import ConfigError
from raydrat.config.model import ModelConfig
from raydrat.core.model.transformer import GPT, NORM_EPS

LLAMA = "LlamaForCausalLM"
NEOX = "GPTNeoXForCausalLM"
HF_ACT = {"swiglu": "silu", "geglu": "gelu", "gelu": "gelu", "relu": "relu", "silu": "silu"}
RAYDRAT_MODEL_KEY = "raydrat_model"
"""The key of ``config.json`` (hf) holding raydrat's model config, so the export loads back as it was."""

# raydrat name -> Llama name, per layer ("{}" is the layer index); weights and biases alike
LLAMA_LAYER = {
    "attn_branch.norm.weight": "input_layernorm.weight",
    "attn_branch.layer.q_proj": "self_attn.q_proj",
    "attn_branch.layer.k_proj": "self_attn.k_proj",
    "attn_branch.layer.v_proj": "self_attn.v_proj",
    "attn_branch.layer.out_proj": "self_attn.o_proj",
    "mlp_branch.norm.weight": "post_attention_layernorm.weight",
    "mlp_branch.layer.gate_proj": "mlp.gate_proj",
    "mlp_branch.layer.up_proj": "mlp.up_proj",
    "mlp_branch.layer.down_proj": "mlp.down_proj",
}
NEOX_LAYER = {  # q/k/v are fused into attention.query_key_value separately
    "attn_branch.norm": "input_layernorm",
    "attn_branch.layer.out_proj": "attention.dense",
    "mlp_branch.norm": "post_attention_layernorm",
    "mlp_branch.layer.up_proj": "mlp.dense_h_to_4h",
    "mlp_branch.layer.down_proj": "mlp.dense_4h_to_h",
}


# --------------------------------------------------------------------------------------
# which architecture
# --------------------------------------------------------------------------------------


def hf_architecture(cfg: ModelConfig) -> str:
    """The transformers class that computes exactly this model, or a ``ConfigError``
    naming the option that has no exact counterpart."""
    if cfg.norm == "rmsnorm":
        if cfg.gated_mlp:
            return LLAMA
        raise ConfigError(
            f"model.activation={cfg.activation} with model.norm=rmsnorm has no exact transformers "
            "architecture: LlamaForCausalLM needs a gated MLP (model.activation swiglu or geglu), "
            "GPTNeoXForCausalLM needs model.norm=layernorm; export with --format safetensors instead"
        )
    if cfg.gated_mlp:
        raise ConfigError(
            f"model.activation={cfg.activation} with model.norm=layernorm has no exact transformers "
            "architecture (GPTNeoXForCausalLM has a plain MLP: gelu, relu or silu; LlamaForCausalLM "
            "needs model.norm=rmsnorm); export with --format safetensors instead"
        )
    if cfg.kv_heads != cfg.n_head:
        raise ConfigError(
            f"model.n_kv_head={cfg.kv_heads} (grouped-query attention) with model.norm=layernorm has no "
            "exact transformers architecture: GPTNeoXForCausalLM has multi-head attention only "
            f"(model.n_kv_head = model.n_head = {cfg.n_head}); export with --format safetensors instead"
        )
    return NEOX


def hf_config(cfg: ModelConfig, eos_id: int | None = None, pad_id: int | None = None) -> dict[str, Any]:
    """``config.json`` for :func:`hf_architecture` of ``cfg`` (keys read alike by transformers
    4.x and 5.x)."""
    arch = hf_architecture(cfg)
    common = {
        "architectures": [arch],
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "intermediate_size": cfg.ff_dim,
        "num_hidden_layers": cfg.n_layer,
        "num_attention_heads": cfg.n_head,
        "hidden_act": HF_ACT[cfg.activation],
        "max_position_embeddings": cfg.seq_len,
        "initializer_range": cfg.init_std,
        "tie_word_embeddings": cfg.tie_embeddings,
        "attention_dropout": cfg.dropout,
        "bos_token_id": None,
        "eos_token_id": eos_id,
        "pad_token_id": pad_id,
        "use_cache": True,
        "torch_dtype": "float32",
        RAYDRAT_MODEL_KEY: cfg.model_dump(mode="json"),
    }
    if arch == LLAMA:
        return {
            **common,
            "model_type": "llama",
            "num_key_value_heads": cfg.kv_heads,
            "head_dim": cfg.head_dim,
            "rms_norm_eps": NORM_EPS,
            "rope_theta": cfg.rope_theta,
            "rope_scaling": None,
            "attention_bias": cfg.bias,
            "mlp_bias": cfg.bias,
            "pretraining_tp": 1,
        }
    return {
        **common,
        "model_type": "gpt_neox",
        "layer_norm_eps": NORM_EPS,
        "rotary_emb_base": cfg.rope_theta,
        "rotary_pct": 1.0,
        "use_parallel_residual": False,
        "attention_bias": True,  # zeros when model.bias is false: the same function
        "hidden_dropout": 0.0,
    }


# --------------------------------------------------------------------------------------
# weights: raydrat -> transformers
# --------------------------------------------------------------------------------------


def _zeros_like_bias(weight: torch.Tensor) -> torch.Tensor:
    return torch.zeros(weight.shape[0], dtype=weight.dtype)


def to_hf_state_dict(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """raydrat's state dict under the transformers names of :func:`hf_architecture`.
    A tied head is left out (``tie_word_embeddings`` restores it)."""
    arch = hf_architecture(cfg)
    sd = {k: v.detach().cpu() for k, v in state.items()}
    out: dict[str, torch.Tensor] = {}
    if arch == LLAMA:
        out["model.embed_tokens.weight"] = sd["tok_emb.weight"]
        out["model.norm.weight"] = sd["norm.weight"]
        for i in range(cfg.n_layer):
            for ours, theirs in LLAMA_LAYER.items():
                for suffix in [""] if ours.endswith(".weight") else [".weight", ".bias"]:
                    if f"layers.{i}.{ours}{suffix}" in sd:
                        out[f"model.layers.{i}.{theirs}{suffix}"] = sd[f"layers.{i}.{ours}{suffix}"]
    else:
        H, D = cfg.n_head, cfg.head_dim
        out["gpt_neox.embed_in.weight"] = sd["tok_emb.weight"]
        out["gpt_neox.final_layer_norm.weight"] = sd["norm.weight"]
        out["gpt_neox.final_layer_norm.bias"] = sd.get("norm.bias", torch.zeros_like(sd["norm.weight"]))
        for i in range(cfg.n_layer):
            p, q = f"layers.{i}.", f"gpt_neox.layers.{i}."
            for ours, theirs in NEOX_LAYER.items():
                w = sd[p + ours + ".weight"]
                out[q + theirs + ".weight"] = w
                out[q + theirs + ".bias"] = sd.get(p + ours + ".bias", _zeros_like_bias(w))
            qkv = [sd[f"{p}attn_branch.layer.{n}_proj.weight"] for n in "qkv"]
            out[q + "attention.query_key_value.weight"] = torch.stack([w.view(H, D, -1) for w in qkv], dim=1).reshape(
                3 * H * D, -1
            )  # per head: q, k, v rows
            biases = [sd.get(f"{p}attn_branch.layer.{n}_proj.bias", _zeros_like_bias(w)) for n, w in zip("qkv", qkv)]
            out[q + "attention.query_key_value.bias"] = torch.stack([b.view(H, D) for b in biases], dim=1).reshape(-1)
    if not cfg.tie_embeddings:
        out["embed_out.weight" if arch == NEOX else "lm_head.weight"] = sd["lm_head.weight"]
    return {k: v.contiguous().clone() for k, v in out.items()}


# --------------------------------------------------------------------------------------
# weights: transformers -> raydrat
# --------------------------------------------------------------------------------------


def init_from_mismatch(where: str, message: str) -> ConfigError:
    return ConfigError(f"model.init_from {where}: {message}")


def check_hf_options(hf: dict[str, Any], cfg: ModelConfig, where: str) -> str:
    """Refuse an HF config whose architecture or non-shape options differ from ``cfg``'s."""
    arch = (hf.get("architectures") or [None])[0]
    try:
        expected = hf_architecture(cfg)
    except ConfigError as exc:
        raise init_from_mismatch(
            where, f"is {arch}, but raydrat's config has no transformers counterpart: {exc}"
        ) from None
    if arch != expected:
        raise init_from_mismatch(
            where,
            f"is a {arch}, the config's model is a {expected} "
            "(model.norm / model.activation / model.n_kv_head): set them to the export's architecture",
        )
    want = hf_config(cfg)
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    theta = rope.get("rope_theta", hf.get("rope_theta", hf.get("rotary_emb_base", 10000.0)))
    checks = [
        ("hidden_act", hf.get("hidden_act"), want["hidden_act"], "model.activation"),
        ("rope_theta", float(theta), float(cfg.rope_theta), "model.rope_theta"),
        ("num_attention_heads", hf.get("num_attention_heads"), cfg.n_head, "model.n_head"),
        ("tie_word_embeddings", bool(hf.get("tie_word_embeddings", False)), cfg.tie_embeddings, "model.tie_embeddings"),
    ]
    if arch == LLAMA:
        checks += [
            (
                "num_key_value_heads",
                hf.get("num_key_value_heads") or hf.get("num_attention_heads"),
                cfg.kv_heads,
                "model.n_kv_head",
            ),
            ("rms_norm_eps", hf.get("rms_norm_eps"), NORM_EPS, None),
            ("attention_bias", bool(hf.get("attention_bias", False)), cfg.bias, "model.bias"),
            ("mlp_bias", bool(hf.get("mlp_bias", False)), cfg.bias, "model.bias"),
        ]
    else:
        checks += [
            ("layer_norm_eps", hf.get("layer_norm_eps"), NORM_EPS, None),
            ("rotary_pct", rope.get("partial_rotary_factor", hf.get("rotary_pct", 0.25)), 1.0, None),
            ("use_parallel_residual", hf.get("use_parallel_residual", True), False, None),
        ]
    for key, theirs, ours, option in checks:
        same = (
            math.isclose(theirs, ours, rel_tol=1e-9)
            if isinstance(ours, float) and isinstance(theirs, (int, float))
            else theirs == ours
        )
        if not same:
            fix = f"set {option} to match" if option else "raydrat has no setting for it"
            raise init_from_mismatch(
                where, f"config.json has {key}={theirs!r} where raydrat's model needs {ours!r}: {fix}"
            )
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        raise init_from_mismatch(where, f"uses RoPE scaling {rope!r}: raydrat has plain RoPE only")
    return arch


def from_hf_state_dict(
    hf_sd: dict[str, torch.Tensor], arch: str, cfg: ModelConfig, where: str = "the export"
) -> dict[str, torch.Tensor]:
    """The raydrat state dict (for ``cfg``) held by transformers weights ``hf_sd``."""
    sd = {k.removeprefix("_orig_mod."): v for k, v in hf_sd.items()}
    if "embed_out.weight" in sd:  # GPT-NeoX's older name of the head
        sd["lm_head.weight"] = sd.pop("embed_out.weight")
    layers = {int(k.split(".")[2]) for k in sd if k.startswith(("model.layers.", "gpt_neox.layers."))}
    if len(layers) != cfg.n_layer:
        raise init_from_mismatch(
            where, f"has {len(layers)} layers but model.n_layer is {cfg.n_layer}: set model.n_layer: {len(layers)}"
        )
    out: dict[str, torch.Tensor] = {}
    sources: dict[int, str] = {}  # id(tensor) -> its name in the export, for error messages

    def take(name: str) -> torch.Tensor:
        if name not in sd:
            raise init_from_mismatch(
                where,
                f"has no parameter {name}: the export does not match the config "
                f"(model.n_layer={cfg.n_layer}, model.bias={cfg.bias})",
            )
        sources[id(sd[name])] = name
        return sd[name]

    def zero_bias(name: str) -> None:  # a bias raydrat (model.bias: false) has not got: must be zero
        if name in sd and sd[name].abs().max() > 0:
            raise init_from_mismatch(where, f"{name} is not zero but model.bias is false: set model.bias: true")

    if arch == LLAMA:
        out["tok_emb.weight"] = take("model.embed_tokens.weight")
        out["norm.weight"] = take("model.norm.weight")
        for i in range(cfg.n_layer):
            for ours, theirs in LLAMA_LAYER.items():
                names = [""] if ours.endswith(".weight") else [".weight"] + ([".bias"] if cfg.bias else [])
                for suffix in names:
                    out[f"layers.{i}.{ours}{suffix}"] = take(f"model.layers.{i}.{theirs}{suffix}")
    else:
        H, D = cfg.n_head, cfg.head_dim
        out["tok_emb.weight"] = take("gpt_neox.embed_in.weight")
        out["norm.weight"] = take("gpt_neox.final_layer_norm.weight")
        norm_bias = "gpt_neox.final_layer_norm.bias"
        if cfg.bias:
            out["norm.bias"] = take(norm_bias)
        else:
            zero_bias(norm_bias)
        for i in range(cfg.n_layer):
            p, q = f"layers.{i}.", f"gpt_neox.layers.{i}."
            for ours, theirs in NEOX_LAYER.items():
                out[p + ours + ".weight"] = take(q + theirs + ".weight")
                if cfg.bias:
                    out[p + ours + ".bias"] = take(q + theirs + ".bias")
                else:
                    zero_bias(q + theirs + ".bias")
            w = take(q + "attention.query_key_value.weight")
            if w.shape != (3 * H * D, cfg.d_model):
                raise init_from_mismatch(
                    where,
                    f"{q}attention.query_key_value.weight has shape {tuple(w.shape)} "
                    f"but raydrat's q/k/v projections need {(3 * H * D, cfg.d_model)}",
                )
            for n, part in zip("qkv", w.view(H, 3, D, -1).unbind(1)):
                out[f"{p}attn_branch.layer.{n}_proj.weight"] = part.reshape(H * D, -1)
            b = sd.get(q + "attention.query_key_value.bias")
            if cfg.bias:
                for n, part in zip("qkv", take(q + "attention.query_key_value.bias").view(H, 3, D).unbind(1)):
                    out[f"{p}attn_branch.layer.{n}_proj.bias"] = part.reshape(-1)
            elif b is not None:
                zero_bias(q + "attention.query_key_value.bias")
    out["lm_head.weight"] = out["tok_emb.weight"] if cfg.tie_embeddings else take("lm_head.weight")
    check_shapes(out, cfg, where, {k: sources[id(v)] for k, v in out.items() if id(v) in sources})
    return out


def _shape_options(name: str) -> str:
    """The settings that decide the shape of raydrat parameter ``name``."""
    if name.startswith(("tok_emb.", "lm_head.")):
        return "model.vocab_size and model.d_model"
    if ".mlp_branch.layer." in name:
        return "model.d_ff and model.d_model"
    if name.endswith(("k_proj.weight", "v_proj.weight", "k_proj.bias", "v_proj.bias")):
        return "model.n_kv_head and model.d_model"
    return "model.d_model and model.n_head"


def check_shapes(
    state: dict[str, torch.Tensor], cfg: ModelConfig, where: str, sources: dict[str, str] | None = None
) -> None:
    """Every parameter of a ``GPT(cfg)`` is in ``state`` with its shape. ``sources``: the
    export's name of each raydrat parameter, for the message."""
    sources = sources or {}
    with torch.device("meta"):  # shapes only, no memory
        expected = GPT(cfg).state_dict()
    for name, tensor in expected.items():
        if name not in state:
            raise init_from_mismatch(where, f"has no {name}: the export does not match the config")
        if tuple(state[name].shape) != tuple(tensor.shape):
            theirs = f"{sources[name]} (raydrat's {name})" if name in sources else name
            raise init_from_mismatch(
                where,
                f"{theirs} has shape {tuple(state[name].shape)} but the config's model "
                f"needs {tuple(tensor.shape)}: set {_shape_options(name)} to the export's",
            )
    extra = sorted(set(state) - set(expected))
    if extra:
        raise init_from_mismatch(where, f"has parameters the config's model lacks: {', '.join(extra[:5])}")
