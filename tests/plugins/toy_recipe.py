"""A toy attack recipe in one module: the diffusion loss with 2 (noise, t) pairs a step, inside an
L-infinity ball of radius 0.05 around the prompt's embedding. Selected with ``dori attack --recipe toy_linf``."""

from __future__ import annotations

from dori.attack import (
    AttackConfig,
    DiffusionLoss,
    EmbeddingAttack,
    FromPrompt,
    LinfBall,
    ReplicationCheck,
    register_recipe,
)

RADIUS = 0.05
PAIRS = 2


@register_recipe("toy_linf")
def toy_linf(pipe, descriptor, references, *, initializer=None, seeds=None, generation=None, config=None,
             constraint=None) -> EmbeddingAttack:
    """A toy: 2 pairs a step, an L-inf ball of radius 0.05 (the caller's constraint is ignored)."""
    config = config or AttackConfig()
    return EmbeddingAttack(pipe, objective=DiffusionLoss(pipe, pairs=PAIRS),
                           success=ReplicationCheck(pipe, descriptor, references, seeds or [0], generation),
                           initializer=initializer or FromPrompt(), constraint=LinfBall(RADIUS), config=config)
