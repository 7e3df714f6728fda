"""Export a raydrat :class:`~raydrat.core.model.transformer.GPT` for other tools, and load such
exports back (``model.init_from``).

``hf`` (:func:`export_hf`): a directory that ``transformers.AutoModelForCausalLM`` and
``AutoTokenizer.from_pretrained(DIR)`` load: ``config.json``, ``model.safetensors`` and the
tokenizer files (``tokenizer.json``, ``tokenizer_config.json`` with the end-of-text and pad
tokens). raydrat's options map onto an architecture transformers has only where it computes
exactly raydrat's function:

=========================  ==========================================================
``LlamaForCausalLM``       ``norm: rmsnorm`` with a gated MLP (``swiglu`` -> ``silu``,
                           ``geglu`` -> ``gelu``); any ``n_kv_head`` (GQA); ``bias`` ->
                           ``attention_bias`` and ``mlp_bias``. RoPE in both is the
                           rotate-half layout, so weights are copied unchanged.
``GPTNeoXForCausalLM``     ``norm: layernorm`` with a plain MLP (``gelu``, ``relu``,
                           ``silu``) and multi-head attention (``n_kv_head`` = ``n_head``):
                           sequential residual, rotary on every feature, q/k/v fused per
                           head; with ``bias: false`` the biases it always has are zeros.
=========================  ==========================================================

Anything else (RMSNorm with a plain MLP, LayerNorm with a gated MLP or with GQA) is refused
with a message naming the option. Both keep ``tie_embeddings``, ``rope_theta``, the norm
epsilon (1e-5) and ``dropout`` (as the attention dropout: raydrat's residual dropout is a
training-time setting that does not change the exported function).

``safetensors`` (:func:`export_safetensors`): ``model.safetensors`` under raydrat's own
parameter names plus ``raydrat_config.json``.

:func:`load_pretrained` reads either kind of directory into a raydrat state dict for a given
:class:`~raydrat.config.model.ModelConfig`; an option or a parameter shape that does not match is
named, with both values.

Torch, safetensors and the standard library only: transformers is not needed to export
(the tests load the exports with it).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from raydrat.atomic import replacing
from raydrat.config.model import ModelConfig
from raydrat.core.checkpoint.hf import (
    check_hf_options,
    check_shapes,
    from_hf_state_dict,
    hf_architecture,
    hf_config,
    init_from_mismatch,
    to_hf_state_dict,
)
from raydrat.core.data.tokenizer import load_tokenizer, resolve_tokenizer_file, tokenizer_special_ids

WEIGHTS = "model.safetensors"
RAYDRAT_CONFIG = "raydrat_config.json"
SAFETENSORS_FORMAT = "raydrat-safetensors/1"


# --------------------------------------------------------------------------------------
# directories
# --------------------------------------------------------------------------------------


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n")


def _save(tensors: dict[str, torch.Tensor], path: Path) -> None:
    with replacing(path) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt"})


def export_tokenizer(
    tokenizer_path: str | Path, out_dir: str | Path, cfg: ModelConfig, eod_token: str | None = None
) -> tuple[int, int]:
    """Write ``tokenizer.json`` and ``tokenizer_config.json`` (end-of-text and pad tokens
    named) into ``out_dir`` so that ``AutoTokenizer.from_pretrained`` loads them; returns
    ``(eos_id, pad_id)``. The tokenizer must fit ``cfg.vocab_size``."""
    src = resolve_tokenizer_file(tokenizer_path)
    tok = load_tokenizer(src, cfg.vocab_size, eod_token)
    eos_id, pad_id = tokenizer_special_ids(src, tok, eod_token)
    out = Path(out_dir)
    shutil.copyfile(src, out / "tokenizer.json")
    eos, pad = tok.id_to_token(eos_id), tok.id_to_token(pad_id)
    _write_json(
        out / "tokenizer_config.json",
        {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "eos_token": eos,
            "pad_token": pad,
            "bos_token": None,
            "unk_token": None,
            "model_max_length": cfg.seq_len,
            "clean_up_tokenization_spaces": False,
        },
    )
    _write_json(out / "special_tokens_map.json", {"eos_token": eos, "pad_token": pad})
    return eos_id, pad_id


def export_hf(
    state: dict[str, torch.Tensor],
    cfg: ModelConfig,
    out_dir: str | Path,
    tokenizer_path: str | Path | None = None,
    eod_token: str | None = None,
) -> Path:
    """Write a transformers model directory (``config.json``, ``model.safetensors``, and
    the tokenizer files when ``tokenizer_path`` is given). Refuses, before writing anything,
    a model no transformers architecture computes exactly."""
    hf_architecture(cfg)  # refuse first
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    eos_id = pad_id = None
    if tokenizer_path is not None:
        eos_id, pad_id = export_tokenizer(tokenizer_path, out, cfg, eod_token)
    _write_json(out / "config.json", hf_config(cfg, eos_id, pad_id))
    if eos_id is not None:
        _write_json(out / "generation_config.json", {"eos_token_id": eos_id, "pad_token_id": pad_id})
    _save(to_hf_state_dict(state, cfg), out / WEIGHTS)
    return out


def export_safetensors(
    state: dict[str, torch.Tensor], cfg: ModelConfig, out_dir: str | Path, config: dict[str, Any] | None = None
) -> Path:
    """Write ``model.safetensors`` (raydrat's parameter names; a tied head stored once) and
    ``raydrat_config.json`` (the model config, and the whole run ``config`` if given)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in state.items()}
    if cfg.tie_embeddings:
        tensors.pop("lm_head.weight", None)
    _write_json(
        out / RAYDRAT_CONFIG, {"format": SAFETENSORS_FORMAT, "model": cfg.model_dump(mode="json"), "config": config}
    )
    _save(tensors, out / WEIGHTS)
    return out


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    index = path / f"{WEIGHTS}.index.json"
    if index.is_file():  # sharded by transformers' save_pretrained
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return {k: v for f in files for k, v in load_file(str(path / f)).items()}
    if (path / WEIGHTS).is_file():
        return load_file(str(path / WEIGHTS))
    raise init_from_mismatch(
        path,
        f"has no {WEIGHTS}: export it with `raydrat export --format hf` or save it with "
        "save_pretrained(safe_serialization=True)",
    )


