"""The UNet's weights in named groups: which group carries a change of a model, and which a fine-tuning may move.

A Stable Diffusion UNet reads the caption only through its cross-attention layers (``attn2``): their key and
value projections map the text encoder's output into the image features, their query and output projections
sit on the image side. Everything else (self-attention, the transformer blocks' feed-forward layers, the
ResNet blocks, convolutions, norms and the time embedding) sees the caption only through what cross-attention
added. Grouping the parameters so lets one ask which part of a fine-tuned model holds a change it made (put
one group back to the model before the change, :func:`revert_groups`) and keep a group as it is while
fine-tuning (``FinetuneConfig.frozen_groups``; docs/testbed.md, "Which weights carry the lost shape colours").
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch

from .errors import DoriError
from .hooks import hooked

WEIGHT_GROUPS: dict[str, str] = {
    "cross_kv": "cross-attention key and value projections (attn2.to_k, attn2.to_v): read the caption",
    "cross_qo": "cross-attention query and output projections (attn2.to_q, attn2.to_out)",
    "self_attn": "self-attention (attn1)",
    "ff": "the transformer blocks' feed-forward layers (ff)",
    "rest": "everything else: ResNet blocks, convolutions, norms, time embedding, proj_in / proj_out",
}


def group_of(name: str) -> str:
    """The group (a key of :data:`WEIGHT_GROUPS`) of a UNet parameter or module named as in
    ``unet.named_parameters()``; a LoRA's parameters fall in the group of the layer they adapt."""
    parts = name.split(".")
    if "attn2" in parts:
        after = parts[parts.index("attn2") + 1:]
        return "cross_kv" if after and after[0] in ("to_k", "to_v") else "cross_qo"
    if "attn1" in parts:
        return "self_attn"
    if "ff" in parts:
        return "ff"
    return "rest"


def check_groups(groups: Iterable[str], field: str = "groups") -> tuple[str, ...]:
    """``groups`` as a tuple, each a key of :data:`WEIGHT_GROUPS`; an error naming ``field`` otherwise."""
    groups = tuple(groups)
    unknown = [g for g in groups if g not in WEIGHT_GROUPS]
    if unknown:
        raise DoriError(f"{field}: {', '.join(map(repr, unknown))} not a weight group; allowed: "
                        f"{', '.join(WEIGHT_GROUPS)}")
    return groups


def parameters_in(module: torch.nn.Module, groups: Iterable[str]) -> dict[str, torch.nn.Parameter]:
    """The parameters of ``module`` (a UNet) in any of ``groups``, by name."""
    groups = set(check_groups(groups))
    return {n: p for n, p in module.named_parameters() if group_of(n) in groups}


def group_change(changed: torch.nn.Module, original: torch.nn.Module) -> dict[str, dict[str, float]]:
    """Per group: its share of the parameters, and the relative change ``||changed - original|| / ||original||``
    over the group's weights (two UNets of the same architecture)."""
    before = dict(original.named_parameters())
    moved, norm, count = defaultdict(float), defaultdict(float), defaultdict(int)
    for name, p in changed.named_parameters():
        if name not in before:
            raise DoriError(f"changed: its parameter {name} is not in the original UNet; give the same architecture")
        group, old = group_of(name), before[name].detach().float()
        moved[group] += float((p.detach().float() - old).pow(2).sum())
        norm[group] += float(old.pow(2).sum())
        count[group] += p.numel()
    total = sum(count.values())
    return {g: {"share": count[g] / total, "relative_change": (moved[g] / norm[g]) ** 0.5 if norm[g] else 0.0}
            for g in WEIGHT_GROUPS if count[g]}


@contextmanager
def revert_groups(model: torch.nn.Module, original: torch.nn.Module, groups: Iterable[str]) -> Iterator[None]:
    """Within the block the parameters of ``model`` in ``groups`` hold ``original``'s values (a UNet of the same
    architecture, e.g. the model before fine-tuning); their own values come back when the block ends. Each
    parameter is a named in-place edit of :mod:`dori.hooks`, so reverting a group that is already reverted is
    refused."""
    params = parameters_in(model, groups)
    before = dict(original.named_parameters())
    missing = [n for n in params if n not in before or before[n].shape != params[n].shape]
    if missing:
        raise DoriError(f"original: has no parameter {missing[0]} of the same shape; give a UNet of the same "
                        "architecture")
    with hooked(model, "revert-groups") as hooks:
        for name, p in params.items():
            kept = p.detach().clone()
            hooks.edit(name, lambda p=p, kept=kept: p.data.copy_(kept))
            p.data.copy_(before[name])
        yield
