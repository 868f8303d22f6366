"""Adversarial fine-tuning: the mitigation that holds against Dori (the paper's section 2.6)."""

from .config import FinetuneConfig
from .retain import RetainSet, load_retain_set
from .surrogates import Surrogate, make_surrogates
from .trainer import FinetuneResult, adversarial_finetune, summarize_finetune

__all__ = ["FinetuneConfig", "FinetuneResult", "RetainSet", "Surrogate", "adversarial_finetune", "load_retain_set",
           "make_surrogates", "summarize_finetune"]
