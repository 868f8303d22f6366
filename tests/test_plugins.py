"""A new mitigation and a new attack recipe are one module each (tests/plugins/): found by name through
``$DORI_PLUGINS``, fitted and applied by the existing verbs, without editing any file of the package."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from dori.cli import app

runner = CliRunner()
ENV = {"DORI_PLUGINS": "tests.plugins.toy_mitigation,tests.plugins.toy_recipe"}
QUICK = ["--limit", "1", "--seeds", "2"]


def _run(args):
    result = runner.invoke(app, args, env=ENV)
    assert result.exit_code == 0, result.output
    return result


def _records(folder):
    return sorted((json.loads(line) for line in (folder / "records.rank0.jsonl").read_text().splitlines()),
                  key=lambda r: r["key"])


def test_toy_mitigation_through_mitigate_evaluate_and_attack(tmp_path):
    _run(["mitigate", "toy-shrink", "--factor", "0", "--out", str(tmp_path / "toy")])
    artefact = tmp_path / "toy" / "toy-shrink.safetensors"
    sidecar = json.loads(artefact.with_suffix(".json").read_text())
    assert sidecar["method"] == "toy-shrink" and sidecar["kind"] == "inference"
    _run(["evaluate", *QUICK, "--steps", "3", "--out", str(tmp_path / "plain")])
    _run(["evaluate", *QUICK, "--steps", "3", "--mitigation", str(artefact), "--out", str(tmp_path / "toy-eval")])
    manifest = json.loads((tmp_path / "toy-eval" / "manifest.json").read_text())
    assert manifest["resolved"]["mitigations"][0]["name"] == "toy-shrink"
    plain, shrunk = _records(tmp_path / "plain"), _records(tmp_path / "toy-eval")
    assert [r["sscd_orig"] for r in plain] != [r["sscd_orig"] for r in shrunk]  # it changed the images
    assert all(abs(r["noise_norm_mean"]) < 1e-6 for r in shrunk)  # no conditioning left: cond == uncond
    # inside the attack's loss too: with the conditioning scaled by 0 the embedding gets no gradient
    _run(["attack", *QUICK, "--steps", "2", "--eval-steps", "2", "--mitigation", str(artefact),
          "--out", str(tmp_path / "attack")])
    assert all(r["relative_perturbation"] == 0 for r in _records(tmp_path / "attack"))


def test_toy_recipe_through_attack(tmp_path):
    from dori.attack.run import load_triggers

    _run(["attack", *QUICK, "--recipe", "toy_linf", "--steps", "3", "--eval-steps", "2", "--out", str(tmp_path / "a")])
    records = _records(tmp_path / "a")
    assert all(r["unet_evaluations"] == 3 * 2 for r in records)  # 2 pairs a step: the recipe's objective
    manifest = json.loads((tmp_path / "a" / "manifest.json").read_text())
    assert manifest["config"]["recipe"] == "toy_linf" and manifest["resolved"]["recipe"].endswith("toy_recipe.toy_linf")
    from safetensors.torch import load_file

    triggers = load_triggers(tmp_path / "a")
    for r in records:
        name = r["key"].replace("/", "_").replace("#", "_")
        start = load_file(str(tmp_path / "a" / "triggers" / f"{name}.safetensors"))["initial"]
        assert (triggers[r["key"]] - start).abs().max() <= 0.05 + 1e-6  # its L-inf ball
    unknown = runner.invoke(app, ["attack", "--recipe", "no_such_recipe"], env=ENV)
    assert unknown.exit_code == 2 and "dori_kowalczuk2025" in unknown.output and "toy_linf" in unknown.output


def test_unknown_plugin_module_is_one_line(tmp_path):
    result = runner.invoke(app, ["mitigate", "not-registered"], env={"DORI_PLUGINS": "tests.plugins.nowhere"})
    assert result.exit_code == 2 and "DORI_PLUGINS" in result.output and "Traceback" not in result.output


def test_inference_mitigation_applies_inside_the_unet_and_comes_off(testbed_pipe):
    from tests.plugins.toy_mitigation import ConditioningShrink, ShrinkConfig

    unet = testbed_pipe.unet
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    y = torch.randn(1, 77, unet.config.cross_attention_dim, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        plain = unet(x, 10, encoder_hidden_states=y).sample
        zero = unet(x, 10, encoder_hidden_states=torch.zeros_like(y)).sample
        with ConditioningShrink(ShrinkConfig(0.0)).apply(testbed_pipe):
            shrunk = unet(x, 10, encoder_hidden_states=y).sample
        after = unet(x, 10, encoder_hidden_states=y).sample
    assert torch.equal(shrunk, zero) and torch.equal(after, plain)
    with pytest.raises(Exception, match="factor"):
        ShrinkConfig(2.0).validate()
