"""Whole-layer ablation: what is left when *every* weight a pruning method could touch is gone.

``LayerAblation(AblationConfig(("*ff.net.2",)))`` scales every weight of the matched ``nn.Linear``
layers by ``factor`` (default 0: zero them; biases are kept, as Wanda keeps them). Wanda zeroes a
subset of the ``ff.net.2`` weights and NeMo a subset of the ``attn2.to_v`` output channels, so when a
memorized prompt still replicates with the whole layers ablated, the method has nothing left to prune
that could stop it (docs/testbed.md shows how this bounded both methods on earlier testbed builds).
It is a diagnostic, not a mitigation anyone would deploy: it removes the layers' function for every
prompt. It needs no prompts to fit.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..config_files import from_dict
from ..errors import DoriError
from ..hooks import Handle
from ..models import linear_layers
from ..progress import Progress
from .base import MitigationBase, handle_for, read_saved, register_mitigation, write_saved


@dataclass(frozen=True)
class AblationConfig:
    """Scale every weight of the UNet linears matching ``layers`` (globs over module paths) by ``factor``."""

    layers: tuple[str, ...] = ("*ff.net.2",)
    factor: float = 0.0

    def validate(self) -> None:
        if isinstance(self.layers, str) or not self.layers or not all(isinstance(p, str) and p for p in self.layers):
            raise DoriError(f"layers: give one or more module-path globs such as '*ff.net.2', got {self.layers!r}")
        if not math.isfinite(self.factor):
            raise DoriError(f"factor: must be a finite number (0 zeroes the layers), got {self.factor!r}")

    def to_dict(self) -> dict:
        return asdict(self)


@register_mitigation("ablation")
class LayerAblation(MitigationBase):
    """Scale the matched layers' weights by ``config.factor`` for every prompt."""

    name = "ablation"
    kind = "hook"
    scope = "set"
    bakeable = True
    Config = AblationConfig
    needs_prompts = False

    def __init__(self, config: AblationConfig | None = None):
        self.config = config or AblationConfig()
        self.config.validate()

    @classmethod
    def fit(cls, pipe, prompts=None, config: AblationConfig | None = None, *, run=None,
            progress: Progress | None = None) -> LayerAblation:
        """Nothing to learn: checks that the layers exist on ``pipe``."""
        ablation = cls(config)
        ablation.matched(pipe)
        return ablation.stamp(pipe)

    @classmethod
    def check(cls, pipe, config: AblationConfig) -> None:
        linear_layers(pipe.unet, config.layers)

    def depends_on(self, pipe) -> dict[str, torch.nn.Module]:
        """Nothing but the architecture: scaling layers means the same on any weights."""
        return {}

    def validate_for(self, pipe) -> None:
        self.matched(pipe)

    def matched(self, pipe) -> dict[str, torch.nn.Linear]:
        """The layers this ablation scales on ``pipe``'s UNet (a DoriError naming the globs if none)."""
        return linear_layers(pipe.unet, self.config.layers)

    def apply(self, pipe, prompt: str | None = None) -> Handle:
        """Scale the matched layers' weights; the same for every prompt (``prompt`` is ignored)."""
        layers = self.matched(pipe)
        handle = handle_for(pipe.unet, self)
        with torch.no_grad():
            for name, layer in layers.items():
                values = layer.weight.data.clone()
                layer.weight.data.mul_(self.config.factor)
                handle.edit(name, lambda weight=layer.weight, values=values: weight.data.copy_(values))
        return handle

    def summary(self) -> dict:
        return {"layers": self.config.layers, "factor": self.config.factor}

    def describe(self) -> dict:
        return {**self.identity(), "config": self.config.to_dict()}

    def save(self, path: str | Path) -> Path:
        return write_saved(path, {}, self.describe())

    @classmethod
    def load(cls, path: str | Path) -> LayerAblation:
        meta, _ = read_saved(path)
        data = meta.get("config") or {"layers": meta["layers"], "factor": meta["factor"]}  # format 1: top level
        return cls(from_dict(AblationConfig, data, "ablation"))
