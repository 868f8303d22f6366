"""The retain set of adversarial fine-tuning: ordinary image-caption pairs for the L_DM term."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..errors import DoriError
from ..prompts import load_prompt_set

TESTBED_RETAIN = ("testbed:shape", "testbed:seen-once")


@dataclass
class RetainSet:
    captions: list[str]
    images: list[np.ndarray]

    def __len__(self) -> int:
        return len(self.captions)

    def batch(self, pipe, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(latents, caption embeddings)`` of the chosen pairs (encoded now, frozen VAE and text encoder)."""
        from ..images import stack_rgb
        from ..models import encode_images, encode_prompts

        return encode_images(pipe, stack_rgb([self.images[i] for i in indices])), \
            encode_prompts(pipe, [self.captions[i] for i in indices])


def load_retain_set(spec: str, images: str | None, model_folder: str | None) -> RetainSet:
    """``testbed:retain`` (shape and seen-once pairs of the testbed), or a prompt file + image folder."""
    if spec == "testbed:retain":
        sets = [load_prompt_set(s, model_folder=model_folder) for s in TESTBED_RETAIN]
    else:
        if images is None:
            raise DoriError(f"retain_images: the retain set {spec!r} needs a folder of <id>.png images")
        sets = [load_prompt_set(spec, references=images, model_folder=model_folder)]
    captions = [r.prompt for s in sets for r in s.records]
    pictures = [s.references[r.id] for s in sets for r in s.records]
    if not captions:
        raise DoriError(f"retain: {spec!r} holds no image-caption pairs")
    return RetainSet(captions, pictures)
