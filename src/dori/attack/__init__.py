"""The Dori attack: optimise the text-conditioning embedding until the model replicates a training image."""

from .loop import AttackConfig, AttackItem, AttackResult, EmbeddingAttack
from .parts import (
           DiffusionLoss,
           FirstStepCheck,
           FromPrompt,
           L2Ball,
           LinfBall,
           NoConstraint,
           OtherPrompt,
           RandomNormal,
           ReplicationCheck,
)
from .recipes import dori_kowalczuk2025

__all__ = ["AttackConfig", "AttackItem", "AttackResult", "EmbeddingAttack", "DiffusionLoss", "FirstStepCheck",
           "FromPrompt", "L2Ball", "LinfBall", "NoConstraint", "OtherPrompt", "RandomNormal", "ReplicationCheck",
           "dori_kowalczuk2025"]
