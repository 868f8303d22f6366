"""Which model a saved artefact belongs to, so that a mitigation fitted on one model is never applied to
another: its architecture (the names and shapes of every UNet and text-encoder tensor) and a probe of
the weights the artefact depends on (values at fixed positions).

The probe is compared with a tolerance, not hashed, so that the same model loaded in another dtype
(fitted in float32, applied in bfloat16) still matches; a model whose weights differ (another
checkpoint, a fine-tuned copy) does not.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable

import torch

PROBE_TENSORS = 64
"""Tensors probed (spread evenly over the sorted tensor names of the depended-on modules)."""
PROBE_VALUES = 8
"""Values probed per tensor (spread evenly over its elements)."""
RTOL, ATOL = 2e-2, 1e-6
"""A probed value matches within this tolerance: bfloat16 keeps 8 bits of mantissa (relative 0.4%)."""
MAX_DIFFERENT = 0.05
"""Share of probed values that may differ: a model with a few weights zeroed (a baked pruning) still
matches, a fine-tuned or another model does not."""


def architecture(pipe) -> str:
    """16 hex digits of the SHA-256 of the names and shapes of the UNet's and the text encoder's tensors."""
    h = hashlib.sha256()
    for component in ("unet", "text_encoder"):
        module = getattr(pipe, component, None)
        if module is not None:
            for name, tensor in module.state_dict().items():
                h.update(f"{component}.{name}:{tuple(tensor.shape)};".encode())
    return h.hexdigest()[:16]


def _probe(modules: dict[str, torch.nn.Module]) -> dict[str, list[float]]:
    tensors = {f"{prefix}.{name}": t for prefix, module in modules.items()
               for name, t in module.state_dict().items() if t.numel() and t.is_floating_point()}
    names = sorted(tensors)
    if len(names) > PROBE_TENSORS:
        names = [names[round(i * (len(names) - 1) / (PROBE_TENSORS - 1))] for i in range(PROBE_TENSORS)]
    out = {}
    for name in names:
        flat = tensors[name].detach().reshape(-1)
        k = min(PROBE_VALUES, flat.numel())  # integer positions: float ones round past the end of large tensors
        idx = torch.arange(k, dtype=torch.int64) * (flat.numel() - 1) // max(k - 1, 1)
        out[name] = [float(f"{v:.6g}") for v in flat[idx.to(flat.device)].float().cpu().tolist()]
    return out


def model_identity(pipe, modules: dict[str, torch.nn.Module]) -> dict:
    """What an artefact records of the model it was made on: its architecture and a probe of ``modules``
    (``{label: module}``: the weights the artefact depends on)."""
    return {"architecture": architecture(pipe), "probe": _probe(modules)}


def identity_mismatch(recorded: dict, pipe, modules: Callable[[], dict[str, torch.nn.Module]]) -> str | None:
    """Why ``pipe`` is not the model ``recorded`` (a :func:`model_identity`) describes, or None if it is.
    ``modules`` gives the probed modules once the architecture matches (a DoriError from it: the layers
    are not there)."""
    from .errors import DoriError

    if recorded.get("architecture") != architecture(pipe):
        return "another architecture"
    try:
        current = _probe(modules())
    except DoriError:
        return "other layers"
    stored = recorded.get("probe") or {}
    if set(stored) != set(current):
        return "other layers"
    pairs = [(a, b) for name in stored for a, b in zip(stored[name], current[name], strict=False)]
    if len(pairs) != sum(len(v) for v in stored.values()):
        return "other layer sizes"
    different = sum(not (math.isfinite(b) and abs(a - b) <= ATOL + RTOL * abs(a)) for a, b in pairs)
    if pairs and different / len(pairs) > MAX_DIFFERENT:
        return f"other weights ({different} of {len(pairs)} probed values differ)"
    return None
