"""Mitigations that assume memorization is local: NeMo (value neurons) and Wanda (FFN weights),
and the whole-layer ablation that bounds what either can do."""

from .base import Handle, Mitigation, load_mitigation, mitigated

__all__ = ["Handle", "Mitigation", "load_mitigation", "mitigated"]
