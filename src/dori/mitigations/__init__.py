"""Mitigations of memorization, one module per method, found by name (:data:`MITIGATIONS`).

NeMo (value neurons) and Wanda (FFN weights) assume memorization is local; the whole-layer ablation
bounds what either can do; adversarial fine-tuning is the paper's mitigation that holds against Dori.
:mod:`dori.mitigations.base` says what a method provides, :func:`run_mitigate` fits any of them.
"""

from ..hooks import Handle
from .base import KINDS, MITIGATIONS, Mitigation, load_mitigation, mitigated, register_mitigation
from .run import MitigateConfig, MitigateResult, run_mitigate

__all__ = ["Handle", "KINDS", "MITIGATIONS", "MitigateConfig", "MitigateResult", "Mitigation", "load_mitigation",
           "mitigated", "register_mitigation", "run_mitigate"]
