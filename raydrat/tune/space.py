"""Search spaces as YAML: load a ``tune_spaces/*.yaml`` file, check every entry against the
real config model, and expand it into the sweep's trial configs.

A space file is a :class:`raydrat.config.SweepConfig`. Each ``space`` entry maps a dotted
config key to one distribution::

    optim.lr: {loguniform: [1.0e-4, 1.0e-2]}
    model.activation: {choice: [gelu, swiglu]}
    train.batch_size: {grid: [4, 8]}
    recompute.gates.memory_weight: {uniform: [0.0, 1.0], when: {recompute.mode: gated}}

With ``search: random`` (or ``grid``) the trials follow Tune's semantics (``num_samples``
random samples per grid point) but are drawn here, with ``seed``, before anything launches:
every trial's config is validated and its memory estimated up front, and the same file
always gives the same trials. A searcher (``optuna``, ...) proposes one value per entry at a
time instead; :meth:`Space.params_from` turns a proposal into the trial's params (entries
whose ``when`` does not hold are dropped).
"""

from __future__ import annotations

import copy
import itertools
import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from raydrat.config import (
    ConfigError,
    RaydratConfig,
    SweepConfig,
    config_from_dict,
    format_validation_error,
    read_config_mapping,
    read_yaml_mapping,
    renamed_key,
    resolve_recipe,
    resolve_shipped_yaml,
    set_dotted,
)

KINDS = ("choice", "grid", "uniform", "loguniform", "randint")
SPACES_DIR = Path(__file__).resolve().parents[1] / "tune_spaces"
"""The shipped spaces: package data (in the wheel too); ``tune_spaces/`` at the repository
root is a link to it."""


@dataclass(frozen=True)
class Dist:
    """One ``space`` entry."""

    key: str
    kind: str
    args: tuple
    when: dict[str, tuple] = field(default_factory=dict)

    def values(self) -> list[Any]:
        """The finite candidates (choice/grid), or the bounds (continuous)."""
        return list(self.args)

    def sample(self, rng: random.Random) -> Any:
        if self.kind == "choice":
            return rng.choice(self.args)
        lo, hi = self.args
        if self.kind == "uniform":
            return rng.uniform(lo, hi)
        if self.kind == "loguniform":
            return math.exp(rng.uniform(math.log(lo), math.log(hi)))
        if self.kind == "randint":
            return rng.randrange(lo, hi)
        raise AssertionError(self.kind)

    def applies(self, flat: dict[str, Any]) -> bool:
        return all(flat.get(k) in allowed for k, allowed in self.when.items())


@dataclass
class TrialSpec:
    """One expanded trial: its sampled params and its validated config."""

    index: int
    params: dict[str, Any]
    config: RaydratConfig

    @property
    def name(self) -> str:
        return f"t{self.index:03d}"


@dataclass
class Space:
    sweep: SweepConfig
    path: Path
    base_path: Path
    base: dict[str, Any]
    dists: list[Dist]

    def config_for(self, params: dict[str, Any], origin: str) -> RaydratConfig:
        data = _with(self.base, {**self.sweep.overrides, **params})
        return config_from_dict(data, origin=origin)

    def base_flat(self) -> dict[str, Any]:
        return self.config_for({}, f"{self.path} (base + overrides)").flat()

    def is_grid(self, d: Dist) -> bool:
        """Whether ``d`` is crossed exhaustively (``grid``; ``choice`` too with ``search: grid``)."""
        return d.kind == "grid" or (d.kind == "choice" and self.sweep.search == "grid")

    def params_from(self, values: dict[str, Any]) -> dict[str, Any]:
        """A searcher's proposal (a value for every entry) as the trial's params: the
        unconditional entries, then each conditional one, in file order, where its ``when``
        holds against the base and the values kept so far."""
        values = {k: _native(v) for k, v in values.items()}
        params = {d.key: values[d.key] for d in self.dists if not d.when}
        flat = {**self.base_flat(), **params}
        for d in self.dists:
            if d.when and d.applies(flat):
                params[d.key] = flat[d.key] = values[d.key]
        return params


def _native(v: Any) -> Any:
    """A plain Python value (searchers may hand back numpy scalars)."""
    return v.item() if hasattr(v, "item") and not isinstance(v, (list, dict, str)) else v


def _with(base: dict[str, Any], dotted: dict[str, Any]) -> dict[str, Any]:
    data = copy.deepcopy(base)
    for k, v in dotted.items():
        set_dotted(data, k, v)
    return data


def resolve_space(path: str | Path) -> Path:
    """A space file path, or the name of a shipped space (``smoke`` / ``smoke.yaml``)."""
    return resolve_shipped_yaml(path, SPACES_DIR, "space file", "spaces")


