"""What a user's own Stable Diffusion needs: any scheduler, ConceptPrune's set scope, NeMo's cache key and
official settings, training images of any size, retain data in the layouts people have."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from dori.errors import DoriError
from dori.mitigations.nemo import NeMo, NeMoConfig, value_layers
from dori.mitigations.wanda import Wanda, WandaConfig, ffn_layers, input_norms
from dori.models import load_pipeline

SCHEDULERS = ("PNDMScheduler", "DDIMScheduler", "EulerDiscreteScheduler", "DPMSolverMultistepScheduler")


@pytest.fixture(scope="module")
def pipe(sd1_folder):
    return load_pipeline(sd1_folder)


@pytest.mark.parametrize("scheduler", SCHEDULERS)
def test_wanda_counts_unet_calls_on_any_scheduler(sd1_folder, scheduler):
    """PNDM (SD v1.4's own) makes 51 UNet calls for 50 steps: the norms have a row per call."""
    pipe = load_pipeline(sd1_folder, scheduler=scheduler)
    assert type(pipe.scheduler).__name__ == scheduler
    config = WandaConfig(num_inference_steps=4, timesteps=4, sparsity=0.2)
    layers = ffn_layers(pipe.unet, config.layers)
    from dori.hooks import counting_calls

    with counting_calls(pipe.unet) as counter:
        norms = input_norms(pipe, layers, ["a cat"], config)
    assert all(len(n) == counter.calls for n in norms.values())
    assert counter.calls == (5 if scheduler == "PNDMScheduler" else 4)
    wanda = Wanda.calibrate(pipe, ["a cat", "a dog"], config)
    assert all(m.any() for m in wanda.mask_for().values())


def test_set_scope_samples_the_base_prompt_once_per_target(pipe, monkeypatch):
    """ConceptPrune pairs every target prompt with one run of "": the base norms of N prompts are those of
    N runs of "", so its ``target > base`` filter is as strict for a set as for one prompt."""
    import dori.mitigations.wanda as wanda_module

    config = WandaConfig(num_inference_steps=3, timesteps=3, sparsity=0.2)
    layers = ffn_layers(pipe.unet, config.layers)
    one = input_norms(pipe, layers, [""], config)
    three = input_norms(pipe, layers, ["", "", ""], config)
    for name in layers:
        assert torch.allclose(three[name], one[name] * math.sqrt(3), rtol=1e-5)
    seen = []
    original = wanda_module.wanda_masks

    def spy(weight, target, base, *args):
        seen.append(base)
        return original(weight, target, base, *args)

    monkeypatch.setattr(wanda_module, "wanda_masks", spy)
    Wanda.calibrate(pipe, ["a cat", "a dog", "a cup"], config)
    name = next(iter(layers))
    assert any(torch.allclose(b, three[name], rtol=1e-5) for b in seen if b.shape == three[name].shape)


def test_wanda_keep_floor_is_conceptprunes_int():
    from dori.mitigations.wanda import wanda_masks

    w = torch.randn(4, 250, generator=torch.Generator().manual_seed(0))
    target, base = torch.rand(1, 250) + 1, torch.zeros(1, 250)
    assert (wanda_masks(w, target, base, 0.01, 1, "floor").sum(1) == 2).all()  # int(2.5)
    assert (wanda_masks(w, target, base, 0.01, 1, "ceil").sum(1) == 3).all()
    assert not wanda_masks(w, target, base, 0.001, 1, "floor").any()  # int(0.25) = 0 weights


def test_nemo_threshold_cache_is_keyed_by_the_whole_unet(pipe, tmp_path, monkeypatch):
    """A model whose FFNs changed (a baked Wanda, a fine-tuning) gets its own SSIM threshold."""
    monkeypatch.setenv("DORI_CACHE", str(tmp_path / "cache"))
    config = NeMoConfig(num_seeds=2, num_inference_steps=5, calibration_prompts=2)
    prompts = ["a cat", "a dog", "a cup", "a car"]
    first = NeMo.localize(pipe, prompts[:1], config, statistics_prompts=prompts)
    ffn = ffn_layers(pipe.unet, ("*ff.net.2",))
    layer = next(iter(ffn.values()))
    with torch.no_grad():
        saved = layer.weight.clone()
        layer.weight.mul_(0.5)
    try:
        second = NeMo.localize(pipe, prompts[:1], config, statistics_prompts=prompts)
    finally:
        with torch.no_grad():
            layer.weight.copy_(saved)
    assert len(list((tmp_path / "cache" / "nemo").glob("ssim-threshold-*"))) == 2
    assert len(list((tmp_path / "cache" / "nemo").glob("statistics-*"))) == 1  # the statistics do not use the FFNs
    assert first.threshold != second.threshold


def test_nemo_official_settings(pipe, tmp_path, monkeypatch):
    """The official statistics file, the official MS-SSIM betas, latent draws and guidance order."""
    from dori.mitigations.nemo import ActivationStatistics, pairwise_ssim

    monkeypatch.setenv("DORI_CACHE", str(tmp_path / "cache"))
    layers = value_layers(pipe.unet, NeMoConfig().layers)
    means = [torch.rand(layer.out_features) for layer in layers.values()]
    stds = [torch.rand(layer.out_features) + 0.5 for layer in layers.values()]
    torch.save((means, stds), tmp_path / "statistics.pt")
    stats = ActivationStatistics.from_official(tmp_path / "statistics.pt", layers)
    assert all(torch.equal(stats.mean[n], m) for n, m in zip(layers, means, strict=True))
    torch.save((means[:1], stds[:1]), tmp_path / "short.pt")
    with pytest.raises(DoriError, match="statistics_file"):
        ActivationStatistics.from_official(tmp_path / "short.pt", layers)
    (tmp_path / "junk.pt").write_bytes(b"junk")
    with pytest.raises(DoriError, match="not NeMo's statistics file"):
        ActivationStatistics.from_official(tmp_path / "junk.pt", layers)
    official = NeMoConfig(num_seeds=3, ms_ssim_betas="official", seed_draws="official", calibration_cfg="official",
                          statistics_file=str(tmp_path / "statistics.pt"), ssim_threshold=0.428, num_inference_steps=5)
    nemo = NeMo.localize(pipe, ["a cat"], official, statistics_prompts=["x", "y"])
    assert nemo.threshold == 0.428
    x = torch.rand(3, 4, 64, 64)  # SD's latent size: all three scales
    normalized, raw = pairwise_ssim(x, NeMoConfig()), pairwise_ssim(x, official)
    assert torch.allclose(raw, normalized ** 0.99, atol=1e-5)  # torchmetrics' betas sum to 0.99
    lat = official.latents(pipe)
    assert torch.equal(lat, torch.randn(lat.shape, generator=torch.Generator().manual_seed(official.seed)))
    with pytest.raises(DoriError, match="calibration_cfg"):
        NeMoConfig(calibration_cfg="reversed").validate()


def test_training_images_of_any_size_are_centre_cropped(pipe, tmp_path):
    """LAION images are not square: the target is the centred square, and scores take any size."""
    from dori.descriptors import TestbedDescriptor
    from dori.images import to_tensor
    from dori.memorization import score_images
    from dori.models import encode_images

    rng = np.random.default_rng(0)
    wide = rng.integers(0, 255, (16, 40, 3), dtype=np.uint8)
    square = wide[:, 12:28]
    a, b = encode_images(pipe, [wide, square]), encode_images(pipe, to_tensor(square))
    assert torch.allclose(a[0], a[1], atol=1e-5) and torch.allclose(a[1], b[0], atol=1e-5)
    scores = score_images(TestbedDescriptor(), to_tensor(square), [wide], {"tall": rng.integers(0, 255, (30, 10, 3),
                                                                                                  dtype=np.uint8)})
    assert np.isfinite(scores.sscd_orig).all() and scores.gallery_match == ["tall"]


def test_retain_pairs_in_the_layouts_people_have(tmp_path, pipe):
    from dori.finetune.retain import check_retain, load_retain_set

    rng = np.random.default_rng(0)
    folder = tmp_path / "pairs"
    folder.mkdir()
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    (folder / "metadata.jsonl").write_text("".join(json.dumps({"file_name": f"{i}.png", "text": f"photo {i}"}) + "\n"
                                                   for i in range(3)))
    pairs = load_retain_set(str(folder), None, None)
    assert pairs.captions == ["photo 0", "photo 1", "photo 2"] and pairs.images[0].shape == (20, 24, 3)
    (folder / "metadata.jsonl").unlink()
    for i in range(3):
        (folder / f"{i}.txt").write_text(f"caption {i}\n")
    assert load_retain_set(str(folder), None, None).captions == ["caption 0", "caption 1", "caption 2"]
    latents, embeds = pairs.batch(pipe, [0, 2])
    assert latents.shape[0] == 2 and embeds.shape[0] == 2
    prompts = tmp_path / "retain.txt"
    prompts.write_text("a red house\na green tree\n")
    with pytest.raises(DoriError, match="--retain-images DIR .* or --retain-generate"):
        check_retain(str(prompts), None, False, None)
    with pytest.raises(DoriError, match="give --retain"):
        check_retain(None, None, False, None)
    from dori.generation import GenerationConfig

    made = load_retain_set(str(prompts), None, None, generate_with=pipe, cache=tmp_path / "gen",
                           generation=GenerationConfig(num_inference_steps=2))
    assert len(made) == 2 and len(list((tmp_path / "gen").glob("*.png"))) == 2
    again = load_retain_set(str(prompts), None, None, generate_with=pipe, cache=tmp_path / "gen")
    assert all(np.array_equal(x, y) for x, y in zip(made.images, again.images, strict=True))  # kept, not regenerated


def test_other_prompt_default_depends_on_the_model(pipe, testbed_pipe):
    from dori.attack.run import TESTBED_OTHER_PROMPT, default_other_prompt
    from dori.prompts import load_prompt_set

    assert default_other_prompt(testbed_pipe) == TESTBED_OTHER_PROMPT
    assert default_other_prompt(pipe) == load_prompt_set("laion-nonmem").records[0].prompt


def test_single_file_checkpoint_loads_offline_with_a_config_folder(sd1_folder, tmp_path):
    """A checkpoint in the original layout (as users download them) loads through diffusers'
    from_single_file with the component configs of a folder; without the folder, one clear line."""
    from typer.testing import CliRunner

    from dori.cli import app
    from dori.models import pipeline_location
    from tests.ldm_checkpoint import write_ldm_checkpoint

    pipe = load_pipeline(sd1_folder)
    checkpoint = write_ldm_checkpoint(pipe, tmp_path / "model.safetensors")
    loaded = load_pipeline(checkpoint, model_config=sd1_folder)
    for name in ("unet", "vae", "text_encoder"):
        a, b = getattr(pipe, name).state_dict(), getattr(loaded, name).state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    assert pipeline_location(loaded) == str(checkpoint) and type(loaded.scheduler).__name__ == "PNDMScheduler"
    with pytest.raises(DoriError, match="--model-config"):
        load_pipeline(checkpoint)
    result = CliRunner().invoke(app, ["evaluate", "--model", str(checkpoint), "--out", str(tmp_path / "run")])
    assert result.exit_code == 2 and "--model-config" in result.output and not (tmp_path / "run").exists()
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(DoriError, match="single-file checkpoint"):
        load_pipeline(tmp_path / "notes.txt")


def test_dtype_reaches_every_component_and_every_verb(sd1_folder, tmp_path, monkeypatch):
    """``--dtype`` is honoured by diffusers' loader (pyproject: diffusers >= 0.42, the version CI
    installs) and by the verbs that load a model."""
    from typer.testing import CliRunner

    from dori.cli import app
    from tests.helpers import write_prompts_with_references, write_sscd

    pipe = load_pipeline(sd1_folder, dtype="bfloat16")
    assert {pipe.unet.dtype, pipe.vae.dtype, pipe.text_encoder.dtype} == {torch.bfloat16}
    monkeypatch.setenv("DORI_CACHE", str(tmp_path / "cache"))
    prompts, refs = write_prompts_with_references(tmp_path / "p", ["a podcast cover"])
    runner, model = CliRunner(), ["--model", str(sd1_folder), "--dtype", "bfloat16"]
    data = ["--prompts", str(prompts), "--references", str(refs), "--descriptor", str(write_sscd(tmp_path / "s.pt"))]
    for args in (["evaluate", *model, *data, "--seeds", "1", "--steps", "2", "--out", str(tmp_path / "e")],
                 ["prune", *model, "--prompts", str(prompts), "--steps", "2", "--timesteps", "1", "--out", str(tmp_path / "w")],
                 ["attack", *model, *data, "--steps", "1", "--seeds", "1", "--eval-steps", "2", "--out", str(tmp_path / "a")]):
        result = runner.invoke(app, args)
        assert result.exit_code == 0, result.output[-2000:]
        manifest = json.loads((tmp_path / args[-1].rsplit("/", 1)[-1] / "manifest.json").read_text())
        assert manifest["model"]["dtype"] == "bfloat16", args[0]
