"""A trained model's weights from what the user points at: a checkpoint directory, a run
directory (its newest complete checkpoint), a run name under ``train.storage_path``, or a
directory written by ``raydrat export`` (hf or safetensors). Torch only (no Ray, no MLflow).

:func:`load_saved` returns a :class:`SavedModel`: the weights, the model's config, the
run's config when the source carries one, and the tokenizer the model was trained with
(the model itself is built by :func:`raydrat.core.setup.load_model`). :func:`init_state` is
``model.init_from``: the weights of such a source for a given model config, every mismatch
named with both values.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from raydrat.config.base import ConfigError
from raydrat.config.model import ModelConfig
from raydrat.config.run import RaydratConfig
from raydrat.core.checkpoint.export import RAYDRAT_CONFIG, load_pretrained
from raydrat.core.checkpoint.hf import RAYDRAT_MODEL_KEY, check_shapes
from raydrat.core.checkpoint.state import STATE_FILE, load_state, newest_complete, verify_checkpoint
from raydrat.core.data.demo import tokenizer_file
from raydrat.core.data.spec import resolve_tokenizer_path
from raydrat.core.data.tokenizer import HF_TOKENIZER_FILE

CHECKPOINT_GLOB = "checkpoint_*"
WHAT_TO_GIVE = (
    "give a checkpoint directory (checkpoint_* with state.pt), a run directory or run name "
    "under train.storage_path, or a directory written by `raydrat export`"
)


@dataclass
class SavedModel:
    weights: dict[str, torch.Tensor]
    model_cfg: ModelConfig
    cfg: RaydratConfig | None
    """The run's whole config (a checkpoint or a safetensors export with it), else ``None``."""
    tokenizer_path: Path | None
    source: Path
    step: int | None = None


def _is_export(d: Path) -> bool:
    return (d / RAYDRAT_CONFIG).is_file() or (d / "config.json").is_file()


def resolve_source(where: str | Path, storage_path: str | Path = "ray_results") -> Path:
    """The checkpoint or export directory ``where`` names (see the module docstring).
    Raises :class:`ConfigError` naming the path and what to give instead."""
    path = Path(where).expanduser()
    if not path.exists() and not path.is_absolute() and len(path.parts) == 1:
        named = Path(storage_path).expanduser() / path  # a run name
        if named.exists():
            path = named
    if not path.is_dir():
        raise ConfigError(f"{where} does not exist or is not a directory: {WHAT_TO_GIVE}")
    if (path / STATE_FILE).is_file():
        reason = verify_checkpoint(path)
        if reason is not None:
            raise ConfigError(
                f"checkpoint {path} is incomplete ({reason}): give another checkpoint of the run, "
                "or the run directory for its newest complete one"
            )
        return path
    if _is_export(path):
        return path
    candidates = sorted(p for p in path.glob(CHECKPOINT_GLOB) if p.is_dir())
    if candidates:
        chosen, skipped = newest_complete(candidates)
        if chosen is None:
            why = "; ".join(f"{Path(d).name}: {r}" for d, r in skipped)
            raise ConfigError(f"run {path} has no complete checkpoint ({why}): train it further or resume it")
        return Path(chosen)
    raise ConfigError(
        f"{where} is not a raydrat checkpoint, run or export (no {STATE_FILE}, no "
        f"{CHECKPOINT_GLOB}, no config.json or {RAYDRAT_CONFIG}): {WHAT_TO_GIVE}"
    )


def _export_configs(d: Path) -> tuple[ModelConfig, RaydratConfig | None]:
    if (d / RAYDRAT_CONFIG).is_file():
        meta = json.loads((d / RAYDRAT_CONFIG).read_text())
        run = RaydratConfig.model_validate(meta["config"]) if meta.get("config") else None
        return ModelConfig(**meta["model"]), run
    hf = json.loads((d / "config.json").read_text())
    if RAYDRAT_MODEL_KEY not in hf:
        raise ConfigError(
            f"{d}/config.json was not written by `raydrat export` (no {RAYDRAT_MODEL_KEY} key): "
            "load it with model.init_from under a config of its architecture instead"
        )
    return ModelConfig(**hf[RAYDRAT_MODEL_KEY]), None


def run_tokenizer(cfg: RaydratConfig, checkpoint: Path) -> Path:
    """The tokenizer a run trained with: ``data.tokenizer_path``, else its demo tokenizer,
    looked for under the working directory and then where the run ran (a relative
    ``data.demo_dir`` beside a relative ``train.storage_path``), trained again only when
    neither has it."""
    if cfg.data.tokenizer_path or Path(cfg.data.demo_dir).is_absolute():
        return resolve_tokenizer_path(cfg.data, cfg.model.vocab_size)
    name = tokenizer_file(cfg.model.vocab_size)
    ran_in = checkpoint.resolve().parent.parent.parent  # <cwd>/<storage_path>/<run>/<checkpoint>
    for base in (Path.cwd(), ran_in):
        if (base / cfg.data.demo_dir / name).is_file():
            return base / cfg.data.demo_dir / name
    return resolve_tokenizer_path(cfg.data, cfg.model.vocab_size)


def load_saved(where: str | Path, storage_path: str | Path = "ray_results") -> SavedModel:
    """The weights ``where`` names, with the model's and the run's config and its tokenizer."""
    src = resolve_source(where, storage_path)
    if (src / STATE_FILE).is_file():
        try:
            state = load_state(str(src))
            cfg = RaydratConfig.model_validate(state["config"])
        except Exception as exc:
            raise ConfigError(
                f"{src / STATE_FILE} is not a raydrat checkpoint ({type(exc).__name__}: {exc}): {WHAT_TO_GIVE}"
            ) from None
        return SavedModel(state["model"], cfg.model, cfg, run_tokenizer(cfg, src), src, state.get("step"))
    mcfg, cfg = _export_configs(src)
    tok = (
        src / HF_TOKENIZER_FILE
        if (src / HF_TOKENIZER_FILE).is_file()
        else (resolve_tokenizer_path(cfg.data, mcfg.vocab_size) if cfg is not None else None)
    )
    return SavedModel(load_pretrained(src, mcfg), mcfg, cfg, tok, src)


def init_state(where: str | Path, cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """``model.init_from``: the weights at ``where`` (a raydrat checkpoint or run, or an
    exported hf/safetensors directory) for a model of ``cfg``; a parameter whose shape
    differs is named with both shapes."""
    src = resolve_source(where)
    if (src / STATE_FILE).is_file():
        state = load_state(str(src))["model"]
        check_shapes(state, cfg, str(src))
        return state
    return load_pretrained(src, cfg)
