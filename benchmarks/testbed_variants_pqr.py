"""Build variants p, q, r and s of docs/testbed.md: which half of version 2 makes pruned captions draw one image.

Variant l (``testbed_variant_n.variant_l_config``) changes two things at once against the shipped v1: the data
(eight VM/TM photos, emoji seen once, 1,800 shapes) and the recipe (VAE batch by kind, 2,000 UNet steps,
sparsity weight 0.5, memorized copies' captions never dropped). These builds take one half at a time:

* ``p``: the v1 recipe (``TestbedTrainConfig()``'s defaults) on v2's memorized photos without emoji, 50 copies
  each, so that its 1,400 images are v1's count and mix (400 copies, 400 crops, 600 shapes);
* ``q``: variant l without emoji (the v2 recipe and l's shapes and copies, no emoji);
* ``r``: the v1 recipe on variant l's data (1,000 emoji, 1,800 shapes);
* ``s``: p plus variant n's 48 subject-family images per memorized photo (``testbed_variant_n.with_families``):
  the memorized captions' words shared with ordinary images, at p's exposure per image.

    python benchmarks/testbed_variants_pqr.py VARIANT SEED OUT [THREADS]

Measured with 1 torch thread, two builds side by side (docs/testbed.md gives the times).
"""

from __future__ import annotations

import sys
from dataclasses import replace

import torch
from testbed_variant_n import variant_l_config, with_families

import dori.testbed.train as train
from dori.testbed import data


def variant_config(variant: str, seed: int) -> train.TestbedTrainConfig:
    """The build config of variant ``p``, ``q``, ``r`` or ``s`` for a build seed (``s``: ``p``'s; its families are
    added to the data by :func:`main`)."""
    if variant in ("p", "s"):
        return train.TestbedTrainConfig(seed=seed, data=data.TestbedDataConfig(
            emoji=0, copies_per_photo=50, template_photos=data.V2E_TEMPLATE_PHOTOS))
    if variant == "q":
        config = variant_l_config(seed)
        return replace(config, data=replace(config.data, emoji=0))
    if variant == "r":
        return train.TestbedTrainConfig(seed=seed, data=data.TestbedDataConfig(
            shapes=1800, emoji=1000, template_photos=data.V2E_TEMPLATE_PHOTOS))
    raise ValueError(f"VARIANT must be p, q, r or s, got {variant!r}")


def main() -> None:
    if len(sys.argv) not in (4, 5):
        raise SystemExit("usage: python benchmarks/testbed_variants_pqr.py VARIANT SEED OUT [THREADS]")
    variant, seed, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    config = variant_config(variant, seed)
    if variant == "s":
        train.build_dataset = with_families(data.build_dataset, 48)
    torch.set_num_threads(int(sys.argv[4]) if len(sys.argv) > 4 else 1)
    print(train.train_testbed(out, config))


if __name__ == "__main__":
    main()