def load_pretrained(path: str | Path, cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """The raydrat state dict for ``cfg`` held by ``path``: a transformers directory
    (``config.json``) of the matching architecture or a raydrat safetensors export
    (``raydrat_config.json``). Mismatched options and shapes are named with both values."""
    where = Path(path)
    if not where.is_dir():
        raise init_from_mismatch(
            where, f"is not a directory: give an exported model directory (config.json or {RAYDRAT_CONFIG} inside)"
        )
    if (where / RAYDRAT_CONFIG).is_file():
        meta = json.loads((where / RAYDRAT_CONFIG).read_text())
        state = _read_weights(where)
        if cfg.tie_embeddings and "lm_head.weight" not in state and "tok_emb.weight" in state:
            state["lm_head.weight"] = state["tok_emb.weight"]
        saved = ModelConfig(**meta["model"])
        for key in ("norm", "activation", "n_head", "n_kv_head", "rope_theta", "tie_embeddings", "bias"):
            if getattr(saved, key) != getattr(cfg, key):
                raise init_from_mismatch(
                    where,
                    f"was saved with model.{key}={getattr(saved, key)!r} but the config has "
                    f"{getattr(cfg, key)!r}: set model.{key}: {getattr(saved, key)}",
                )
    elif (where / "config.json").is_file():
        hf = json.loads((where / "config.json").read_text())
        arch = check_hf_options(hf, cfg, str(where))
        state = from_hf_state_dict(_read_weights(where), arch, cfg, str(where))
    else:
        raise init_from_mismatch(
            where,
            f"has neither config.json (transformers) nor {RAYDRAT_CONFIG} (raydrat): "
            "give a directory written by `raydrat export`",
        )
    check_shapes(state, cfg, str(where))
    return state
