"""Configs to and from dicts and files, and the registries that find methods by name."""

from __future__ import annotations

import json

import pytest

from dori.attack.loop import AttackConfig
from dori.attack.run import AttackRunConfig
from dori.config_files import from_dict, read_config_file, to_dict
from dori.demo import DemoConfig
from dori.errors import DoriError


def test_round_trip_of_nested_configs():
    for config in (AttackRunConfig(ids=("a", "b"), attack=AttackConfig(steps=7, record_at=(0, 7))), DemoConfig(),
                   DemoConfig.quick()):
        assert from_dict(type(config), json.loads(json.dumps(to_dict(config)))) == config


def test_partial_and_bad_fields_name_the_field():
    config = from_dict(AttackRunConfig, {"attack": {"steps": "12"}, "num_seeds": 3.0})
    assert config.attack.steps == 12 and config.num_seeds == 3 and config.attack.lr == 0.1
    with pytest.raises(DoriError, match="attack: unknown field 'stepz' .fields: steps"):
        from_dict(AttackRunConfig, {"attack": {"stepz": 1}})
    with pytest.raises(DoriError, match="num_seeds: expected an integer"):
        from_dict(AttackRunConfig, {"num_seeds": 2.5})
    with pytest.raises(DoriError, match="early_stop: expected true or false"):
        from_dict(AttackRunConfig, {"attack": {"early_stop": "maybe"}})


def test_config_files_and_manifests(tmp_path):
    (tmp_path / "a.yaml").write_text("model: my/sd\ndtype: float16\nnum_seeds: 4\n")
    assert read_config_file(tmp_path / "a.yaml") == ({"num_seeds": 4}, {"location": "my/sd", "dtype": "float16"})
    manifest = {"command": "attack", "config": {"num_seeds": 4}, "config_hash": "x", "model": {"location": "m"}}
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "manifest.json").write_text(json.dumps(manifest))
    assert read_config_file(tmp_path / "run", "attack") == ({"num_seeds": 4}, {"location": "m"})
    with pytest.raises(DoriError, match="manifest of a `attack` run"):
        read_config_file(tmp_path / "run" / "manifest.json", "evaluate")
    (tmp_path / "bad.yaml").write_text("a: [1,\n")
    with pytest.raises(DoriError, match="not valid YAML"):
        read_config_file(tmp_path / "bad.yaml")
    (tmp_path / "list.json").write_text("[1, 2]")
    with pytest.raises(DoriError, match="mapping"):
        read_config_file(tmp_path / "list.json")


def test_registries_find_the_built_in_methods_and_name_them_when_asked_wrongly():
    from dori.attack import RECIPES
    from dori.mitigations import MITIGATIONS

    assert {"nemo", "wanda", "ablation", "adversarial-ft"} <= set(MITIGATIONS.names())
    assert "dori_kowalczuk2025" in RECIPES.names()
    assert MITIGATIONS.get("nemo").kind == "hook" and MITIGATIONS.get("adversarial-ft").kind == "weights"
    with pytest.raises(DoriError, match="no method named 'nope'.*nemo"):
        MITIGATIONS.get("nope")
    with pytest.raises(DoriError, match="registered twice"):
        MITIGATIONS.register("nemo")(type("Other", (), {}))


def test_attack_parts_are_checked_when_the_attack_is_built(testbed_pipe):
    from dori.attack import EmbeddingAttack, FromPrompt, NoConstraint

    class NoPairs:
        def __call__(self, y, targets, generators):
            return y.sum()

    with pytest.raises(DoriError, match="objective: NoPairs is not an attack objective"):
        EmbeddingAttack(testbed_pipe, objective=NoPairs(), success=lambda y, which: None, initializer=FromPrompt(),
                        constraint=NoConstraint())
