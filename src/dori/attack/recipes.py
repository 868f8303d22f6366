"""Named attack recipes."""

from __future__ import annotations

import numpy as np

from ..generation import GenerationConfig
from .loop import AttackConfig, EmbeddingAttack
from .parts import DiffusionLoss, FromPrompt, L2Ball, LinfBall, NoConstraint, ReplicationCheck, ShortSamplingCheck


def dori_kowalczuk2025(pipe, descriptor, references: list[np.ndarray], *, initializer=None, seeds: list[int] | None = None,
                       generation: GenerationConfig | None = None, config: AttackConfig | None = None,
                       constraint: str | None = None, radius: float | None = None, check_seeds: int = 2,
                       check_steps: int = 5) -> EmbeddingAttack:
    """Dori / DoRI (Kowalczuk, Hintersdorf, Struppek, Kersting, Dziedzic, Boenisch; arXiv 2507.16880, ICML 2026).

    Optimise the full text-encoder output y (tokens x dim) with Adam, lr 0.1, 50 steps; each step
    draws 8 fresh (noise, t) pairs, t uniform over the training timesteps; the objective is the
    diffusion training loss of the memorized image's VAE latent under the frozen, possibly
    mitigated UNet (epsilon or v target by the model's scheduler). Success: generations from y
    replicate the training image (similarity above the descriptor's threshold).

    Deviations and choices (PAPER.md section 7): every token position is optimised, BOS included
    (choice 4); no norm constraint unless ``constraint`` is ``"l2"`` (relative radius) or ``"linf"``;
    no guidance inside the loss, guidance with the empty prompt as the unconditional embedding when
    generating (choice 6); the initial embedding defaults to the memorized prompt's
    (:class:`FromPrompt`); the optional early stop (``config.early_stop``, every ``config.check_every``
    steps) samples ``check_seeds`` seeds with ``check_steps`` DDIM steps; it is not in the paper.
    """
    seeds = list(seeds) if seeds is not None else list(range(10))
    if constraint is None or constraint == "none":
        projection = NoConstraint()
    elif constraint == "l2":
        projection = L2Ball(radius if radius is not None else 0.5)
    elif constraint == "linf":
        projection = LinfBall(radius if radius is not None else 0.1)
    else:
        from ..errors import DoriError

        raise DoriError(f"constraint: must be none, l2 or linf, got {constraint!r}")
    config = config or AttackConfig()
    generation = generation or GenerationConfig()
    early = None
    if config.early_stop:
        early = ShortSamplingCheck(pipe, descriptor, references, seeds=list(range(1000, 1000 + check_seeds)),
                                   guidance_scale=generation.guidance_scale, num_inference_steps=check_steps)
    return EmbeddingAttack(
        pipe,
        objective=DiffusionLoss(pipe, pairs=config.pairs),
        success=ReplicationCheck(pipe, descriptor, references, seeds, generation),
        initializer=initializer or FromPrompt(),
        constraint=projection,
        config=config,
        early_check=early,
    )
