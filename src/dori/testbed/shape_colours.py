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


OUTCOMES: tuple[str, ...] = ("right", "background_wrong", "object_missing", "object_wrong")
"""What :func:`colour_outcome` calls one generation of a shape caption: both colours right; the background
wrong; the background right and no object (no other colour covers ``min_pixels``); the background right and
the object in a wrong colour."""


def colour_outcome(image: torch.Tensor, caption: str) -> tuple[str, str | None] | None:
    """``(outcome, colour drawn)`` of one generation of a shape caption (None for other captions): the
    outcome one of :data:`OUTCOMES`, the colour the wrong part was drawn in (the background's for
    ``background_wrong``, the object's for ``object_wrong``, else None)."""
    want = caption_colours(caption)
    if want is None:
        return None
    obj, background = detect_colours(image)
    if background != want[1]:
        return "background_wrong", background
    if obj is None:
        return "object_missing", None
    return ("right", None) if obj == want[0] else ("object_wrong", obj)


def colour_failures(images: torch.Tensor, captions: list[str]) -> dict:
    """How the generations of shape captions miss their colours: the share of each of :data:`OUTCOMES`
    (they sum to 1; ``right`` is :func:`shape_caption_accuracy`) and ``confusions``, how often each wanted
    colour was drawn as another (``"wanted>drawn"`` of the object or, prefixed ``background:``, of the
    background)."""
    shares = dict.fromkeys(OUTCOMES, 0)
    confusions: dict[str, int] = {}
    n = 0
    for image, caption in zip(images, captions, strict=True):
        outcome = colour_outcome(image, caption)
        if outcome is None:
            continue
        n += 1
        kind, drawn = outcome
        shares[kind] += 1
        if drawn is not None:
            obj, background = caption_colours(caption)
            key = f"{obj}>{drawn}" if kind == "object_wrong" else f"background:{background}>{drawn}"
            confusions[key] = confusions.get(key, 0) + 1
    if not n:
        return {**dict.fromkeys(OUTCOMES, float("nan")), "confusions": {}}
    return {**{k: v / n for k, v in shares.items()}, "confusions": dict(sorted(confusions.items()))}


def shape_caption_accuracy(images: torch.Tensor, captions: list[str]) -> float:
    """Share of shape captions whose generated image shows the right object and background colours (NaN
    without shape captions): the ``right`` share of :func:`colour_failures`."""
    return colour_failures(images, captions)["right"]
