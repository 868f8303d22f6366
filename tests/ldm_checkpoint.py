"""Write a diffusers Stable Diffusion pipeline as one checkpoint in the original (LDM) layout, as users
download them (``v1-5-pruned-emaonly.safetensors``), to test single-file loading. The key layout
follows the original model's module names, for any number of blocks and layers per block (SD 1.x
text encoder; the SD 2.x OpenCLIP layout is not written)."""

from __future__ import annotations

from pathlib import Path

import torch

RESNET = (("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("norm2", "out_layers.0"), ("conv2", "out_layers.3"),
          ("time_emb_proj", "emb_layers.1"), ("conv_shortcut", "skip_connection"))


def _rename(key: str, pairs) -> str:
    for old, new in pairs:
        key = key.replace(old, new)
    return key


def unet_to_ldm(unet) -> dict[str, torch.Tensor]:
    config = unet.config
    layers, blocks = config.layers_per_block, len(config.block_out_channels)
    prefixes = [("time_embedding.linear_1.", "time_embed.0."), ("time_embedding.linear_2.", "time_embed.2."),
                ("conv_in.", "input_blocks.0.0."), ("conv_norm_out.", "out.0."), ("conv_out.", "out.2.")]
    for i in range(blocks):
        for j in range(layers):
            prefixes.append((f"down_blocks.{i}.resnets.{j}.", f"input_blocks.{i * (layers + 1) + j + 1}.0."))
            prefixes.append((f"down_blocks.{i}.attentions.{j}.", f"input_blocks.{i * (layers + 1) + j + 1}.1."))
        prefixes.append((f"down_blocks.{i}.downsamplers.0.conv.", f"input_blocks.{(i + 1) * (layers + 1)}.0.op."))
        has_attention = "CrossAttn" in config.up_block_types[i]
        for j in range(layers + 1):
            prefixes.append((f"up_blocks.{i}.resnets.{j}.", f"output_blocks.{i * (layers + 1) + j}.0."))
            prefixes.append((f"up_blocks.{i}.attentions.{j}.", f"output_blocks.{i * (layers + 1) + j}.1."))
        prefixes.append((f"up_blocks.{i}.upsamplers.0.",
                         f"output_blocks.{i * (layers + 1) + layers}.{2 if has_attention else 1}."))
    prefixes += [("mid_block.resnets.0.", "middle_block.0."), ("mid_block.attentions.0.", "middle_block.1."),
                 ("mid_block.resnets.1.", "middle_block.2.")]
    out = {}
    for key, value in unet.state_dict().items():
        new = next((n + key[len(o):] for o, n in prefixes if key.startswith(o)), key)
        if "resnets" in key:
            new = _rename(new, RESNET)
        out[f"model.diffusion_model.{new}"] = value
    return out


def vae_to_ldm(vae) -> dict[str, torch.Tensor]:
    n = len(vae.config.block_out_channels)
    pairs = [("conv_shortcut", "nin_shortcut"), ("conv_norm_out", "norm_out")]
    for i in range(n):
        pairs += [(f"encoder.down_blocks.{i}.resnets.", f"encoder.down.{i}.block."),
                  (f"encoder.down_blocks.{i}.downsamplers.0.", f"encoder.down.{i}.downsample."),
                  (f"decoder.up_blocks.{i}.resnets.", f"decoder.up.{n - 1 - i}.block."),
                  (f"decoder.up_blocks.{i}.upsamplers.0.", f"decoder.up.{n - 1 - i}.upsample.")]
    pairs += [("mid_block.resnets.0.", "mid.block_1."), ("mid_block.resnets.1.", "mid.block_2."),
              ("mid_block.attentions.0.", "mid.attn_1.")]
    attention = [("group_norm.", "norm."), ("to_q.", "q."), ("to_k.", "k."), ("to_v.", "v."), ("to_out.0.", "proj_out.")]
    out = {}
    for key, value in vae.state_dict().items():
        new = _rename(key, pairs)
        if "mid.attn_1." in new:
            new = _rename(new, attention)
            if new.endswith(("q.weight", "k.weight", "v.weight", "proj_out.weight")):
                value = value.reshape(*value.shape, 1, 1)
        out[f"first_stage_model.{new}"] = value
    return out


def write_ldm_checkpoint(pipe, path: Path) -> Path:
    from safetensors.torch import save_file

    tensors = {**unet_to_ldm(pipe.unet), **vae_to_ldm(pipe.vae)}
    # the original checkpoints hold the whole CLIPTextModel: keys under text_model. (transformers >= 5.6 drops it)
    text = {k if k.startswith("text_model.") else f"text_model.{k}": v for k, v in pipe.text_encoder.state_dict().items()}
    tensors.update({f"cond_stage_model.transformer.{k}": v for k, v in text.items()})
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    return path
