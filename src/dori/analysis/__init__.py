"""The paper's three locality analyses (its sections 2.2-2.4): is memorization local?

* A, :func:`run_scatter`: Dori triggers of one image from N(0, I) starts, t-SNE, pairwise distances.
* B, :func:`run_activations`: activation discrepancy of one image's triggers vs different memorized
  prompts in the layers where NeMo and Wanda act.
* C, :func:`run_weights`: IoU of the weights NeMo and Wanda select per embedding.

The pure metrics (:func:`pairwise_l2`, :func:`discrepancy`, :func:`iou`, :func:`mean_pairwise_iou`,
:func:`tsne_embed`) live in :mod:`dori.analysis.metrics`.
"""

from .activations import ActivationsConfig, run_activations
from .metrics import (
           PairStats,
           discrepancy,
           iou,
           iou_to_reference,
           mean_pairwise_iou,
           pairwise_iou,
           pairwise_l2,
           tsne_embed,
)
from .scatter import ScatterConfig, run_scatter
from .triggers import TriggerSet, load_trigger_set
from .weights import WeightsConfig, run_weights

__all__ = ["ActivationsConfig", "PairStats", "ScatterConfig", "TriggerSet", "WeightsConfig", "discrepancy", "iou",
           "iou_to_reference", "load_trigger_set", "mean_pairwise_iou", "pairwise_iou", "pairwise_l2",
           "run_activations", "run_scatter", "run_weights", "tsne_embed"]
