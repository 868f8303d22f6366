import copy

import pytest
import torch

from dori.errors import DoriError
from dori.generation import GenerationConfig, generate
from dori.guidance_branches import split_guidance
from dori.models import encode_prompts


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
