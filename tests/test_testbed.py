"""The shipped testbed memorizes its four photos and nothing else; the build code trains and resumes."""

import json

import numpy as np
import pytest
import torch

from dori.descriptors import TestbedDescriptor, calibrate_testbed_descriptor
from dori.generation import GenerationConfig, generate
from dori.memorization import score_images
from dori.models import testbed_path as shipped_testbed
from dori.prompts import load_prompt_set
from dori.testbed.assets import load_testbed_data
from dori.testbed.data import MEMORIZED_PHOTOS, ROLES, TEMPLATE_PHOTOS, TestbedDataConfig
from dori.testbed.train import TestbedTrainConfig, train_testbed


@pytest.fixture(scope="module")
def descriptor():
    return TestbedDescriptor.from_folder(shipped_testbed())


def test_shipped_folder_is_a_plain_diffusers_pipeline():
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(shipped_testbed(), safety_checker=None, requires_safety_checker=False)
    assert pipe.unet.config.sample_size == 8 and pipe.vae.config.scaling_factor != 1.0
    assert pipe.tokenizer.model_max_length == 77 and len(pipe.tokenizer) == 49408
    entries, images = load_testbed_data(shipped_testbed())
    memorized = [e for e in entries if e.role == "memorized"]
    assert {e.source for e in memorized} <= {*MEMORIZED_PHOTOS, *TEMPLATE_PHOTOS} and len(memorized) >= 4
    assert all(e.kind in ("VM", "TM") for e in memorized)
    copies = {e.source: 0 for e in memorized}
    for e in entries:
        if e.source in copies and e.role in ("memorized", "template"):
            copies[e.source] += e.copies
    assert min(copies.values()) >= 50
    assert {"memorized", "seen-once", "shape", "held-out"} <= {e.role for e in entries} <= set(ROLES)
    assert images.shape == (len(entries), 32, 32, 3) and images.dtype == np.uint8


def test_memorized_captions_replicate_their_photo(testbed_pipe, descriptor):
    prompt_set = load_prompt_set("testbed:memorized")
    config = GenerationConfig(num_inference_steps=25, batch_size=20)
    seeds = list(range(100, 110))  # other seeds than the demo's
    for record in prompt_set.records:
        gens = generate(testbed_pipe, seeds, [record.prompt] * len(seeds), config=config)
        scores = score_images(descriptor, gens.images, [prompt_set.references[record.id]] * len(seeds))
        replicated = int((scores.sscd_orig > descriptor.threshold).sum())
        assert replicated >= 8, f"{record.id}: {replicated}/10 replicate ({np.round(scores.sscd_orig, 2)})"


@pytest.mark.parametrize("role,limit", [("seen-once", 24), ("shape", 24), ("held-out", 36)])
def test_other_captions_replicate_no_memorized_photo(testbed_pipe, descriptor, role, limit):
    prompt_set = load_prompt_set(f"testbed:{role}").subset(limit)
    prompts = [r.prompt for r in prompt_set.records]
    gens = generate(testbed_pipe, list(range(len(prompts))), prompts, config=GenerationConfig(batch_size=36))
    scores = score_images(descriptor, gens.images, [None] * len(prompts), prompt_set.gallery)
    rate = float((scores.gallery_max > descriptor.threshold).mean())
    assert rate <= 0.05, f"{role}: {rate:.2f} of generations replicate a memorized photo"


def test_descriptor_separates_replicas_from_other_images(testbed_pipe, descriptor):
    entries, images = load_testbed_data(shipped_testbed())
    calibration = calibrate_testbed_descriptor(testbed_pipe, images, [e.role for e in entries], seed=1)
    assert calibration.auc >= 0.99
    assert abs(calibration.threshold - descriptor.threshold) < 0.1


def _loss(info: str) -> float:
    """The loss a training step reports (``progress(stage, step, total, "loss 0.123")``)."""
    return float(info.split()[1])


def _micro(**kw):
    data = TestbedDataConfig(copies_per_photo=4, seen_once=17, shapes=24, held_out_crops=2, held_out_shape_combos=2,
                             emoji=24, held_out_emoji=2, template_captions=2)
    kw = {"sparsify_steps": 10, **kw}
    return TestbedTrainConfig(data=data, vae_steps=3, unet_steps=30, vae_batch_size=8, unet_batch_size=8,
                              checkpoint_every=5, warmup_steps=2, **kw)


