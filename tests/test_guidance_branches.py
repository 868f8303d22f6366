import copy

import pytest
import torch

from dori.errors import DoriError
from dori.generation import GenerationConfig, generate
from dori.guidance_branches import (
    SIDES,
    compare_guidance,
    guidance_difference,
    split_guidance,
    split_timesteps,
)
from dori.models import encode_prompts
from dori.seeding import item_generator


@pytest.fixture(scope="module")
def shifted(testbed_pipe):
    """A copy of the testbed's UNet whose predictions differ from it everywhere."""
    other = copy.deepcopy(testbed_pipe.unet)
    with torch.no_grad():
        other.conv_out.bias.add_(0.3)
    return other


def test_split_guidance_predicts_one_half_of_the_batch_with_the_other_unet(testbed_pipe, shifted):
    unet = testbed_pipe.unet
    size, channels = unet.config.sample_size, unet.config.in_channels
    sample = torch.randn(2, channels, size, size, generator=torch.Generator().manual_seed(0))
    states = encode_prompts(testbed_pipe, ["", "a red circle on a blue background"])
    t = torch.tensor(500)
    with torch.no_grad():
        plain = unet(sample, t, encoder_hidden_states=states).sample
        theirs = shifted(sample, t, encoder_hidden_states=states).sample
        for branch, want in (("unconditional", torch.cat([theirs[:1], plain[1:]])),
                             ("conditional", torch.cat([plain[:1], theirs[1:]]))):
            with split_guidance(testbed_pipe, shifted, branch):
                got = unet(sample, t, encoder_hidden_states=states, return_dict=False)[0]
                per_sample = unet(sample, torch.tensor([500, 500]), encoder_hidden_states=states).sample
                with pytest.raises(DoriError, match="3 latents is not a guidance batch"):
                    unet(sample[[0, 1, 1]], t, encoder_hidden_states=states[[0, 1, 1]])
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(per_sample, plain, atol=1e-5, rtol=1e-5)  # not a sampling step: left alone
        torch.testing.assert_close(unet(sample, t, encoder_hidden_states=states).sample, plain)  # hook removed
    assert not torch.allclose(theirs, plain, atol=1e-2)


def test_split_guidance_inside_a_guided_generation(testbed_pipe, shifted):
    config = GenerationConfig(num_inference_steps=3, batch_size=2)
    seeds, prompts = [1, 2], ["a red circle on a blue background", "a photo of grass"]
    plain = generate(testbed_pipe, seeds, prompts, config=config).images
    same = copy.deepcopy(testbed_pipe.unet)
    with split_guidance(testbed_pipe, same, "conditional"):
        kept = generate(testbed_pipe, seeds, prompts, config=config).images
    with split_guidance(testbed_pipe, shifted, "unconditional"):
        moved = generate(testbed_pipe, seeds, prompts, config=config).images
    torch.testing.assert_close(kept, plain, atol=1e-4, rtol=0)
    assert (moved - plain).abs().max() > 0.05
    torch.testing.assert_close(generate(testbed_pipe, seeds, prompts, config=config).images, plain)


def test_split_guidance_refuses_what_it_cannot_split(testbed_pipe, shifted):
    with pytest.raises(DoriError, match="branch: must be one of unconditional, conditional, got 'both'"):
        with split_guidance(testbed_pipe, shifted, "both"):
            pass
    with pytest.raises(DoriError, match="other: must be a UNet2DConditionModel"):
        with split_guidance(testbed_pipe, testbed_pipe.vae):
            pass
    with split_guidance(testbed_pipe, shifted):
        with pytest.raises(DoriError, match="split-guidance"):  # one split at a time
            with split_guidance(testbed_pipe, shifted, "conditional"):
                pass