def _parse_dist(key: str, spec: Any, where: str) -> Dist:
    if not isinstance(spec, dict):
        raise ConfigError(
            f"{where}: space.{key} must be a mapping like {{choice: [a, b]}} or {{uniform: [lo, hi]}}, got {spec!r}"
        )
    spec = dict(spec)
    when_raw = spec.pop("when", None) or {}
    kinds = [k for k in spec if k in KINDS]
    unknown = [k for k in spec if k not in KINDS]
    if unknown or len(kinds) != 1:
        raise ConfigError(
            f"{where}: space.{key} needs exactly one of {', '.join(KINDS)} (and optionally "
            f"`when`), got keys {sorted(spec) + (['when'] if when_raw else [])}"
        )
    kind = kinds[0]
    args = spec[kind]
    if not isinstance(args, list) or not args:
        raise ConfigError(f"{where}: space.{key}.{kind} must be a non-empty list, got {args!r}")
    if kind in ("uniform", "loguniform", "randint"):
        if len(args) != 2 or not all(isinstance(a, (int, float)) and not isinstance(a, bool) for a in args):
            raise ConfigError(f"{where}: space.{key}.{kind} must be two numbers [lo, hi], got {args!r}")
        lo, hi = args
        if not lo < hi:
            raise ConfigError(f"{where}: space.{key}.{kind}: lower bound {lo} must be below upper bound {hi}")
        if kind == "loguniform" and lo <= 0:
            raise ConfigError(f"{where}: space.{key}.loguniform: bounds must be positive, got {args!r}")
        if kind == "randint" and not all(isinstance(a, int) for a in args):
            raise ConfigError(f"{where}: space.{key}.randint: bounds must be integers, got {args!r}")
    if not isinstance(when_raw, dict):
        raise ConfigError(f"{where}: space.{key}.when must map dotted keys to values, got {when_raw!r}")
    when = {k: tuple(v) if isinstance(v, list) else (v,) for k, v in when_raw.items()}
    return Dist(key, kind, tuple(args), when)


def load_space(path: str | Path) -> Space:
    """Read and fully validate a space file; raises :class:`ConfigError` naming the culprit."""
    p = resolve_space(path)
    raw = read_yaml_mapping(p)
    try:
        sweep = SweepConfig.model_validate(raw)
    except ValidationError as exc:  # the sweep's own keys (and a nested section's) are listed
        raise ConfigError(format_validation_error(exc, str(p), root=SweepConfig)) from None
    base_path = p.parent / sweep.base if (p.parent / sweep.base).exists() else resolve_recipe(sweep.base)
    base = read_config_mapping(base_path)
    if not sweep.space:
        raise ConfigError(f"{p}: the space is empty: add at least one entry under `space:`")
    dists = [_parse_dist(k, v, str(p)) for k, v in sweep.space.items()]
    space = Space(sweep, p, base_path, base, dists)
    _validate_entries(space)
    return space


def _validate_entries(space: Space) -> None:
    """Every key and every finite candidate (and both bounds of continuous ones) goes through
    the real config model, with the entry's ``when`` conditions applied."""
    base_flat = space.base_flat()  # the fixed overrides themselves must be valid
    keys = {d.key for d in space.dists}
    for d in space.dists:
        for cond in d.when:
            if cond not in base_flat and cond not in keys:
                old = renamed_key(cond)
                where = f"{space.path}: space.{d.key}.when"
                raise ConfigError(
                    f"{where}: {old}" if old else f"{where} refers to {cond!r}, which is not a config key"
                )
        for value in d.values():
            cond = {k: v[0] for k, v in d.when.items()}
            try:
                space.config_for({**cond, d.key: value}, f"{space.path}: space.{d.key} = {value!r}")
            except ConfigError as exc:
                raise ConfigError(f"{exc}\n  (from space entry {d.key!r} of {space.path})") from None


def expand(space: Space) -> list[TrialSpec]:
    """The trials of ``search: random | grid``: ``num_samples`` random draws per point of
    the grid product (:meth:`Space.is_grid`). Conditional entries are resolved against the
    trial's other values."""
    sweep = space.sweep
    rng = random.Random(sweep.seed)
    grids = [d for d in space.dists if space.is_grid(d) and not d.when]
    base_flat = space.base_flat()
    trials: list[TrialSpec] = []
    points = itertools.product(*(d.args for d in grids)) if grids else [()]
    for point in points:
        for _ in range(sweep.num_samples):
            params: dict[str, Any] = dict(zip((d.key for d in grids), point))
            for d in space.dists:
                if not space.is_grid(d) and not d.when:
                    params[d.key] = d.sample(rng)
            # conditional grids expand within the points where their condition holds
            cond_grids = [d for d in space.dists if d.when and space.is_grid(d) and d.applies({**base_flat, **params})]
            for cpoint in itertools.product(*(d.args for d in cond_grids)):
                full = {**params, **dict(zip((d.key for d in cond_grids), cpoint))}
                for d in space.dists:  # conditional samples see every other value
                    if d.when and not space.is_grid(d) and d.applies({**base_flat, **full}):
                        full[d.key] = d.sample(rng)
                index = len(trials)
                cfg = space.config_for(full, f"{space.path}: trial {index} {full}")
                trials.append(TrialSpec(index, full, cfg))
    return trials
