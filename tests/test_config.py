"""Config: every shipped recipe loads; bad keys, types and combinations name the key."""

from pathlib import Path

import pytest
import yaml

from raydrat.cli import main
from raydrat.config import (
    RECIPES_DIR,
    ConfigError,
    RaydratConfig,
    config_from_dict,
    load_config,
    loading,
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


def test_an_elastic_worker_count_loads_and_is_refused_with_fsdp():
    cfg = load_config("debug", ["scaling.num_workers=[1, 3]"])
    assert cfg.scaling.elastic and (cfg.scaling.min_workers, cfg.scaling.max_workers) == (1, 3)
    assert not load_config("debug", ["scaling.num_workers=[2, 2]"]).scaling.elastic  # [n, n] is n
    with pytest.raises(
        ConfigError,
        match=r"sync.mode=fsdp cannot be combined with scaling.num_workers=\[1, 3\] \(elastic\): its shards "
        r"are laid out for one worker count; give scaling.num_workers a fixed number",
    ):
        load_config("debug", ["scaling.num_workers=[1, 3]", "sync.mode=fsdp"])


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


# -- sections that match the techniques, and the keys they replaced ------------------------

OLD_KEYS = {**loading.RENAMED, **{k: None for k in loading.REMOVED}}
REPO = Path(__file__).resolve().parents[1]
SHIPPED_YAML = sorted(
    p for d in ("raydrat/recipes", "raydrat/tune_spaces", "cluster", "jobs") for p in (REPO / d).glob("*.yaml")
)


def _old_key_line(old: str) -> str:
    new = OLD_KEYS[old]
    return f"{old}: renamed; use {new}" if new else f"{old}: removed; "


@pytest.mark.parametrize("old", sorted(OLD_KEYS))
def test_an_old_key_names_its_new_key_from_set_and_from_yaml(old, tmp_path):
    with pytest.raises(ConfigError) as by_set:
        load_config("debug", [f"{old}=1"])
    assert _old_key_line(old) in str(by_set.value)
    section, key = old.split(".", 1)
    p = tmp_path / "old.yaml"
    p.write_text(yaml.safe_dump({section: {key: 1}}))
    with pytest.raises(ConfigError) as by_yaml:
        load_config(p)
    lines = str(by_yaml.value).splitlines()
    assert lines[1:] == [f"  {loading.renamed_key(old)}"]  # one line, nothing else to fix


def test_the_techniques_have_their_own_sections_and_print_config_shows_them(capsys):
    assert main(["train", "debug", "--print-config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["precision"] == {"mode": "fp32", "fallback": "none", "fallback_after": 3, "fallback_steps": 100}
    assert printed["compile"] == {"mode": "off"}
    assert printed["sync"]["mode"] == "ddp" and "latency_s" not in printed["sync"]
    assert "strategy" not in printed["scaling"]
    assert not {"precision", "precision_fallback", "compile"} & set(printed["train"])
    fsdp = load_config("debug", ["sync.mode=fsdp", "precision.mode=bf16", "compile.mode=off"])
    assert (fsdp.sync.mode, fsdp.precision.mode, fsdp.compile.enabled) == ("fsdp", "bf16", False)


def test_yaml_off_is_compile_off(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("compile: {mode: off}\n")  # YAML 1.1 reads a bare off as false
    assert load_config(p).compile.mode == "off"
    with pytest.raises(ConfigError, match=r"compile\.mode: .*'off'"):
        load_config("debug", ["compile.mode=true"])


def test_an_old_key_in_a_sweep_names_its_new_key(tmp_path):
    from raydrat.tune.space import load_space

    def space(**body) -> Path:
        p = tmp_path / "space.yaml"
        p.write_text(yaml.safe_dump({"base": "debug", "space": {"optim.lr": {"choice": [1e-3]}}, **body}))
        return p

    cases = [
        ({"space": {"train.precision": {"choice": ["fp32", "bf16"]}}}, "train.precision: renamed; use precision.mode"),
        ({"overrides": {"train.compile": "default"}}, "train.compile: renamed; use compile.mode"),
        (
            {"space": {"optim.lr": {"choice": [1e-3], "when": {"scaling.strategy": "fsdp"}}}},
            "space.optim.lr.when: scaling.strategy: renamed; use sync.mode",
        ),
    ]
    for body, needle in cases:
        with pytest.raises(ConfigError) as err:
            load_space(space(**body))
        assert needle in str(err.value), body


def test_every_shipped_yaml_loads_and_uses_no_old_key():
    from raydrat.tune.space import expand, load_space

    assert SHIPPED_YAML
    for p in SHIPPED_YAML:
        text = p.read_text()
        assert not [old for old in OLD_KEYS if old in text], p
        if p.parent.name == "recipes":
            load_config(p)
        elif p.parent.name == "tune_spaces":
            assert expand(load_space(p))


def test_a_run_recorded_with_old_keys_resumes_under_the_new_ones():
    from raydrat.ray_train.resume import config_differences

    cfg = load_config("debug", ["sync.mode=fsdp", "precision.mode=bf16"])
    old = cfg.to_dict()
    old["train"].update(
        precision="bf16", precision_fallback="none", precision_fallback_after=3, precision_fallback_steps=100
    )
    old["train"]["compile"] = "off"
    old["scaling"]["strategy"] = "fsdp"
    old["sync"].update(mode="ddp", latency_s=0.0)
    del old["precision"], old["compile"]
    assert config_differences(old, cfg) == []
    old["train"]["precision"] = "fp32"
    assert config_differences(old, cfg) == ["precision.mode: 'fp32' -> 'bf16'"]
    old["scaling"]["strategy"] = "replicated"  # a replicated run: its sync.mode stands
    assert "sync.mode: 'ddp' -> 'fsdp'" in config_differences(old, cfg)
