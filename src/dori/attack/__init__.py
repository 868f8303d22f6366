"""The Dori attack: optimise the text-conditioning embedding until the model replicates a training image."""

from .loop import AttackConfig, AttackItem, AttackResult, EmbeddingAttack
from .parts import (
    CheckOutcome,
    Constraint,
    DiffusionLoss,
    EarlyCheck,
    FromPrompt,
    Initializer,
    L2Ball,
    LinfBall,
    NoConstraint,
    Objective,
    OtherPrompt,
    RandomNormal,
    ReplicationCheck,
    ShortSamplingCheck,
    SuccessCheck,
    make_constraint,
)
from .recipes import RECIPES, build_attack, register_recipe
from .recipes.dori_kowalczuk2025 import dori_kowalczuk2025

__all__ = ["AttackConfig", "AttackItem", "AttackResult", "CheckOutcome", "Constraint", "DiffusionLoss", "EarlyCheck",
           "EmbeddingAttack", "FromPrompt", "Initializer", "L2Ball", "LinfBall", "NoConstraint", "Objective",
           "OtherPrompt", "RECIPES", "RandomNormal", "ReplicationCheck", "ShortSamplingCheck", "SuccessCheck",
           "build_attack", "dori_kowalczuk2025", "make_constraint", "register_recipe"]
