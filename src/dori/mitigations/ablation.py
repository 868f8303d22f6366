"""Whole-layer ablation: what is left when *every* weight a pruning method could touch is gone.

``LayerAblation(("*ff.net.2",))`` scales every weight of the matched ``nn.Linear`` layers by
``factor`` (default 0: zero them; biases are kept, as Wanda keeps them). Wanda zeroes a subset of
the ``ff.net.2`` weights and NeMo a subset of the ``attn2.to_v`` output channels, so when a
memorized prompt still replicates with the whole layers ablated, the method has nothing left to
prune that could stop it. On the earlier testbed builds this is why Wanda could not remove some
photos at any budget (README, "What bounded the cut"). It is a diagnostic, not a mitigation anyone
would deploy: it removes the layers' function for every prompt.

It follows the mitigation protocol: ``apply(pipe)`` returns a handle whose ``remove()`` restores the
weights bit for bit, it composes with ``mitigated``, and it saves as a (tensor-free) safetensors
file plus JSON sidecar that ``dori evaluate --mitigation`` loads.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch

from ..errors import DoriError
from ..models import linear_layers
from .base import Handle, read_saved, write_saved


@dataclass(frozen=True)
class LayerAblation:
    """Scale every weight of the UNet linears matching ``layers`` (globs over module paths) by ``factor``."""

    layers: tuple[str, ...] = ("*ff.net.2",)
    factor: float = 0.0
    name: ClassVar[str] = "ablation"
    scope: ClassVar[str] = "set"

    def __post_init__(self) -> None:
        if isinstance(self.layers, str) or not self.layers or not all(isinstance(p, str) and p for p in self.layers):
            raise DoriError(f"layers: give one or more module-path globs such as '*ff.net.2', got {self.layers!r}")
        if not math.isfinite(self.factor):
            raise DoriError(f"factor: must be a finite number (0 zeroes the layers), got {self.factor!r}")

    def matched(self, pipe) -> dict[str, torch.nn.Linear]:
        """The layers this ablation scales on ``pipe``'s UNet (a DoriError naming the globs if none)."""
        return linear_layers(pipe.unet, self.layers)

    def apply(self, pipe, prompt: str | None = None) -> Handle:
        """Scale the matched layers' weights; the same for every prompt (``prompt`` is ignored)."""
        saved = []
        with torch.no_grad():
            for layer in self.matched(pipe).values():
                saved.append((layer.weight, layer.weight.data.clone()))
                layer.weight.data.mul_(self.factor)

        def undo() -> None:
            with torch.no_grad():
                for weight, values in saved:
                    weight.data.copy_(values)

        return Handle(undo)

    def describe(self) -> dict:
        return {"kind": "ablation", "scope": self.scope, "layers": list(self.layers), "factor": self.factor}

    def save(self, path: str | Path) -> Path:
        return write_saved(path, {}, self.describe())

    @classmethod
    def load(cls, path: str | Path) -> LayerAblation:
        meta, _ = read_saved(path)
        return cls(tuple(meta["layers"]), float(meta["factor"]))
