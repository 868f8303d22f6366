"""Images the model generates that do *not* replicate a memorized image, for the unlearning baselines
that train on them: Concept Ablation's anchor images (generations of paraphrases of the memorized
caption) and SISS's keep set (non-replicating generations of the caption, or of its paraphrases when
the caption replicates every time).

Both official codes score a generation with SSCD against the memorized image: Concept Ablation keeps
images at or below 0.5 (``filter`` in ``utils.py``) and scores a paraphrase by the share of its 10
generations above it. Here the copy descriptor is the one every other dori verb uses, and when the
prompt set has a gallery (the testbed's memorized photos) an image must stay below the threshold
against every gallery image too, so that no kept image copies another memorized image.

Every image is written as a PNG with one row in ``images.jsonl`` (caption, seed, similarity, kept),
so an interrupted preparation resumes and training reads exactly what was kept (8-bit, as the
official codes read their saved images).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import DoriError
from ..generation import GenerationConfig, generate
from ..images import load_image, save_png
from ..memorization import score_images
from ..progress import Progress
from ..runs import json_text, read_jsonl

logger = logging.getLogger(__name__)

INDEX = "images.jsonl"


@dataclass(frozen=True)
class GeneratedImage:
    path: Path
    caption: str
    seed: int
    similarity: float
    """Highest similarity to the memorized image (and to any gallery image)."""


def _scores(descriptor, images: torch.Tensor, reference: np.ndarray, gallery: dict[str, np.ndarray] | None) -> np.ndarray:
    scored = score_images(descriptor, images, [reference] * len(images), gallery or None)
    own = scored.sscd_orig
    return np.fmax(own, scored.gallery_max) if gallery else own


def replication_shares(pipe, prompts: list[str], reference: np.ndarray, descriptor, *, threshold: float,
                       seeds: list[int], generation: GenerationConfig,
                       gallery: dict[str, np.ndarray] | None = None) -> dict[str, float]:
    """Per prompt, the share of its generations (one per seed) whose similarity exceeds ``threshold``
    (Concept Ablation's paraphrase score); all prompts' generations run in shared batches."""
    images = generate(pipe, seeds * len(prompts), [p for p in prompts for _ in seeds], config=generation).images
    copies = (_scores(descriptor, images, reference, gallery) > threshold).reshape(len(prompts), len(seeds))
    return {p: float(row.mean()) for p, row in zip(prompts, copies, strict=True)}


def non_replicating_images(pipe, prompts: list[str], count: int, reference: np.ndarray, descriptor, folder: Path, *,
                           threshold: float, seed: int, generation: GenerationConfig,
                           gallery: dict[str, np.ndarray] | None = None, stage: str = "generating",
                           progress: Progress | None = None) -> list[GeneratedImage]:
    """Generate ``count`` images, prompt ``k mod len(prompts)`` with seed ``seed + k``, into ``folder``
    and return those whose similarity is at most ``threshold``. Resumes from ``folder``'s index."""
    if not prompts:
        raise DoriError("prompts: no caption to generate images from")
    folder.mkdir(parents=True, exist_ok=True)
    index = folder / INDEX
    rows = read_jsonl(index) if index.exists() else []
    rows = rows[: count]
    index.write_text("".join(json_text(r) + "\n" for r in rows))
    batch = max(1, generation.batch_size)
    while len(rows) < count:
        ks = list(range(len(rows), min(count, len(rows) + batch)))
        captions = [prompts[k % len(prompts)] for k in ks]
        images = generate(pipe, [seed + k for k in ks], captions, config=generation).images
        scores = _scores(descriptor, images, reference, gallery)
        new = []
        for k, caption, image, score in zip(ks, captions, images, scores, strict=True):
            save_png(image, folder / f"{k:05d}.png")
            new.append({"k": k, "file": f"{k:05d}.png", "caption": caption, "seed": seed + k,
                        "similarity": float(score), "kept": bool(score <= threshold)})
        with open(index, "a") as f:
            f.write("".join(json_text(r) + "\n" for r in new))
        rows += new
        if progress:
            progress(stage, len(rows), count)
    kept = [GeneratedImage(folder / r["file"], r["caption"], r["seed"], r["similarity"]) for r in rows if r["kept"]]
    logger.info("%s: kept %d of %d generations at similarity <= %.3f", folder.name, len(kept), count, threshold)
    return kept


def load_generated(images: list[GeneratedImage]) -> list[np.ndarray]:
    """The kept images as uint8 arrays, read back from their PNGs."""
    return [load_image(image.path) for image in images]
