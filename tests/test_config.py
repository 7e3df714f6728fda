"""Config: every shipped recipe loads; bad keys, types and combinations name the key."""

from pathlib import Path

import pytest

from raydrat.config import (
    RECIPES_DIR,
    ConfigError,
    RaydratConfig,
    config_from_dict,
    load_config,
    parse_override,
)

RECIPES = sorted(RECIPES_DIR.glob("*.yaml"))


def test_recipes_are_shipped():
    assert {p.stem for p in RECIPES} >= {"debug", "demo", "gpt2-small"}


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_every_recipe_loads_and_round_trips(path):
    cfg = load_config(path)
    assert isinstance(cfg, RaydratConfig)
    again = config_from_dict(cfg.to_dict())
    assert again == cfg


def test_recipe_by_name_and_overrides():
    cfg = load_config("debug", ["optim.lr=0.01", "model.activation=gelu", "train.steps=7"])
    assert cfg.optim.lr == 0.01 and cfg.model.activation == "gelu" and cfg.train.steps == 7
    assert cfg.flat()["optim.lr"] == 0.01


def test_misspelled_key_names_path_and_allowed_keys():
    with pytest.raises(ConfigError, match=r"optim\.lrr: unknown key; allowed keys here: .*\blr\b"):
        load_config("debug", ["optim.lrr=0.1"])


def test_unknown_section_is_named():
    with pytest.raises(ConfigError, match=r"optimizer: unknown key; allowed keys here: .*optim"):
        config_from_dict({"optimizer": {"lr": 1}})


def test_wrong_type_names_key():
    with pytest.raises(ConfigError, match=r"train\.steps: .*integer.*'many'"):
        load_config("debug", ["train.steps=many"])


def test_literal_lists_allowed_values():
    with pytest.raises(ConfigError, match=r"model\.activation: .*'gelu'.*'swiglu'"):
        load_config("debug", ["model.activation=tanh"])


def test_invalid_combination_names_keys():
    with pytest.raises(ConfigError, match=r"model\.n_head \(4\) must be divisible by model\.n_kv_head \(3\)"):
        load_config("debug", ["model.n_kv_head=3"])
    with pytest.raises(ConfigError, match=r"optim\.warmup_steps"):
        load_config("debug", ["optim.warmup_steps=500"])


def test_missing_recipe_lists_shipped_ones():
    with pytest.raises(ConfigError, match=r"not found \(shipped recipes: .*debug"):
        load_config("no-such-recipe")


@pytest.mark.parametrize("text", ["- a\n- b\n", "just a string\n"])
def test_yaml_that_is_not_a_mapping(tmp_path: Path, text):
    p = tmp_path / "bad.yaml"
    p.write_text(text)
    with pytest.raises(ConfigError, match=r"bad\.yaml: a config must be a YAML mapping"):
        load_config(p)


def test_override_syntax_errors():
    with pytest.raises(ConfigError, match="section.key=value"):
        parse_override("optim.lr")
    with pytest.raises(ConfigError, match="is a value, not a section"):
        load_config("debug", ["name.x=1"])


def test_derived_shapes():
    cfg = load_config("debug", ["model.activation=gelu", "model.n_kv_head=null"])
    assert cfg.model.kv_heads == cfg.model.n_head
    assert cfg.model.ff_dim == 4 * cfg.model.d_model
