"""Reading configs: YAML files and shipped recipes, ``--set`` overrides, keys that were
renamed, and validation errors turned into messages that name the key and the fix."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from raydrat.config.base import ConfigError
from raydrat.config.dotted import flatten, parse_override, set_dotted
from raydrat.config.run import RaydratConfig

RECIPES_DIR = Path(__file__).resolve().parents[1] / "recipes"

RENAMED: dict[str, str] = {
    "train.checkpointing": "recompute.mode",
    "gates.lam": "recompute.gates.memory_weight",
    "gates.mu": "recompute.gates.recompute_weight",
    "gates.memory_budget_mb": "recompute.budget_mb",
    "train.precision": "precision.mode",
    "train.precision_fallback": "precision.fallback",
    "train.precision_fallback_after": "precision.fallback_after",
    "train.precision_fallback_steps": "precision.fallback_steps",
    "train.compile": "compile.mode",
    "scaling.strategy": "sync.mode",
}
"""Old dotted key → the key that replaced it."""
RENAME_NOTES: dict[str, str] = {
    "gates.memory_budget_mb": "with recompute.mode: gated",
    "scaling.strategy": "scaling.strategy=fsdp is sync.mode=fsdp; replicated is sync.mode=ddp or local",
}
"""What to know beyond the new key's name."""
CARRIED_VALUES: dict[str, dict[Any, Any]] = {"scaling.strategy": {"fsdp": "fsdp"}}
"""Renamed keys whose old values do not all mean something under the new key: old value →
new value (an old value not listed leaves the new key as it is)."""
REMOVED: dict[str, str] = {
    "sync.latency_s": "a simulated slow link is a benchmark setting: raydrat bench sync --latency-ms",
}
"""Old dotted key that has no config key any more → what to use instead."""
MOVED_SECTIONS: dict[str, str] = {"gates": "recompute.gates"}
"""Old section → where its keys live now (keys not in :data:`RENAMED` keep their name)."""


def _new_key(dotted: str) -> str | None:
    if dotted in RENAMED:
        return RENAMED[dotted]
    section, _, key = dotted.partition(".")
    return f"{MOVED_SECTIONS[section]}.{key}" if section in MOVED_SECTIONS and key else None


def renamed_key(dotted: str) -> str | None:
    """The line that says what replaced the old key ``dotted`` (``None``: not an old key)."""
    if dotted in REMOVED:
        return f"{dotted}: removed; {REMOVED[dotted]}"
    new = _new_key(dotted)
    if new is None:
        return None
    note = RENAME_NOTES.get(dotted)
    return f"{dotted}: renamed; use {new}" + (f" ({note})" if note else "")


def renamed_keys(data: dict[str, Any]) -> list[str]:
    """One line per old key found in ``data`` (a raw config mapping), naming its new key."""
    lines = []
    for section, new in MOVED_SECTIONS.items():
        if section in data and not isinstance(data[section], dict):
            lines.append(f"  {section}: moved; its keys live under {new}")
    for dotted in flatten(data):
        line = renamed_key(dotted)
        if line is not None:
            lines.append(f"  {line}")
    return lines


def upgrade_flat(flat: dict[str, Any]) -> dict[str, Any]:
    """A flattened config written with old keys (a run's record), in today's keys: renamed
    keys moved, removed ones dropped (so ``--resume`` compares like with like)."""
    out: dict[str, Any] = {}
    carried: dict[str, Any] = {}
    for dotted, value in flat.items():
        new = _new_key(dotted)
        if dotted in REMOVED:
            continue
        if dotted in CARRIED_VALUES:
            if value in CARRIED_VALUES[dotted]:
                carried[new] = CARRIED_VALUES[dotted][value]
            continue
        out[new or dotted] = value
    return {**out, **carried}


