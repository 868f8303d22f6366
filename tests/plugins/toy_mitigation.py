"""A toy mitigation in one module, as a user or a later method would add one: registered by name, fitted
by ``dori mitigate``, applied by every verb that takes ``--mitigation``. It is of the ``inference``
kind: it scales the text conditioning the UNet sees by ``factor`` (0 removes the prompt entirely)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from dori.mitigations import register_mitigation
from dori.mitigations.base import read_saved, write_saved
from dori.mitigations.kinds import InferenceMitigation


@dataclass(frozen=True)
class ShrinkConfig:
    factor: float = 0.0

    def validate(self) -> None:
        if not 0 <= self.factor <= 1:
            from dori.errors import DoriError

            raise DoriError(f"factor: must be in [0, 1], got {self.factor}")


@register_mitigation("toy-shrink")
class ConditioningShrink(InferenceMitigation):
    """Scale the text conditioning by a factor (a toy)."""

    name = "toy-shrink"
    Config = ShrinkConfig

    def __init__(self, config: ShrinkConfig):
        self.config = config

    @classmethod
    def fit(cls, pipe, prompts, config: ShrinkConfig, *, run=None, progress=None) -> ConditioningShrink:
        return cls(config)

    def condition(self, encoder_hidden_states, timestep):
        return encoder_hidden_states * self.config.factor

    def describe(self) -> dict:
        return {**self.identity(), "config": asdict(self.config)}

    def save(self, path: str | Path) -> Path:
        return write_saved(path, {}, self.describe())

    @classmethod
    def load(cls, path: str | Path) -> ConditioningShrink:
        meta, _ = read_saved(path)
        return cls(ShrinkConfig(**meta["config"]))
