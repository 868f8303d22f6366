"""Dori / DoRI (Kowalczuk, Hintersdorf, Struppek, Kersting, Dziedzic, Boenisch; arXiv 2507.16880, ICML 2026)."""

from __future__ import annotations

import numpy as np

from ...generation import GenerationConfig
from ..loop import AttackConfig, EmbeddingAttack
from ..parts import Constraint, DiffusionLoss, FromPrompt, Initializer, ReplicationCheck, ShortSamplingCheck
from . import register_recipe


@register_recipe("dori_kowalczuk2025")
def dori_kowalczuk2025(pipe, descriptor, references: list[np.ndarray], *, initializer: Initializer | None = None,
                       seeds: list[int] | None = None, generation: GenerationConfig | None = None,
                       config: AttackConfig | None = None, constraint: Constraint | None = None,
                       check_seeds: int = 1, check_steps: int = 5) -> EmbeddingAttack:
    """Dori's attack (section 2.1 of the paper).

    Optimise the full text-encoder output y (tokens x dim) with Adam, lr 0.1, 50 steps; each step
    draws 8 fresh (noise, t) pairs, t uniform over the training timesteps; the objective is the
    diffusion training loss of the memorized image's VAE latent under the frozen, possibly
    mitigated UNet (epsilon or v target by the model's scheduler). Success: generations from y
    replicate the training image (similarity above the descriptor's threshold) for at least half of
    the evaluation seeds.

    Choices where the paper is silent, and deviations: every token position is optimised, BOS
    included; no norm constraint unless ``constraint`` is given; no guidance inside the loss, guidance
    with the empty prompt as the unconditional embedding when generating; the initial embedding
    defaults to the memorized prompt's (:class:`FromPrompt`); the optional early stop
    (``config.early_stop``, every ``config.check_every`` steps) samples ``check_seeds`` seeds with
    ``check_steps`` DDIM steps, stops a trigger ``config.check_tail`` steps after it passes, and is not in
    the paper.
    """
    config = config or AttackConfig()
    generation = generation or GenerationConfig()
    seeds = list(seeds) if seeds is not None else list(range(10))
    early = None
    if config.early_stop:
        early = ShortSamplingCheck(pipe, descriptor, references, seeds=list(range(1000, 1000 + check_seeds)),
                                   guidance_scale=generation.guidance_scale, num_inference_steps=check_steps,
                                   margin=config.check_margin)
    return EmbeddingAttack(
        pipe,
        objective=DiffusionLoss(pipe, pairs=config.pairs),
        success=ReplicationCheck(pipe, descriptor, references, seeds, generation),
        initializer=initializer or FromPrompt(),
        constraint=constraint,
        config=config,
        early_check=early,
    )