def _section_at(root: type[BaseModel], loc: tuple[Any, ...]) -> type[BaseModel] | None:
    """The pydantic model class that owns the field at ``loc`` (for 'allowed keys')."""
    model: Any = root
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(part)
        if field is None:
            return None
        ann = field.annotation
        inner = getattr(ann, "__args__", None)
        candidates = [ann, *(inner or ())]
        nxt = next((c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None)
        if nxt is None:
            return None
        model = nxt
    return model


def format_validation_error(
    exc: ValidationError, origin: str, root: type[BaseModel] = RaydratConfig, prefix: str = ""
) -> str:
    """One line per problem: the dotted key, then what is wrong and what is allowed.
    ``root`` is the model that was validated (its sections give the allowed keys);
    ``prefix`` is prepended to the keys (e.g. ``sweep.``)."""
    lines = [f"invalid config ({origin}):"]
    for err in exc.errors():
        loc = tuple(err["loc"])
        path = prefix + (".".join(str(p) for p in loc) or "<top level>")
        if err["type"] == "extra_forbidden":
            owner = _section_at(root, loc)
            allowed = sorted(owner.model_fields) if owner else []
            lines.append(f"  {path}: unknown key; allowed keys here: {', '.join(allowed)}")
        elif err["type"] == "value_error":
            msg = str(err["msg"]).removeprefix("Value error, ")
            lines.append(f"  {path}: {msg}" if loc else f"  {msg}")
        else:
            lines.append(f"  {path}: {err['msg']} (got {err.get('input')!r})")
    return "\n".join(lines)


def resolve_shipped_yaml(path: str | Path, folder: Path, kind: str, shipped_kind: str) -> Path:
    """``path`` if it exists, else the shipped ``folder/NAME.yaml`` it names. The error
    ("config file ... not found (shipped recipes: ...)") lists what is shipped."""
    p = Path(path)
    if p.exists():
        return p
    for candidate in (folder / p.name, folder / f"{p.name}.yaml"):
        if candidate.exists():
            return candidate
    shipped = ", ".join(sorted(q.stem for q in folder.glob("*.yaml"))) or "none"
    raise ConfigError(f"{kind} {str(path)!r} not found (shipped {shipped_kind}: {shipped})")


def resolve_recipe(path: str | Path) -> Path:
    """A recipe path, or the name of a shipped recipe (``debug`` / ``debug.yaml``)."""
    return resolve_shipped_yaml(path, RECIPES_DIR, "config file", "recipes")


def read_yaml_mapping(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc})") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a UTF-8 text file") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"{path}: a config must be a YAML mapping of sections (model:, data:, ...), got a {type(data).__name__}"
        )
    return data


def config_from_dict(data: dict[str, Any], overrides: list[str] | None = None, origin: str = "<dict>") -> RaydratConfig:
    """Apply ``--set`` overrides to ``data`` and validate it; a :class:`ConfigError` names
    every bad key (and the new name of a renamed one)."""
    data = copy.deepcopy(data)
    for text in overrides or []:
        key, value = parse_override(text, RaydratConfig)
        set_dotted(data, key, value)
    renamed = renamed_keys(data)
    if renamed:
        raise ConfigError("\n".join([f"invalid config ({origin}):", *renamed]))
    try:
        return RaydratConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, origin)) from None


BASE_KEY = "base"
"""A config's first key may name the recipe it extends (``base: gpt2-small``)."""


def _merged(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    """``top`` over ``base``: sections merged key by key, any other value (a list too) replaced."""
    out = copy.deepcopy(base)
    for key, value in top.items():
        out[key] = _merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def read_config_mapping(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A config file's mapping with its ``base:`` applied: the recipe it names (a path
    relative to the file, else a shipped recipe) read first, then this file's keys over it."""
    data = read_yaml_mapping(path)
    base = data.pop(BASE_KEY, None)
    if base is None:
        return data
    if not isinstance(base, str):
        raise ConfigError(f"{path}: base: give one recipe name or path (got {base!r})")
    base_path = path.parent / base if (path.parent / base).is_file() else resolve_recipe(base)
    if base_path.resolve() in seen:
        raise ConfigError(f"{path}: base: {base} extends itself ({' -> '.join(str(p) for p in seen)})")
    return _merged(read_config_mapping(base_path, (*seen, path.resolve())), data)


def load_config(path: str | Path, overrides: list[str] | None = None) -> RaydratConfig:
    """Load a YAML recipe (a path or a shipped recipe name; ``base:`` applied) and apply overrides."""
    p = resolve_recipe(path)
    return config_from_dict(read_config_mapping(p), overrides, origin=str(p))
