"""Dori with the detector in mind: replicate while keeping the trigger's text-conditional noise norm low."""

from __future__ import annotations

import numpy as np

from ...generation import GenerationConfig
from ..loop import AttackConfig, EmbeddingAttack
from ..parts import Constraint, DiffusionLoss, FromPrompt, Initializer, NoiseNormPenalty, ReplicationCheck
from . import register_recipe

WEIGHT = 4.0
"""The penalty's weight (on the norm divided by the square root of the latent's size); docs/methods.md
gives the sweep it was chosen from."""


@register_recipe("dori_low_noise_norm")
def dori_low_noise_norm(pipe, descriptor, references: list[np.ndarray], *, initializer: Initializer | None = None,
                        seeds: list[int] | None = None, generation: GenerationConfig | None = None,
                        config: AttackConfig | None = None, constraint: Constraint | None = None,
                        weight: float = WEIGHT, target: float = 0.0) -> EmbeddingAttack:
    """Dori's attack (:func:`~dori.attack.recipes.dori_kowalczuk2025.dori_kowalczuk2025`: Adam, lr 0.1,
    50 steps, 8 (noise, t) pairs) with a detection-aware term: each step also evaluates the trigger's
    text-conditional noise norm at the first sampling step of a fresh initial noise (Wen et al.'s
    detection statistic, which their mitigation minimises) and adds ``weight`` times its excess over
    ``target`` (:class:`~dori.attack.parts.NoiseNormPenalty`). Not in the paper: it asks whether
    replication survives while the noise-norm detector is blind (issue 19 of this project). No early
    stop: the penalty keeps acting after the trigger replicates."""
    config = config or AttackConfig()
    generation = generation or GenerationConfig()
    seeds = list(seeds) if seeds is not None else list(range(10))
    return EmbeddingAttack(
        pipe,
        objective=NoiseNormPenalty(pipe, DiffusionLoss(pipe, pairs=config.pairs), weight=weight, target=target,
                                   steps=generation.num_inference_steps),
        success=ReplicationCheck(pipe, descriptor, references, seeds, generation),
        initializer=initializer or FromPrompt(),
        constraint=constraint,
        config=config,
    )
