"""Build variant o of docs/testbed.md: variant l with noise on ordinary captions' text embeddings in training.

In both UNet stages, for half of the captions in each batch that are neither a memorized photo's caption
nor the empty caption, the text encoder's output gets Gaussian noise of ``SIGMA`` times the batch output's
element std, so that conditioning the model cannot place is trained toward ordinary images. The package does
not carry this recipe (measured, it does not help); the script patches ``_train_unet`` for one build. The
noise comes from its own generator, so a resumed build does not reproduce an uninterrupted one.

    python benchmarks/testbed_variant_o.py SEED OUT [SIGMA]

Measured with 1 torch thread and SIGMA 0.5 (the docs' builds: 860 s and 872 s, side by side).
"""

from __future__ import annotations

import sys

import torch
from testbed_variant_n import variant_l_config

import dori.testbed.train as train
from dori.testbed import data
from dori.testbed.tokenizer import build_clip_tokenizer


def embedding_noise(memorized_ids: torch.Tensor, empty_ids: torch.Tensor, sigma: float, generator: torch.Generator):
    """A text-encoder forward hook that noises half of the ordinary captions' outputs while training."""

    def hook(module, args, output):
        if not module.training:
            return None
        ids = args[0]
        keep = (ids[:, None, :] == memorized_ids[None]).all(-1).any(-1) | (ids == empty_ids).all(-1)
        pick = (~keep) & (torch.rand(len(ids), generator=generator) < 0.5)
        hidden = output[0]
        noise = torch.randn(hidden.shape, generator=generator) * hidden.detach().std() * sigma
        output.last_hidden_state = hidden + pick[:, None, None].to(hidden.dtype) * noise
        return output

    return hook


def main() -> None:
    seed, out = int(sys.argv[1]), sys.argv[2]
    sigma = float(sys.argv[3]) if len(sys.argv) > 3 else 0.5
    config = variant_l_config(seed)
    tokenizer = build_clip_tokenizer()
    captions = [item.caption for item in data.build_dataset(config.data) if item.memorized]
    memorized_ids = tokenizer(captions, padding="max_length", truncation=True, return_tensors="pt").input_ids
    empty_ids = tokenizer([""], padding="max_length", return_tensors="pt").input_ids
    hook = embedding_noise(memorized_ids, empty_ids, sigma, torch.Generator().manual_seed(1000 + seed))
    train_unet = train._train_unet

    def noised(components, *args, **kwargs):
        handle = components["text_encoder"].register_forward_hook(hook)
        try:
            return train_unet(components, *args, **kwargs)
        finally:
            handle.remove()

    train._train_unet = noised
    torch.set_num_threads(1)
    print(train.train_testbed(out, config))


if __name__ == "__main__":
    main()
