import pytest
import torch

from dori.errors import DoriError
from dori.generation import GenerationConfig, generate
from dori.models import load_pipeline


@pytest.fixture(scope="module")
def pipe(sd1_folder):
    return load_pipeline(sd1_folder)


def test_images_do_not_depend_on_the_batch(pipe):
    prompts, seeds = ["a red circle", "a blue square", "a red circle"], [0, 1, 2]
    one = generate(pipe, seeds, prompts, config=GenerationConfig(num_inference_steps=3, batch_size=1))
    three = generate(pipe, seeds, prompts, config=GenerationConfig(num_inference_steps=3, batch_size=3))
    assert one.images.shape == (3, 3, 16, 16)
    assert torch.allclose(one.images, three.images, atol=1e-4)
    assert not torch.allclose(one.images[0], one.images[2], atol=1e-3)  # same prompt, other seed


def test_same_as_plain_pipeline_call(pipe):
    ours = generate(pipe, [7], ["a cat"], config=GenerationConfig(num_inference_steps=3, batch_size=4)).images
    plain = pipe("a cat", num_inference_steps=3, guidance_scale=7.5, generator=torch.Generator().manual_seed(7),
                 output_type="pt").images
    assert torch.allclose(ours, plain, atol=1e-5)


def test_prompt_embeds_path_and_noise_norm(pipe):
    config = GenerationConfig(num_inference_steps=4, batch_size=2)
    by_text = generate(pipe, [0, 1], ["a cat", "a dog"], config=config)
    embeds = pipe.encode_prompt(["a cat", "a dog"], "cpu", 1, False)[0]
    by_embeds = generate(pipe, [0, 1], prompt_embeds=embeds, config=config)
    assert torch.allclose(by_text.images, by_embeds.images, atol=1e-5)
    calls = len(pipe.scheduler.timesteps)  # PNDM (SD v1.4's) makes 5 UNet calls for 4 steps
    assert by_text.noise_norm.shape == (2, calls) and calls == 5 and (by_text.noise_norm > 0).all()
    no_cfg = generate(pipe, [0], ["a cat"], config=GenerationConfig(num_inference_steps=2, guidance_scale=1.0))
    assert no_cfg.noise_norm is None


def test_bad_generation_arguments(pipe):
    with pytest.raises(DoriError, match="num_inference_steps"):
        generate(pipe, [0], ["x"], config=GenerationConfig(num_inference_steps=0))
    with pytest.raises(DoriError, match="one seed per prompt"):
        generate(pipe, [0, 1], ["x"])


def test_noise_norm_is_the_noise_difference_on_every_prediction_type():
    """Wen et al.'s norm is ||eps_cond - eps_uncond||: on a v model the UNet's output difference is scaled
    by sqrt(alpha_bar_t) (eps = sqrt(a) v + sqrt(1 - a) x_t, the same x_t on both halves)."""
    from diffusers import DDIMScheduler

    from dori.generation import epsilon_scale
    from dori.mitigations.nemo import _epsilon

    g = torch.Generator().manual_seed(0)
    x, a, b = (torch.randn(1, 4, 8, 8, generator=g) for _ in range(3))
    for kind in ("epsilon", "v_prediction", "sample"):
        scheduler = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, prediction_type=kind)
        for t in (981, 501, 21):
            eps_diff = _epsilon(scheduler, a, x, t) - _epsilon(scheduler, b, x, t)
            assert torch.allclose(eps_diff.norm(), epsilon_scale(scheduler, t) * (a - b).norm(), rtol=1e-4)
