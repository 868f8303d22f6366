"""Adversarial fine-tuning (Kowalczuk et al. 2025, section 2.6) as a ``weights`` mitigation.

Fitting runs :func:`dori.finetune.adversarial_finetune` on a copy of the UNet's weights (into
``<run>/finetune``, resumable) and keeps the tensors that changed; ``apply`` swaps them into any
pipeline of the same architecture and ``remove`` restores the original weights bit for bit. The
settings are :class:`dori.finetune.FinetuneConfig`'s.
"""

from __future__ import annotations

from pathlib import Path

from ..config_files import to_dict
from ..finetune import FinetuneConfig, adversarial_finetune
from ..progress import Progress
from .base import register_mitigation
from .kinds import WeightsMitigation, fit_by_training


@register_mitigation("adversarial-ft")
class AdversarialFinetune(WeightsMitigation):
    """The UNet weights adversarial fine-tuning changed."""

    name = "adversarial-ft"
    Config = FinetuneConfig
    distributed_fit = True
    """The fine-tuning shares each step among the processes itself (accelerate)."""
    summary_keys = ("steps", "unet_evaluations", "pipeline")

    @classmethod
    def check(cls, pipe, config: FinetuneConfig) -> None:
        """The retain pairs and the copy descriptor, read before the run folder exists."""
        from ..finetune.retain import check_retain, check_retain_folder
        from ..models import testbed_folder

        check_retain(config.retain, config.retain_images, config.retain_generate, testbed_folder(pipe))
        if config.retain is not None and Path(config.retain).is_dir():
            check_retain_folder(config.retain)
        config.descriptor.build(pipe)

    @classmethod
    def fit(cls, pipe, prompts, config: FinetuneConfig | None = None, *, run=None,
            progress: Progress | None = None) -> AdversarialFinetune:
        """Fine-tune against Dori for the memorized ``prompts`` (a :class:`~dori.prompts.PromptSet` with
        their training images) and keep the changed weights; ``pipe`` itself is left as it was."""
        config = config or FinetuneConfig()

        def train(out: Path) -> dict:
            result = adversarial_finetune(pipe, prompts, config, out, progress=progress)
            return {"config": to_dict(config), "prompts": prompts.name, "ids": [r.id for r in prompts.records],
                    "steps": result.summary["steps"], "unet_evaluations": result.summary["unet_evaluations"],
                    "pipeline": str(result.pipeline) if result.pipeline else None}

        return fit_by_training(cls, pipe, run, "finetune", train)
