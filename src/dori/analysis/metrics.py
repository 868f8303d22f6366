"""Pure functions of the locality analyses: pairwise distances, activation discrepancy, IoU of sets, t-SNE.

Each takes plain tensors / arrays / sets and returns numbers, so they are tested on hand-computed cases.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch

from ..errors import DoriError


@dataclass(frozen=True)
class PairStats:
    """Summary of one value per unordered pair of set members.

    ``std`` is the standard deviation of the pairwise values (their spread, ddof 0); the pairs share
    members, so it is not the standard error of ``mean``.
    """

    mean: float
    std: float
    median: float
    n_members: int
    n_pairs: int

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def of(cls, values: np.ndarray, n_members: int) -> PairStats:
        values = np.asarray(values, dtype=np.float64)
        if values.size == 0:
            return cls(math.nan, math.nan, math.nan, n_members, 0)
        return cls(float(values.mean()), float(values.std()), float(np.median(values)), n_members, int(values.size))


def _as_points(x: torch.Tensor | np.ndarray) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x)
    if t.ndim < 1:
        raise DoriError(f"points: expected (n, ...) members, got a scalar of shape {tuple(t.shape)}")
    return t.detach().flatten(1).to(torch.float64).cpu() if t.ndim > 1 else t.detach()[:, None].to(torch.float64).cpu()


def pairwise_l2(x: torch.Tensor | np.ndarray) -> np.ndarray:
    """L2 distance of every unordered pair ``i < j`` of the members of ``x`` ``(n, ...)`` (each flattened).

    Returns ``(n * (n - 1) / 2,)`` in ``scipy.spatial.distance.pdist`` order, float64.
    """
    points = _as_points(x)
    if len(points) < 2:
        return np.zeros(0)
    return torch.pdist(points).numpy()


def discrepancy(activations: torch.Tensor | np.ndarray) -> PairStats:
    """Mean pairwise L2 distance among activation vectors ``(n, ...)`` (the paper's analysis B), with its
    spread over pairs; needs ``n >= 2``."""
    points = _as_points(activations)
    if len(points) < 2:
        raise DoriError(f"activations: the discrepancy needs at least 2 set members, got {len(points)}")
    return PairStats.of(pairwise_l2(points), len(points))


def iou(a: Iterable, b: Iterable) -> float:
    """Intersection over union of two sets; 1.0 when both are empty (the paper's convention)."""
    a, b = set(a), set(b)
    union = len(a | b)
    return 1.0 if union == 0 else len(a & b) / union


def _index_array(s) -> np.ndarray:
    if isinstance(s, torch.Tensor):
        s = s.detach().cpu().numpy()
    if isinstance(s, np.ndarray):
        if s.dtype == bool:
            return np.flatnonzero(s)
        return np.unique(s.astype(np.int64).ravel())
    return np.unique(np.fromiter((int(v) for v in s), dtype=np.int64))


def pairwise_iou(sets: Sequence) -> np.ndarray:
    """IoU of every unordered pair ``i < j`` of sets, ``(n * (n - 1) / 2,)`` in ``pdist`` order.

    A set is an iterable of non-negative integers, an integer array of indices, or a boolean mask
    (its true positions, flattened). Two empty sets have IoU 1. Computed with one sparse product, so
    sets of ~10^5 weight positions are fine.
    """
    from scipy import sparse

    arrays = [_index_array(s) for s in sets]
    n = len(arrays)
    if n < 2:
        return np.zeros(0)
    if any(a.size and a.min() < 0 for a in arrays):
        raise DoriError("sets: indices must be non-negative integers")
    width = 1 + max((int(a.max()) for a in arrays if a.size), default=0)
    rows = np.repeat(np.arange(n), [a.size for a in arrays])
    cols = np.concatenate(arrays) if any(a.size for a in arrays) else np.zeros(0, dtype=np.int64)
    m = sparse.csr_matrix((np.ones(len(cols), dtype=np.float64), (rows, cols)), shape=(n, width))
    inter = (m @ m.T).toarray()
    sizes = np.diag(inter)
    union = sizes[:, None] + sizes[None, :] - inter
    with np.errstate(invalid="ignore", divide="ignore"):
        values = np.where(union == 0, 1.0, inter / np.where(union == 0, 1, union))
    i, j = np.triu_indices(n, k=1)
    return values[i, j]


def mean_pairwise_iou(sets: Sequence) -> float:
    """Mean IoU over all unordered pairs of ``sets`` (the paper's weight agreement); needs 2 or more sets."""
    if len(sets) < 2:
        raise DoriError(f"sets: the mean pairwise IoU needs at least 2 sets, got {len(sets)}")
    return float(pairwise_iou(sets).mean())


def iou_to_reference(sets: Sequence, reference) -> np.ndarray:
    """IoU of each set with ``reference`` ``(len(sets),)`` (e.g. each trigger's selection vs the prompt's)."""
    values = pairwise_iou([reference, *sets])
    return values[: len(sets)]  # pdist order: pairs (0, 1), (0, 2), ... come first


def tsne_embed(points: torch.Tensor | np.ndarray, seed: int = 0, perplexity: float = 30.0) -> np.ndarray:
    """Two-dimensional t-SNE of ``points`` ``(n, ...)`` (flattened), deterministic for a seed.

    The perplexity is clipped to ``(n - 1) / 3`` (and at least 1) so it stays below ``n`` as
    scikit-learn requires; PCA initialisation; the exact method up to 1000 points (Barnes-Hut above).
    Returns ``(n, 2)`` float64.
    """
    from sklearn.manifold import TSNE

    x = _as_points(points).numpy()
    n = len(x)
    if n < 3:
        raise DoriError(f"points: t-SNE needs at least 3 points, got {n}")
    tsne = TSNE(n_components=2, perplexity=effective_perplexity(n, perplexity), init="pca", random_state=seed,
                method="exact" if n <= 1000 else "barnes_hut", learning_rate="auto")
    return tsne.fit_transform(x).astype(np.float64)


def effective_perplexity(n: int, perplexity: float) -> float:
    """The perplexity :func:`tsne_embed` uses for ``n`` points."""
    return float(min(perplexity, max(1.0, (n - 1) / 3)))
