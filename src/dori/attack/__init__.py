"""The Dori attack: optimise the text-conditioning embedding until the model replicates a training image."""

from .loop import AttackConfig, AttackItem, AttackResult, EmbeddingAttack
from .parts import (
    DiffusionLoss,
    FromPrompt,
    L2Ball,
    LinfBall,
    NoConstraint,
    OtherPrompt,
    RandomNormal,
    ReplicationCheck,
    ShortSamplingCheck,
)
from .recipes import dori_kowalczuk2025

__all__ = ["AttackConfig", "AttackItem", "AttackResult", "EmbeddingAttack", "DiffusionLoss", "FromPrompt", "L2Ball",
           "LinfBall", "NoConstraint", "OtherPrompt", "RandomNormal", "ReplicationCheck", "ShortSamplingCheck",
           "dori_kowalczuk2025"]
