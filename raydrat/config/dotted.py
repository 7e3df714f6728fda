"""Dotted keys (``optim.lr``) over nested mappings: flatten, set, parse ``--set`` text."""

from __future__ import annotations

import types
import typing
from typing import Any, Literal, Union

import yaml
from pydantic import BaseModel

from raydrat.config.base import ConfigError


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` → ``{"a.b": 1}``."""
    out: dict[str, Any] = {}
    for key, value in d.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, path + "."))
        else:
            out[path] = value
    return out


def set_dotted(d: dict[str, Any], dotted: str, value: Any) -> None:
    """Set ``d["a"]["b"]["c"] = value`` for ``dotted == "a.b.c"``, creating mappings."""
    parts = dotted.split(".")
    if not all(parts):
        raise ConfigError(f"override key {dotted!r} is not a dotted path like 'optim.lr'")
    node = d
    for i, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"override {dotted!r}: {'.'.join(parts[: i + 1])} is a value, not a section")
        node = child
    node[parts[-1]] = value


def parse_override(text: str, root: type[BaseModel] | None = None) -> tuple[str, Any]:
    """``"optim.lr=1e-3"`` → ``("optim.lr", 0.001)``; the value is parsed as YAML, except
    where ``root`` (the config model) says the field is text or an integer: a string field
    takes the text as given (``tracking.run_name=2024`` is ``"2024"``; ``null`` still unsets
    an optional one), and an integer field accepts an integral float (``train.steps=1e3``)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like section.key=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    kinds = field_kinds(root, key) if root is not None else set()
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError as exc:
        if "str" not in kinds:
            raise ConfigError(f"override {text!r}: value is not valid YAML ({exc})") from None
        value = raw
    if "str" in kinds and not isinstance(value, (str, dict, list)) and not (value is None and "none" in kinds):
        return key, raw  # 2024, true, 1.5: the text as typed (a quoted string keeps YAML's reading)
    if "int" in kinds and not isinstance(value, bool):
        number = value
        if isinstance(value, str):  # YAML 1.1 reads 1e3 (no dot) as text
            try:
                number = float(value)
            except ValueError:
                number = value
        if isinstance(number, float) and number.is_integer():
            return key, int(number)
    return key, value


def _annotation_kinds(ann: Any) -> set[str]:
    """``{"str", "int", "none", "model"}``: what a field's annotation admits."""
    origin = typing.get_origin(ann)
    if origin in (Union, types.UnionType):
        return set().union(*(_annotation_kinds(a) for a in typing.get_args(ann)))
    if origin is Literal:
        args = typing.get_args(ann)
        return {"str"} if args and all(isinstance(a, str) for a in args) else set()
    if ann is type(None):
        return {"none"}
    if ann is str:
        return {"str"}
    if ann is int:
        return {"int"}
    if isinstance(ann, type) and issubclass(ann, BaseModel):
        return {"model"}
    return set()


def _submodel(ann: Any) -> type[BaseModel] | None:
    origin = typing.get_origin(ann)
    candidates = typing.get_args(ann) if origin in (Union, types.UnionType) else (ann,)
    return next((c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None)


def field_kinds(root: type[BaseModel], dotted: str) -> set[str]:
    """What the field at ``dotted`` under ``root`` admits (empty for an unknown key: the
    validation names it)."""
    model: type[BaseModel] | None = root
    parts = dotted.split(".")
    for part in parts[:-1]:
        field = model.model_fields.get(part) if model else None
        model = _submodel(field.annotation) if field else None
        if model is None:
            return set()
    field = model.model_fields.get(parts[-1])
    return _annotation_kinds(field.annotation) if field else set()