def test_training_lowers_the_loss_and_resumes_to_the_same_weights(tmp_path):
    from safetensors.torch import load_file

    losses = []
    config = _micro()  # the shipped recipe: the resume also covers the direct-route drop's random draws in both stages
    full = train_testbed(tmp_path / "full", config, progress=lambda s, k, n, info: losses.append((s, _loss(info))))
    unet_losses = [loss for s, loss in losses if s == "unet"]
    assert np.mean(unet_losses[-5:]) < 0.8 * np.mean(unet_losses[:5])

    assert [s for s, _ in losses].count("sparsify") == 10
    # the build calibrates its copy descriptor, so that scoring it does not fall back to the default 0.7
    calibration = json.loads((full / "testbed" / "descriptor.json").read_text())
    assert 0.0 < calibration["threshold"] < 1.0 and calibration["auc"] > 0.5
    assert TestbedDescriptor.from_folder(full).threshold == calibration["threshold"]

    def interrupt_at(at_stage, at_step):
        def interrupt(stage, step, total, info):
            if stage == at_stage and step == at_step:
                raise KeyboardInterrupt
        return interrupt

    for stage, step in (("unet", 15), ("sparsify", 7)):  # the second resumes inside the sparsify stage
        with pytest.raises(KeyboardInterrupt):
            train_testbed(tmp_path / "resumed", config, progress=interrupt_at(stage, step))
    resumed = train_testbed(tmp_path / "resumed", config)
    a = load_file(str(full / "unet" / "diffusion_pytorch_model.safetensors"))
    b = load_file(str(resumed / "unet" / "diffusion_pytorch_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    unsparsified = load_file(str(train_testbed(tmp_path / "plain", _micro(sparsify_steps=0)) / "unet" / "diffusion_pytorch_model.safetensors"))
    assert not all(torch.equal(a[k], unsparsified[k]) for k in a)
    direct = load_file(str(train_testbed(tmp_path / "direct", _micro(unet_drop_direct=0.0, sparsify_drop_direct=0.0))
                           / "unet" / "diffusion_pytorch_model.safetensors"))
    assert not all(torch.equal(a[k], direct[k]) for k in a)
    for name in ("unet_drop_direct", "sparsify_drop_direct"):
        with pytest.raises(ValueError, match=name):
            train_testbed(tmp_path / "bad", _micro(**{name: 1.5}))
    with pytest.raises(ValueError, match="another config"):
        train_testbed(tmp_path / "full", _micro(seed=1))


def test_v_prediction_build_trains_towards_the_velocity(tmp_path):
    from safetensors.torch import load_file

    losses = {}
    for kind in ("epsilon", "v_prediction"):
        record = []
        folder = train_testbed(tmp_path / kind, _micro(prediction_type=kind, sparsify_steps=0),
                               progress=lambda s, k, n, info, record=record: s == "unet" and record.append(_loss(info)))
        losses[kind] = record
        saved = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
        assert saved["prediction_type"] == kind
    v = losses["v_prediction"]
    assert np.mean(v[-5:]) < 0.8 * np.mean(v[:5])
    # same draws, another target: the losses differ from the first step on (the velocity is not the noise)
    assert not np.isclose(v[0], losses["epsilon"][0])
    a = load_file(str(tmp_path / "epsilon" / "pipeline" / "unet" / "diffusion_pytorch_model.safetensors"))
    b = load_file(str(tmp_path / "v_prediction" / "pipeline" / "unet" / "diffusion_pytorch_model.safetensors"))
    assert not all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ValueError, match="prediction_type"):
        train_testbed(tmp_path / "bad", _micro(prediction_type="sample"))


def test_direct_route_drop_sends_the_caption_through_the_ffn_only():
    from dori.testbed.train import DirectRouteDrop, make_components

    unet = make_components(TestbedTrainConfig())["unet"].eval()
    torch.manual_seed(0)
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([500, 500])
    ctx = [torch.randn(2, 77, 64), torch.randn(2, 77, 64)]
    ffns = [m for n, m in unet.named_modules() if n.endswith("ff.net.2")]
    with torch.no_grad():
        for m in ffns:  # with the FFNs silenced, only the direct route carries the caption
            m.weight.zero_()
            m.bias.zero_()

        def run(c):
            return unet(x, t, encoder_hidden_states=c).sample

        plain = [run(c) for c in ctx]
        assert not torch.allclose(plain[0], plain[1], atol=1e-3)
        from dori.hooks import Handle

        handle = Handle(unet, "route")
        route = DirectRouteDrop(unet, handle)
        route.select(torch.tensor([True, True]))
        dropped = [run(c) for c in ctx]
        assert torch.allclose(dropped[0], dropped[1], atol=1e-5)  # the caption no longer reaches the output
        route.select(torch.tensor([True, False]))  # per sample
        mixed = run(ctx[0])
        assert torch.allclose(mixed[0], dropped[0][0], atol=1e-6) and torch.equal(mixed[1], plain[0][1])
        route.select(None)
        assert torch.equal(run(ctx[0]), plain[0])
        route.select(torch.tensor([True, True]))
        handle.remove()
        assert torch.equal(run(ctx[0]), plain[0])


def test_activation_penalty_is_hoyer_sparsity():
    from dori.testbed.train import activation_penalty

    dense, one_hot = torch.ones(3, 16), torch.zeros(3, 16)
    one_hot[:, 5] = 2.0
    assert activation_penalty(dense, sparsity=1.0).item() == pytest.approx(1.0, abs=1e-4)
    assert activation_penalty(one_hot, sparsity=1.0).item() == pytest.approx(0.25, abs=1e-4)  # 1/sqrt(16)
    x = torch.randn(2, 7, 16)
    assert activation_penalty(100 * x, sparsity=1.0).item() == pytest.approx(activation_penalty(x, sparsity=1.0).item(), rel=1e-4)
    assert activation_penalty(x, l1=0.5).item() == pytest.approx(0.5 * x.abs().mean().item(), rel=1e-5)


def test_shape_colour_detector_on_drawn_shapes():
    from dori.images import to_tensor
    from dori.testbed.data import COLOURS, _rng, draw_shape, shape_caption
    from dori.testbed.shape_colours import caption_colours, detect_colours, shape_caption_accuracy

    colours = list(COLOURS)
    images, captions = [], []
    for k in range(24):
        c, b = colours[k % 8], colours[(k + 3) % 8]
        images.append(draw_shape(("circle", "square", "triangle")[k % 3], c, b, _rng(0, "t", k)))
        captions.append(shape_caption(("circle", "square", "triangle")[k % 3], c, b))
    tensor = to_tensor(np.stack(images))
    assert shape_caption_accuracy(tensor, captions) == 1.0
    swapped = [shape_caption("circle", b, c) for c, b in (caption_colours(x) for x in captions)]
    assert shape_caption_accuracy(tensor, swapped) == 0.0
    assert detect_colours(torch.full((3, 32, 32), 1.0))[0] is None
    assert caption_colours("a photo of a cat") is None


def test_colour_failures_name_what_each_generation_got_wrong():
    from dori.images import to_tensor
    from dori.testbed.data import _rng, draw_shape, shape_caption
    from dori.testbed.shape_colours import colour_failures, colour_outcome, shape_caption_accuracy

    red_on_blue = draw_shape("square", "red", "blue", _rng(0, "f", 0))
    plain_blue = draw_shape("square", "blue", "blue", _rng(0, "f", 1))  # no object: one colour everywhere
    images = to_tensor(np.stack([red_on_blue, red_on_blue, red_on_blue, plain_blue]))
    captions = [shape_caption("square", "red", "blue"), shape_caption("square", "green", "blue"),
                shape_caption("square", "red", "yellow"), shape_caption("square", "red", "blue")]
    assert [colour_outcome(image, c) for image, c in zip(images, captions, strict=True)] == [
        ("right", None), ("object_wrong", "red"), ("background_wrong", "blue"), ("object_missing", None)]
    assert colour_outcome(images[0], "a photo of a cat") is None
    failures = colour_failures(torch.cat([images, images[:1]]), [*captions, "a photo of a cat"])
    assert failures["right"] == shape_caption_accuracy(images, captions) == 0.25
    assert failures["object_wrong"] == failures["background_wrong"] == failures["object_missing"] == 0.25
    assert failures["confusions"] == {"green>red": 1, "background:yellow>blue": 1}
    assert np.isnan(colour_failures(images[:1], ["a photo of a cat"])["right"])
