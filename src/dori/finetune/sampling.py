"""Which memorized prompts adversarial fine-tuning attacks at each step.

With ``sample_by="prompt"`` (the default) every prompt is an item of its own: each epoch passes over the
prompts in a seeded order, ``images_per_step`` at a time, and an image that several captions reach
(template memorization, Webster's TM) gets a share of the attacks per caption. With ``sample_by="image"``
the items are the training images: an image reached from several captions gets one image's share, through
its captions in turn. Where every prompt has an image of its own the two give the same batches;
docs/testbed.md compares them on v2 testbed builds.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence

import numpy as np
import torch

from ..seeding import item_generator


def image_groups(references: Sequence[np.ndarray], sample_by: str = "image") -> list[list[int]]:
    """The prompts' indices grouped by training image (the same pixels), groups in order of first
    appearance; ``sample_by="prompt"``: one group per prompt."""
    if sample_by == "prompt":
        return [[i] for i in range(len(references))]
    groups: dict[str, list[int]] = {}
    for i, image in enumerate(references):
        image = np.ascontiguousarray(image)
        key = hashlib.sha1(repr((image.shape, image.dtype.str)).encode() + image.tobytes()).hexdigest()
        groups.setdefault(key, []).append(i)
    return list(groups.values())


def step_batch(groups: list[list[int]], step: int, per_epoch: int, images_per_step: int, seed: int) -> list[int]:
    """The prompt indices attacked at ``step`` (from 1): the groups in a seeded order per epoch,
    ``images_per_step`` at a time (wrapping within the epoch), each group's prompts in turn over its visits."""
    n, k = len(groups), min(images_per_step, len(groups))
    epoch, within = divmod(step - 1, per_epoch)
    order = torch.randperm(n, generator=item_generator("ft-order", seed, epoch)).tolist()
    passes = math.ceil(per_epoch * k / n)  # passes over the groups per epoch
    batch = []
    for j in range(k):
        group = groups[order[(within * images_per_step + j) % n]]
        visit = epoch * passes + (within * k + j) // n  # this group's visits before, within a pass
        batch.append(group[visit % len(group)])
    return batch
