"""Stable Diffusion's shapes without its weights: pipelines built from the published component configs
with random weights, to run and time every verb at the size of the real models where the weights
cannot be downloaded (a UNet's cost does not depend on its weights).

:func:`build_sd_shaped` writes the hub folder layout (``model_index.json``, ``unet/``, ``vae/``,
``text_encoder/``, ``tokenizer/``, ``scheduler/``) once, seeded, into ``$DORI_CACHE/sd-shaped/<name>``.
The configs are those of ``CompVis/stable-diffusion-v1-4`` (UNet 860 M parameters, CLIP ViT-L/14 text
encoder 123 M, VAE 84 M, PNDM) and ``stabilityai/stable-diffusion-2-base`` (OpenCLIP ViT-H/14 text
encoder, linear projections, head dimensions per block, DDIM); the tokenizer is the CLIP BPE one
dori builds offline.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from .errors import DoriError

logger = logging.getLogger(__name__)


class SSCDStandIn(torch.nn.Module):
    """SSCD's file format and interface (TorchScript, ``(N, 3, H, W) -> (N, dim)``) with random weights:
    conv, global pooling, linear. Tests use a tiny one, the SD-size benchmark one of SSCD's 512 outputs."""

    def __init__(self, channels: int = 8, dim: int = 16, kernel: int = 3, stride: int = 2):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, channels, kernel, stride=stride)
        self.fc = torch.nn.Linear(channels, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.conv(x)).mean(dim=(2, 3)))


def write_sscd_stand_in(path: str | Path, seed: int = 0, **shape) -> Path:
    """Save an :class:`SSCDStandIn` (``shape``: its constructor's arguments) as TorchScript at ``path``."""
    torch.manual_seed(seed)
    torch.jit.script(SSCDStandIn(**shape)).save(str(path))
    return Path(path)

SD14_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32, norm_eps=1e-5, act_fn="silu",
    downsample_padding=1, flip_sin_to_cos=True, freq_shift=0, mid_block_scale_factor=1,
)
SD2_UNET = {**SD14_UNET, "cross_attention_dim": 1024, "attention_head_dim": (5, 10, 20, 20),
            "use_linear_projection": True}
VAE = dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, block_out_channels=(128, 256, 512, 512),
           down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=32,
           act_fn="silu", sample_size=512)  # scaling_factor: diffusers' default, the published config's value
CLIP_L14 = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                max_position_embeddings=77, hidden_act="quick_gelu", layer_norm_eps=1e-5, projection_dim=768,
                bos_token_id=49406, eos_token_id=49407, pad_token_id=49407)
OPENCLIP_H14 = {**CLIP_L14, "hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 23,
                "num_attention_heads": 16, "hidden_act": "gelu", "projection_dim": 512}
SCHEDULE = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                set_alpha_to_one=False, steps_offset=1)
SHAPES = {"sd14": (SD14_UNET, CLIP_L14, "PNDMScheduler", {"skip_prk_steps": True}),
          "sd2-base": (SD2_UNET, OPENCLIP_H14, "DDIMScheduler", {"clip_sample": False})}


def shaped_folder(name: str) -> Path:
    from .runs import cache_dir

    return cache_dir() / "sd-shaped" / name


def build_sd_shaped(name: str = "sd14", folder: str | Path | None = None, *, seed: int = 0,
                    dtype: torch.dtype = torch.float16, sample_size: int | None = None) -> Path:
    """The pipeline folder of ``name`` (``sd14`` or ``sd2-base``) with random weights, built once.
    ``sample_size``: the UNet's default latent size (64: 512x512 images; 32 runs every verb at
    256x256 with the same layers and weights)."""
    import diffusers
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from .testbed.tokenizer import build_clip_tokenizer

    if name not in SHAPES:
        raise DoriError(f"shape: must be one of {', '.join(SHAPES)}, got {name!r}")
    folder = Path(folder) if folder is not None else shaped_folder(name)
    done = folder / "model_index.json"
    if done.is_file() and (folder / "shape.json").is_file():
        return folder
    unet_config, text_config, scheduler_name, scheduler_extra = SHAPES[name]
    if sample_size is not None:
        unet_config = {**unet_config, "sample_size": sample_size}
    logger.info("building a %s-shaped pipeline with random weights into %s", name, folder)
    torch.manual_seed(seed)
    with torch.no_grad():
        pipe = StableDiffusionPipeline(
            unet=UNet2DConditionModel(**unet_config), vae=AutoencoderKL(**VAE),
            text_encoder=CLIPTextModel(CLIPTextConfig(**text_config)), tokenizer=build_clip_tokenizer(),
            scheduler=getattr(diffusers, scheduler_name)(**SCHEDULE, **scheduler_extra),
            safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.to(dtype).save_pretrained(folder)
    params = {k: sum(p.numel() for p in getattr(pipe, k).parameters()) for k in ("unet", "text_encoder", "vae")}
    (folder / "shape.json").write_text(json.dumps({"shape": name, "seed": seed, "parameters": params,
                                                   "sample_size": unet_config["sample_size"],
                                                   "weights": "random (the published configs, not the weights)"}, indent=1))
    return folder
