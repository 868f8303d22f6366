"""A utility measure that means something on the testbed: do shape captions get the right colours?

For a caption "a {colour} {shape} on a {background} background" and a generated image, every
pixel is assigned its nearest palette colour; the background is the commonest colour of the border
pixels and the object the commonest other colour inside (at least ``min_pixels`` of it). The caption
is followed when both match. It is a simple detector, blind to the shape itself, but it needs no
weights and measures whether the model still turns words into the right picture.
"""

from __future__ import annotations

import re

import numpy as np
import torch

from .data import COLOURS

_CAPTION = re.compile(r"^a (\w+) (\w+) on a (\w+) background$")
_PALETTE = np.array(list(COLOURS.values()), dtype=np.float32) / 255.0
_NAMES = list(COLOURS)


def caption_colours(caption: str) -> tuple[str, str] | None:
    """``(object colour, background colour)`` of a shape caption, or None for other captions."""
    match = _CAPTION.match(caption.strip())
    if not match or match.group(1) not in COLOURS or match.group(3) not in COLOURS:
        return None
    return match.group(1), match.group(3)


def detect_colours(image: torch.Tensor, min_pixels: int = 12) -> tuple[str | None, str]:
    """``(object colour or None, background colour)`` of one image ``(3, H, W)`` in [0, 1]."""
    pixels = image.permute(1, 2, 0).float().cpu().numpy()
    nearest = np.argmin(((pixels[..., None, :] - _PALETTE) ** 2).sum(-1), axis=-1)
    border = np.concatenate([nearest[0], nearest[-1], nearest[:, 0], nearest[:, -1]])
    background = int(np.bincount(border, minlength=len(_NAMES)).argmax())
    inner = nearest[nearest != background]
    counts = np.bincount(inner, minlength=len(_NAMES)) if inner.size else np.zeros(len(_NAMES), int)
    obj = int(counts.argmax()) if counts.max() >= min_pixels else None
    return (_NAMES[obj] if obj is not None else None), _NAMES[background]


def shape_caption_accuracy(images: torch.Tensor, captions: list[str]) -> float:
    """Share of shape captions whose generated image shows the right object and background colours."""
    scored = [(img, caption_colours(c)) for img, c in zip(images, captions, strict=True)]
    scored = [(img, want) for img, want in scored if want is not None]
    if not scored:
        return float("nan")
    return float(np.mean([detect_colours(img) == want for img, want in scored]))