def test_guidance_difference_measures_how_strongly_a_unet_follows_its_captions(testbed_pipe):
    from diffusers import DDPMScheduler

    unet = testbed_pipe.unet
    scheduler = DDPMScheduler.from_config(testbed_pipe.scheduler.config)
    size, channels = unet.config.sample_size, unet.config.in_channels
    latents = torch.randn(3, channels, size, size, generator=torch.Generator().manual_seed(0))
    captions = encode_prompts(testbed_pipe, ["a red circle on a blue background", "a photo of grass", "an astronaut"])
    empty = encode_prompts(testbed_pipe, [""])
    timesteps = [900, 100]
    diff = guidance_difference(unet, scheduler, latents, captions, empty, timesteps, pairs=2, batch_size=5)
    assert diff.shape == (3, 2, 2, channels, size, size)
    # one entry by hand: caption 1 at t = 100, second draw
    noise = torch.randn((channels, size, size), generator=item_generator("guidance-difference", 0, 1, 100, 1))
    x_t = scheduler.add_noise(latents[1:2], noise[None], torch.tensor([100]))
    with torch.no_grad():
        want = (unet(x_t, 100, encoder_hidden_states=captions[1:2]).sample
                - unet(x_t, 100, encoder_hidden_states=empty).sample)[0]
    torch.testing.assert_close(diff[1, 1, 1], want, atol=1e-4, rtol=1e-4)
    assert diff[1, 1, 1].abs().max() > 1e-2  # the caption moves the prediction
    assert not torch.allclose(diff[1, 1, 0], diff[1, 1, 1])  # two draws, two x_t

    same = compare_guidance(diff, guidance_difference(unet, scheduler, latents, captions, empty, timesteps, pairs=2),
                            timesteps)
    assert [r["timestep"] for r in same] == timesteps
    for row in same:
        assert row["ratio"] == pytest.approx(1.0, abs=1e-4) and row["cosine"] == pytest.approx(1.0, abs=1e-4)
        assert row["norm_base"] > 0
    deaf = copy.deepcopy(unet)  # cross-attention values zeroed: no caption reaches the predictions
    with torch.no_grad():
        for name, module in deaf.named_modules():
            if name.endswith("attn2.to_v"):
                module.weight.zero_()
    for row in compare_guidance(diff, guidance_difference(deaf, scheduler, latents, captions, empty, timesteps,
                                                          pairs=2), timesteps):
        assert row["norm_other"] < 1e-6 and row["ratio"] < 1e-6 and row["cosine"] == pytest.approx(0.0, abs=1e-6)

    with pytest.raises(DoriError, match=r"timesteps: each must be in \[0, 1000\)"):
        guidance_difference(unet, scheduler, latents, captions, empty, [1000])
    with pytest.raises(DoriError, match="captions: one per latent, got 2 for 3"):
        guidance_difference(unet, scheduler, latents, captions[:2], empty, timesteps)
    with pytest.raises(DoriError, match="pairs: must be >= 1"):
        guidance_difference(unet, scheduler, latents, captions, empty, timesteps, pairs=0)
    with pytest.raises(DoriError, match="other: its guidance differences have shape"):
        compare_guidance(diff, diff[:, :1], timesteps)


def test_split_timesteps_predicts_one_end_of_sampling_with_the_other_unet(testbed_pipe, shifted):
    unet = testbed_pipe.unet
    size, channels = unet.config.sample_size, unet.config.in_channels
    sample = torch.randn(2, channels, size, size, generator=torch.Generator().manual_seed(0))
    states = encode_prompts(testbed_pipe, ["", "a red circle on a blue background"])
    with torch.no_grad():
        plain = {t: unet(sample, t, encoder_hidden_states=states).sample for t in (600, 400)}
        theirs = {t: shifted(sample, t, encoder_hidden_states=states).sample for t in (600, 400)}
        for side, routed in (("high", 600), ("low", 400)):
            with split_timesteps(testbed_pipe, shifted, 500, side):
                for t in (600, 400):
                    got = unet(sample, torch.tensor(t), encoder_hidden_states=states, return_dict=False)[0]
                    torch.testing.assert_close(got, (theirs if t == routed else plain)[t])
                # a timestep per row (a diffusion loss): each row from the UNet its timestep names
                mixed = unet(sample, torch.tensor([600, 400]), encoder_hidden_states=states, return_dict=False)[0]
                want = torch.cat([(theirs if 600 == routed else plain)[600][:1],
                                  (theirs if 400 == routed else plain)[400][1:]])
                torch.testing.assert_close(mixed, want, atol=1e-4, rtol=1e-4)
                with pytest.raises(DoriError, match="split-timesteps"):  # one split at a time
                    with split_timesteps(testbed_pipe, shifted, 500, side):
                        pass
            assert "forward" not in vars(unet)
            torch.testing.assert_close(unet(sample, routed, encoder_hidden_states=states).sample, plain[routed])

    # gradients reach an embedding through both UNets' rows (Dori against the hybrid)
    y = states.clone().requires_grad_(True)
    with split_timesteps(testbed_pipe, shifted, 500, "high"):
        unet(sample, torch.tensor([600, 400]), encoder_hidden_states=y).sample.square().sum().backward()
    assert y.grad[0].abs().sum() > 0 and y.grad[1].abs().sum() > 0

    config = GenerationConfig(num_inference_steps=4, batch_size=2)
    seeds, prompts = [1, 2], ["a red circle on a blue background", "a photo of grass"]
    base = generate(testbed_pipe, seeds, prompts, config=config).images
    with split_timesteps(testbed_pipe, copy.deepcopy(unet), 500, "high"):
        kept = generate(testbed_pipe, seeds, prompts, config=config).images
    images = {}
    for side in SIDES:
        with split_timesteps(testbed_pipe, shifted, 500, side):
            images[side] = generate(testbed_pipe, seeds, prompts, config=config).images
    torch.testing.assert_close(kept, base, atol=1e-4, rtol=0)
    assert (images["high"] - base).abs().max() > 0.05 and (images["low"] - base).abs().max() > 0.05
    assert (images["high"] - images["low"]).abs().max() > 0.05
    with pytest.raises(DoriError, match="side: must be one of high, low, got 'middle'"):
        with split_timesteps(testbed_pipe, shifted, 500, "middle"):
            pass
