"""Every public entry point works on a StableDiffusionPipeline loaded with diffusers directly (nothing
added by dori's loader), in the SD 1.x and SD 2.x layouts: evaluation, the attack, NeMo, Wanda and
adversarial fine-tuning, with an SSCD-format descriptor and a references folder."""

from __future__ import annotations

import json

import pytest
import torch

from dori.attack.loop import AttackConfig
from dori.attack.run import AttackRunConfig, run_attack
from dori.descriptors import DescriptorConfig
from dori.evaluate import EvaluateConfig, run_evaluate
from dori.generation import GenerationConfig
from dori.mitigations import MitigateConfig, load_mitigation, mitigated, run_mitigate
from tests.helpers import write_prompts_with_references, write_sscd

FAST = GenerationConfig(num_inference_steps=2, batch_size=4)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("plain")
    csv, refs = write_prompts_with_references(folder / "memorized", ["a cat on a sofa", "a rocket at dusk"])
    retain, retain_images = write_prompts_with_references(folder / "retain", ["a red circle", "a blue square",
                                                                               "a green field", "a white house"])
    return {"prompts": str(csv), "references": str(refs), "sscd": str(write_sscd(folder / "sscd.pt")),
            "retain": str(retain), "retain_images": str(retain_images), "surrogates": str(retain_images)}


def _plain(folder):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_every_verb_on_a_pipeline_loaded_with_diffusers(tiny_pipeline_folder, inputs, tmp_path, monkeypatch):
    monkeypatch.setenv("DORI_CACHE", str(tmp_path / "cache"))
    pipe = _plain(tiny_pipeline_folder)
    assert not any(k.startswith("dori") for k in vars(pipe))
    sscd = DescriptorConfig(inputs["sscd"])
    weights = {k: v.clone() for k, v in pipe.unet.state_dict().items()}

    evaluated = run_evaluate(pipe, EvaluateConfig(prompts=inputs["prompts"], references=inputs["references"],
                                                  num_seeds=2, generation=FAST, descriptor=sscd), tmp_path / "eval")
    assert len(evaluated.records) == 4 and all(-1 <= r["sscd_orig"] <= 1 for r in evaluated.records)
    manifest = json.loads((tmp_path / "eval" / "manifest.json").read_text())
    assert manifest["model"]["location"] == str(tiny_pipeline_folder)

    _, records = run_attack(pipe, AttackRunConfig(prompts=inputs["prompts"], references=inputs["references"],
                                                  num_seeds=1, attack=AttackConfig(steps=2), generation=FAST,
                                                  descriptor=sscd), tmp_path / "attack")
    assert len(records) == 2 and all(r["unet_evaluations"] == 2 * 8 and r["relative_perturbation"] > 0 for r in records)

    nemo = run_mitigate(pipe, MitigateConfig("nemo", inputs["prompts"], settings={
        "num_seeds": 2, "num_inference_steps": 5, "ssim_threshold": -1.0, "statistics": inputs["retain"]}),
        tmp_path / "nemo")
    assert all(r.memorized for r in nemo.mitigation.results)  # threshold -1: every prompt passes the test
    wanda = run_mitigate(pipe, MitigateConfig("wanda", inputs["prompts"], settings={
        "num_inference_steps": 3, "timesteps": 2, "sparsity": 0.1}), tmp_path / "wanda")
    assert wanda.summary["sparsity_per_layer"] and all(v > 0 for v in wanda.summary["sparsity_per_layer"].values())

    adversarial = run_mitigate(pipe, MitigateConfig("adversarial-ft", inputs["prompts"], references=inputs["references"],
                                                    settings={"epochs": 1, "steps_per_epoch": 2, "images_per_step": 2,
                                                              "lr": 1e-3, "retain": inputs["retain"],
                                                              "retain_images": inputs["retain_images"],
                                                              "retain_batch_size": 2, "surrogate": inputs["surrogates"],
                                                              "inner": {"steps": 2, "pairs": 2, "record_at": []},
                                                              "descriptor": {"spec": inputs["sscd"], "threshold": 1.0}}),
                               tmp_path / "adv")
    state = pipe.unet.state_dict()
    assert all(torch.equal(state[k], weights[k]) for k in weights)  # fitting left the user's model as it was
    fitted = load_mitigation(adversarial.artefact)
    assert fitted.kind == "weights" and len(fitted.tensors) > 0
    for mitigation in (nemo.mitigation, load_mitigation(wanda.artefact), fitted):
        with mitigated(pipe, mitigation, prompt="a cat on a sofa"):
            pass
    assert all(torch.equal(pipe.unet.state_dict()[k], weights[k]) for k in weights)
    with mitigated(pipe, fitted):
        changed = pipe.unet.state_dict()
        assert any(not torch.equal(changed[k], weights[k]) for k in weights)
        assert all(torch.equal(changed[k.removeprefix("unet.")], v) for k, v in fitted.tensors.items())
    assert all(torch.equal(pipe.unet.state_dict()[k], weights[k]) for k in weights)


def test_a_pipeline_built_in_memory(clip_tokenizer, inputs, tmp_path):
    from diffusers import StableDiffusionPipeline

    from tests.conftest import tiny_components

    pipe = StableDiffusionPipeline(**tiny_components("sd1", clip_tokenizer))
    pipe.set_progress_bar_config(disable=True)
    result = run_evaluate(pipe, EvaluateConfig(prompts=inputs["prompts"], references=inputs["references"],
                                               num_seeds=1, generation=FAST, descriptor=DescriptorConfig(inputs["sscd"])),
                          tmp_path / "eval")
    assert len(result.records) == 2
    from dori.errors import DoriError

    with pytest.raises(DoriError, match="not the testbed"):
        run_evaluate(pipe, EvaluateConfig(prompts=inputs["prompts"], generation=FAST), tmp_path / "auto")
    assert not (tmp_path / "auto").exists()
