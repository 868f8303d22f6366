"""Seeded random draws keyed by what they are for, so that results never depend on batching or on the
number of processes: the draw of work item ``k`` comes from a generator seeded by a hash of its key."""

from __future__ import annotations

import hashlib

import torch


def generator_for(text: str) -> torch.Generator:
    """A CPU generator seeded by the SHA-256 of ``text``."""
    digest = hashlib.sha256(text.encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))


def item_generator(*keys: object) -> torch.Generator:
    """A CPU generator for the work item ``keys`` (e.g. ``("dori", seed, trigger key, step)``)."""
    return generator_for(repr(keys))
