"""Adversarial fine-tuning: the mitigation that holds against Dori (PAPER.md section 2.6)."""

from .config import FinetuneConfig
from .loop import FinetuneResult, adversarial_finetune, summarize_finetune
from .retain import RetainSet, load_retain_set
from .surrogates import Surrogate, make_surrogates

__all__ = ["FinetuneConfig", "FinetuneResult", "RetainSet", "Surrogate", "adversarial_finetune", "load_retain_set",
           "make_surrogates", "summarize_finetune"]
