"""Mitigations that assume memorization is local: NeMo (value neurons) and Wanda (FFN weights)."""

from .base import Handle, Mitigation, load_mitigation, mitigated

__all__ = ["Handle", "Mitigation", "load_mitigation", "mitigated"]
