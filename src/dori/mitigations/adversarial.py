"""Adversarial fine-tuning (Kowalczuk et al. 2025, section 2.6) as a ``weights`` mitigation.

Fitting runs :func:`dori.finetune.adversarial_finetune` on a copy of the UNet's weights (into
``<run>/finetune``, resumable) and keeps the tensors that changed; ``apply`` swaps them into any
pipeline of the same architecture and ``remove`` restores the original weights bit for bit. The
settings are :class:`dori.finetune.FinetuneConfig`'s.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from ..config_files import to_dict
from ..finetune import FinetuneConfig, adversarial_finetune
from ..models import pipeline_location
from ..progress import Progress
from .base import register_mitigation
from .kinds import WeightsMitigation, snapshot


@register_mitigation("adversarial-ft")
class AdversarialFinetune(WeightsMitigation):
    """The UNet weights adversarial fine-tuning changed."""

    name = "adversarial-ft"
    Config = FinetuneConfig
    distributed_fit = True
    """The fine-tuning shares each step among the processes itself (accelerate)."""

    @classmethod
    def fit(cls, pipe, prompts, config: FinetuneConfig | None = None, *, run=None,
            progress: Progress | None = None) -> AdversarialFinetune:
        """Fine-tune against Dori for the memorized ``prompts`` (a :class:`~dori.prompts.PromptSet` with
        their training images) and keep the changed weights; ``pipe`` itself is left as it was."""
        config = config or FinetuneConfig()
        before = snapshot(pipe)
        unet, location = pipe.unet, pipeline_location(pipe)
        with tempfile.TemporaryDirectory(prefix="dori-adv-ft-") as scratch:
            out = run.path / "finetune" if run is not None else Path(scratch) / "finetune"
            result = adversarial_finetune(pipe, prompts, config, out, progress=progress)
            fitted = cls.from_difference(before, pipe, {"config": to_dict(config), "prompts": prompts.name,
                                                        "ids": [r.id for r in prompts.records],
                                                        "steps": result.summary["steps"],
                                                        "unet_evaluations": result.summary["unet_evaluations"],
                                                        "pipeline": str(result.pipeline) if run and result.pipeline
                                                        else None})
        pipe.unet = unet  # the same module object, trained: put the original weights back
        pipe.unet.load_state_dict({k.removeprefix("unet."): v for k, v in before.items()})
        pipe.register_to_config(_name_or_path=location)
        return fitted

    def summary(self) -> dict:
        return {"tensors": len(self.tensors), "parameters": int(sum(v.numel() for v in self.tensors.values())),
                "steps": self.meta.get("steps"), "unet_evaluations": self.meta.get("unet_evaluations"),
                "pipeline": self.meta.get("pipeline")}
