"""Shared fixtures: tiny real diffusers pipelines in the SD 1.x and SD 2.x layouts, and the shipped testbed."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
if "DORI_CACHE" not in os.environ:
    # NeMo's caches and the SD-shaped pipeline (2 GB) stay out of ~/.cache and go with the session
    os.environ["DORI_CACHE"] = tempfile.mkdtemp(prefix="dori-cache-")
    atexit.register(shutil.rmtree, os.environ["DORI_CACHE"], ignore_errors=True)

import pytest
import torch

from dori.testbed.tokenizer import build_clip_tokenizer


@pytest.fixture(scope="session")
def clip_tokenizer():
    return build_clip_tokenizer()


def tiny_components(layout: str, tokenizer):
    """Tiny random components in the layout of SD 1.x (epsilon, PNDM as SD v1.4 ships, one head size)
    or SD 2.x (v_prediction, DDIM, head-dim list, linear projections, another cross-attention width),
    after diffusers' ``get_dummy_components``."""
    from diffusers import AutoencoderKL, DDIMScheduler, PNDMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    sd2 = layout == "sd2"
    cross_dim = 48 if sd2 else 32
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=8, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D") if not sd2 else ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D") if not sd2 else ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=cross_dim, attention_head_dim=(2, 4) if sd2 else 2, use_linear_projection=sd2,
        norm_num_groups=32,
    )
    vae = AutoencoderKL(block_out_channels=(32, 64), in_channels=3, out_channels=3,
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        latent_channels=4, norm_num_groups=32, sample_size=16)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        bos_token_id=49406, eos_token_id=49407, pad_token_id=49407, hidden_size=cross_dim, intermediate_size=37,
        layer_norm_eps=1e-05, num_attention_heads=4, num_hidden_layers=2, vocab_size=49408,
        max_position_embeddings=77, projection_dim=cross_dim))
    if sd2:
        scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                                  set_alpha_to_one=False, steps_offset=1, prediction_type="v_prediction")
    else:  # SD v1.4's scheduler_config.json
        scheduler = PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                  skip_prk_steps=True, set_alpha_to_one=False, steps_offset=1)
    return dict(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler,
                safety_checker=None, feature_extractor=None, requires_safety_checker=False)


@pytest.fixture(scope="session", params=["sd1", "sd2"])
def tiny_pipeline_folder(request, tmp_path_factory, clip_tokenizer):
    from diffusers import StableDiffusionPipeline

    folder = tmp_path_factory.mktemp(f"tiny-{request.param}")
    StableDiffusionPipeline(**tiny_components(request.param, clip_tokenizer)).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def sd1_folder(tmp_path_factory, clip_tokenizer):
    from diffusers import StableDiffusionPipeline

    folder = tmp_path_factory.mktemp("tiny-sd1-only")
    StableDiffusionPipeline(**tiny_components("sd1", clip_tokenizer)).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def testbed_pipe():
    from dori.models import load_pipeline

    return load_pipeline("testbed")
