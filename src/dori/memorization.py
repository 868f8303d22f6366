"""Scoring generations for replication: SSCD_orig, SSCD_gen, gallery matches, MR, per-prompt tables.

Conventions (the paper says "fraction of samples" above 0.7; per image or per prompt is not said): MR is
counted per generated image, MR = share of
generations whose similarity to the reference is above the descriptor's threshold; SSCD_orig is
reported as mean +- std over the same generations, and per prompt as max / median / mean over seeds
(NeMo's per-prompt max convention is kept beside it).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch

from .descriptors import Descriptor
from .images import to_tensor


@dataclass
class ImageScores:
    """Per-image scores; NaN where there is nothing to compare with."""

    sscd_orig: np.ndarray
    gallery_max: np.ndarray
    gallery_match: list[str | None]


def embed_arrays(descriptor: Descriptor, images: list[np.ndarray]) -> torch.Tensor:
    """Descriptors ``(N, D)`` of uint8 images of any sizes (each size embedded as one batch)."""
    from .images import to_rgb

    tensors = [to_tensor(to_rgb(np.asarray(image))) for image in images]
    out: list[torch.Tensor | None] = [None] * len(tensors)
    for shape in dict.fromkeys(t.shape for t in tensors):
        idx = [i for i, t in enumerate(tensors) if t.shape == shape]
        for i, feat in zip(idx, descriptor.embed(torch.cat([tensors[i] for i in idx])), strict=True):
            out[i] = feat
    return torch.stack(out)


def score_images(descriptor: Descriptor, images: torch.Tensor, references: list[np.ndarray | None],
                 gallery: dict[str, np.ndarray] | None = None) -> ImageScores:
    """Similarity of each image ``(N, 3, H, W)`` to its own reference (of any size) and to the closest
    gallery image."""
    feats = descriptor.embed(images)
    n = feats.shape[0]
    orig = np.full(n, np.nan)
    have = [i for i, r in enumerate(references) if r is not None]
    if have:
        ref_feats = embed_arrays(descriptor, [references[i] for i in have])
        orig[have] = (feats[have] * ref_feats).sum(dim=1).numpy()
    gmax, gmatch = np.full(n, np.nan), [None] * n
    if gallery:
        names = list(gallery)
        sims = feats @ embed_arrays(descriptor, [gallery[k] for k in names]).T
        best = sims.max(dim=1)
        gmax = best.values.numpy().astype(float)
        gmatch = [names[j] for j in best.indices.tolist()]
    return ImageScores(orig, gmax, gmatch)


def sscd_gen(descriptor: Descriptor, images: torch.Tensor, baseline: torch.Tensor) -> np.ndarray:
    """Similarity of each mitigated image to the unmitigated image of the same (prompt, seed)."""
    return (descriptor.embed(images) * descriptor.embed(baseline)).sum(dim=1).numpy()


def memorization_rate(scores, threshold: float) -> float:
    """Share of the (non-NaN) scores above ``threshold``; NaN when there are none."""
    values = np.asarray(scores, dtype=float)
    values = values[~np.isnan(values)]
    return float((values > threshold).mean()) if values.size else math.nan


def mean_std(scores) -> tuple[float, float]:
    values = np.asarray(scores, dtype=float)
    values = values[~np.isnan(values)]
    if not values.size:
        return math.nan, math.nan
    return float(values.mean()), float(values.std())


def per_prompt_table(records: list[dict], threshold: float):
    """One row per prompt: SSCD_orig max / median / mean over seeds, MR, noise norm, gallery MR."""
    import pandas as pd

    frame = pd.DataFrame.from_records(records)
    rows = []
    for pid, part in frame.groupby("prompt_id", sort=True):
        orig = part["sscd_orig"].astype(float)
        row = {
            "prompt_id": pid,
            "prompt": part["prompt"].iloc[0],
            "group": part["group"].iloc[0],
            "n": len(part),
            "sscd_orig_max": orig.max(),
            "sscd_orig_median": orig.median(),
            "sscd_orig_mean": orig.mean(),
            "mr": memorization_rate(orig, threshold),
            "mr_gallery": memorization_rate(part["gallery_max"].astype(float), threshold),
        }
        if "noise_norm_mean" in part:
            row["noise_norm_mean"] = part["noise_norm_mean"].astype(float).mean()
        if "sscd_gen" in part:
            row["sscd_gen_median"] = part["sscd_gen"].astype(float).median()
        rows.append(row)
    return pd.DataFrame(rows)


def mr_by_kind(records: list[dict], kinds: Mapping[str, str] | None, threshold: float,
               scores_of=lambda r: [r["sscd_orig"]]) -> dict[str, float]:
    """MR per memorization kind (``VM`` / ``TM``, the paper's Section 4 split) of the records whose
    ``prompt_id`` ``kinds`` labels; empty when it labels none."""
    out: dict[str, list[float]] = {}
    for r in records:
        kind = (kinds or {}).get(r.get("prompt_id", ""))
        if kind:
            out.setdefault(kind, []).extend(scores_of(r))
    return {kind: memorization_rate(scores, threshold) for kind, scores in sorted(out.items())}


def summary_row(name: str, records: list[dict], threshold: float, field: str = "sscd_orig",
                kinds: Mapping[str, str] | None = None) -> dict:
    """``{"name", "n", "sscd_mean", "sscd_std", "mr"}`` over generations, plus ``mr_gallery`` and, where
    ``kinds`` labels the prompts, ``mr_by_kind`` and ``mr_gallery_by_kind`` (the paper's Table 1 is over
    VM prompts, so its rows compare with the ``VM`` entries)."""
    scores = [r[field] for r in records]
    mean, std = mean_std(scores)
    row = {
        "name": name,
        "n": len(records),
        "sscd_mean": mean,
        "sscd_std": std,
        "mr": memorization_rate(scores, threshold),
        "score": field,
        "mr_gallery": memorization_rate([r.get("gallery_max", math.nan) for r in records], threshold),
    }
    by_kind = mr_by_kind(records, kinds, threshold, lambda r: [r[field]])
    if by_kind:
        row["mr_by_kind"] = by_kind
        row["mr_gallery_by_kind"] = mr_by_kind(records, kinds, threshold, lambda r: [r.get("gallery_max", math.nan)])
    return row


def attack_row(name: str, records: list[dict], threshold: float, kinds: Mapping[str, str] | None = None) -> dict:
    """A Table-1 row over every generation of every trigger (``mr_by_kind`` as in :func:`summary_row`)."""
    scores = [s for r in records for s in r["scores"]]
    mean, std = mean_std(scores)
    steps = sorted({int(k) for r in records for k in r["mr_by_step"]})
    row = {"name": name, "n": len(scores), "sscd_mean": mean, "sscd_std": std,
           "mr": memorization_rate(scores, threshold), "score": "sscd_orig", "triggers": len(records),
           "mr_by_step": {s: float(np.mean([r["mr_by_step"][str(s)] for r in records])) for s in steps},
           "relative_perturbation": float(np.mean([r["relative_perturbation"] for r in records]))}
    by_kind = mr_by_kind(records, kinds, threshold, lambda r: r["scores"])
    if by_kind:
        row["mr_by_kind"] = by_kind
    return row
