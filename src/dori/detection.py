"""Memorization detectors scored on captions and on raw embeddings (attack triggers), and how well they
separate two groups: ROC AUC and TPR at a fixed false-positive rate.

Two detectors:

* **noise norm** (Wen et al., ICLR 2024, section 4.1): ``||eps(x_T, y) - eps(x_T, "")||_2`` at the first
  sampling step, averaged over seeds (their code averages over the 4 generations of a prompt; they report
  it at the first step as well as over all steps). Higher: memorized.
* **NeMo's test** (Hintersdorf et al., NeurIPS 2024): the mean pairwise SSIM of the noise differences
  ``eps(x_T, y) - x_T`` of NeMo's seeds at its detection step (:func:`dori.mitigations.nemo.noise_differences`).
  Higher: memorized (NeMo flags a prompt above its calibrated threshold, 0.428 on SD v1.4).

Under attack, the question is whether a Dori trigger, which replicates, is flagged like the memorized
caption it re-triggers, and whether a detection-aware trigger
(:func:`~dori.attack.recipes.dori_low_noise_norm.dori_low_noise_norm`) escapes.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch

from .errors import DoriError
from .generation import FirstStep, text_noise_norm

DETECTORS = ("noise-norm", "nemo")


def roc_auc(positive, negative) -> float:
    """The probability that a positive scores above a negative (ties count half): ROC AUC."""
    pos, neg = np.asarray(positive, float).ravel(), np.asarray(negative, float).ravel()
    if not len(pos) or not len(neg):
        raise DoriError("roc_auc: needs at least one positive and one negative score")
    greater = (pos[:, None] > neg[None, :]).mean()
    ties = (pos[:, None] == neg[None, :]).mean()
    return float(greater + 0.5 * ties)


def tpr_at_fpr(positive, negative, fpr: float = 0.01) -> float:
    """The share of positives flagged at the threshold that flags at most ``fpr`` of the negatives (a score
    flags when it is above the threshold). With fewer than ``1 / fpr`` negatives that threshold is the
    highest negative score."""
    pos, neg = np.asarray(positive, float).ravel(), np.sort(np.asarray(negative, float).ravel())[::-1]
    if not len(pos) or not len(neg):
        raise DoriError("tpr_at_fpr: needs at least one positive and one negative score")
    if not 0 <= fpr < 1:
        raise DoriError(f"fpr: must be in [0, 1), got {fpr}")
    threshold = neg[min(int(np.floor(fpr * len(neg))), len(neg) - 1)]
    return float((pos > threshold).mean())


@torch.no_grad()
def noise_norm_scores(pipe, embeddings: torch.Tensor, seeds: list[int], steps: int = 25,
                      batch_size: int = 32) -> torch.Tensor:
    """Wen et al.'s statistic ``(N,)``: the text-conditional noise norm of each embedding ``(N, tokens, dim)``
    at the first step of a ``steps``-step schedule of the pipeline's scheduler, averaged over ``seeds``
    (the seeds' initial latents as the pipeline draws them)."""
    from .mitigations.sampling_calls import empty_embedding
    from .models import initial_latents

    if not seeds:
        raise DoriError("seeds: the noise-norm detector needs at least one seed")
    step = FirstStep.of(pipe, steps)
    latents = step.model_input(initial_latents(pipe, seeds))
    empty = empty_embedding(pipe)
    rows = [(i, s) for i in range(len(embeddings)) for s in range(len(seeds))]
    out = torch.zeros(len(embeddings), len(seeds))
    for start in range(0, len(rows), batch_size):
        part = rows[start : start + batch_size]
        y = embeddings[[i for i, _ in part]].to(pipe.unet.device)
        norms = text_noise_norm(pipe.unet, latents[[s for _, s in part]], step, empty, y).cpu()
        for (i, s), v in zip(part, norms.tolist(), strict=True):
            out[i, s] = v
    return out.mean(1)


@torch.no_grad()
def nemo_scores(pipe, embeddings: torch.Tensor, config=None) -> torch.Tensor:
    """NeMo's memorization statistic ``(N,)``: mean pairwise SSIM of the noise differences of NeMo's seeds
    (``config``: a :class:`~dori.mitigations.nemo.NeMoConfig`, default NeMo's settings)."""
    from .mitigations.nemo import NeMoConfig, detection_step, noise_differences, pairwise_ssim
    from .mitigations.sampling_calls import empty_embedding

    config = config or NeMoConfig()
    latents = config.latents(pipe)
    step = detection_step(pipe, config, latents.device)
    empty = empty_embedding(pipe)
    values = [pairwise_ssim(noise_differences(pipe, y[None].to(pipe.unet.dtype), latents, config, uncond=empty,
                                              step=step), config).mean() for y in embeddings]
    return torch.stack(values).float().cpu() if values else torch.zeros(0)


def detector_scores(name: str, pipe, embeddings: torch.Tensor, seeds: list[int]) -> torch.Tensor:
    """The scores of detector ``name`` (one of :data:`DETECTORS`) for ``embeddings``."""
    if name == "noise-norm":
        return noise_norm_scores(pipe, embeddings, seeds)
    if name == "nemo":
        return nemo_scores(pipe, embeddings)
    raise DoriError(f"detector: must be one of {', '.join(DETECTORS)}, got {name!r}")


@dataclass(frozen=True)
class Separation:
    """How a detector separates ``positives`` from ``negatives`` (group names, counts, AUC, TPR@FPR)."""

    detector: str
    positives: str
    negatives: str
    n_positive: int
    n_negative: int
    auc: float
    tpr_at_1pct_fpr: float
    positive_median: float
    negative_median: float

    def to_dict(self) -> dict:
        return asdict(self)


def separation(detector: str, positives: str, pos_scores, negatives: str, neg_scores) -> Separation:
    pos, neg = np.asarray(pos_scores, float), np.asarray(neg_scores, float)
    return Separation(detector, positives, negatives, len(pos), len(neg), roc_auc(pos, neg), tpr_at_fpr(pos, neg, 0.01),
                      float(np.median(pos)), float(np.median(neg)))
