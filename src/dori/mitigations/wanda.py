"""Wanda pruning of memorization (Chavhan et al. 2024, "Memorized Images in Diffusion Models share a
Subspace that can be Located and Deleted"), as their ConceptPrune code (``ruchikachavhan/concept-prune``)
does it; the second mitigation Finding Dori (Kowalczuk et al. 2025, section 4) attacks.

* Layers: the second FFN linear (``ff.net.2``) of every UNet transformer block (16 in SD 1.4),
  found by module path.
* Inputs ``X`` of each layer are recorded at every denoising step of normal sampling, for the
  target (memorized) prompts and for the base prompt ``""``; each token row is L2-normalised and the
  column norms ``||X_j||`` are accumulated over tokens and prompts, per step.
* Score ``S_ij = |W_ij| * ||X_j||``; per output row keep the top ``r * d_in`` weights by the target
  score (``keep="floor"``: ``int(r * d_in)`` as ConceptPrune; ``"ceil"``, the default, at least one
  and never fewer than r of the row), only where ``S_target > S_base`` (r = 1% by default, 10% is
  the paper's stronger ablation); the masks of the first ``tau = 10`` UNet calls are OR-ed.
* Steps are counted by UNet call, as ConceptPrune's hooks count them, so any scheduler works (PNDM
  makes 51 calls for 50 steps). At set scope the base prompt ``""`` is sampled once per target
  prompt, as ConceptPrune pairs them: its norms are ``sqrt(N)`` times those of one run.
* Applied as a reversible weight mask (``remove()`` writes the saved weights back, bit for bit), or
  baked into a saved pipeline folder.

Choices where the code leaves room (recorded in the sidecar): activations are read from the
conditional half of the classifier-free-guidance batch; one image per prompt, seed 0. ``scope``:
``set`` scores the prompts together (the authors' code), ``per-prompt`` one mask per prompt.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..config_files import from_dict
from ..errors import DoriError
from ..hooks import Handle, hooked
from ..models import linear_layers
from ..progress import Progress
from .base import MitigationBase, check_scope, handle_for, read_saved, register_mitigation, write_saved

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class WandaConfig:
    layers: tuple[str, ...] = ("*ff.net.2",)
    sparsity: float = 0.01
    timesteps: int = 10
    num_inference_steps: int = 50
    guidance_scale: float = 7.5
    seed: int = 0
    base_prompt: str = ""
    batch_size: int = 8
    scope: str = "set"
    keep: str = "ceil"
    """Weights per row from ``r * d_in``: ``ceil`` (at least one) or ``floor`` (ConceptPrune's ``int``)."""

    def validate(self) -> None:
        check_scope(self.scope)
        if self.keep not in ("ceil", "floor"):
            raise DoriError(f"keep: must be ceil or floor, got {self.keep!r}")
        if not 0 < self.sparsity <= 1:
            raise DoriError(f"sparsity: must be in (0, 1], got {self.sparsity}")
        if self.num_inference_steps < 1:
            raise DoriError(f"num_inference_steps (--steps): must be >= 1, got {self.num_inference_steps}")
        if not 1 <= self.timesteps <= self.num_inference_steps:
            raise DoriError(f"timesteps: must be in [1, num_inference_steps = {self.num_inference_steps}], "
                            f"got {self.timesteps}")

    def to_dict(self) -> dict:
        return asdict(self)


def ffn_layers(unet: torch.nn.Module, patterns: tuple[str, ...]) -> dict[str, torch.nn.Linear]:
    """The FFN output linears Wanda prunes, in execution order."""
    return linear_layers(unet, patterns)


@torch.no_grad()
def input_norms(pipe, layers: dict[str, torch.nn.Linear], prompts: list[str] | None, config: WandaConfig, *,
                prompt_embeds: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Per layer, ``(calls, d_in)`` column norms of the row-normalised layer inputs over all prompts, one row
    per UNet call of the sampling (as many as the scheduler makes).

    ``prompt_embeds``: ``(N, tokens, dim)`` text-encoder outputs (e.g. Dori triggers) to sample from
    instead of ``prompts`` (give one of the two); the unconditional embedding is the empty prompt's.
    """
    from ..generation import GenerationConfig, generate

    if (prompts is None) == (prompt_embeds is None):
        raise DoriError("input_norms: give exactly one of prompts and prompt_embeds")
    if prompt_embeds is not None and prompt_embeds.ndim != 3:
        raise DoriError(f"prompt_embeds: expected (N, tokens, dim), got {tuple(prompt_embeds.shape)}")
    items = prompts if prompts is not None else prompt_embeds

    sumsq: dict[str, list[torch.Tensor]] = {name: [] for name in layers}
    state = {"step": -1, "cfg": config.guidance_scale > 1.0}

    def on_unet(_module, _args):
        state["step"] += 1

    def make_hook(name):
        def hook(_module, args):
            x = args[0].float()
            if state["cfg"]:
                x = x.chunk(2)[1]
            x = x.reshape(-1, x.shape[-1])
            x = x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)
            rows = sumsq[name]
            while len(rows) <= state["step"]:
                rows.append(torch.zeros(x.shape[-1]))
            rows[state["step"]] += (x**2).sum(0).cpu()

        return hook

    gen = GenerationConfig(num_inference_steps=config.num_inference_steps, guidance_scale=config.guidance_scale,
                           batch_size=config.batch_size)
    with hooked(pipe.unet, "wanda-norms") as hooks:
        for name in layers:
            hooks.pre(name, make_hook(name))
        hooks.pre("", on_unet)
        for start in range(0, len(items), config.batch_size):
            chunk = items[start : start + config.batch_size]
            state["step"] = -1
            if prompts is not None:
                generate(pipe, [config.seed] * len(chunk), chunk, config=gen)
            else:
                generate(pipe, [config.seed] * len(chunk), prompt_embeds=chunk, config=gen)
    return {name: torch.stack(rows).sqrt() for name, rows in sumsq.items()}


def wanda_masks(weight: torch.Tensor, target_norms: torch.Tensor, base_norms: torch.Tensor, sparsity: float,
                timesteps: int, keep: str = "ceil") -> torch.Tensor:
    """Union over the first ``timesteps`` UNet calls of the per-call Wanda masks ``(out, in)``."""
    w = weight.detach().abs().float().cpu()
    n = max(1, math.ceil(sparsity * w.shape[1])) if keep == "ceil" else int(sparsity * w.shape[1])
    if n == 0:
        return torch.zeros_like(w, dtype=torch.bool)
    timesteps = min(timesteps, len(target_norms), len(base_norms))
    mask = torch.zeros_like(w, dtype=torch.bool)
    for step in range(timesteps):
        target = w * target_norms[step][None, :]
        base = w * base_norms[step][None, :]
        top = torch.zeros_like(mask)
        top.scatter_(1, target.topk(n, dim=1).indices, True)
        mask |= top & (target > base)
    return mask


@register_mitigation("wanda")
class Wanda(MitigationBase):
    """Zero the FFN weights that Wanda scores as memorization weights (a reversible mask)."""

    name = "wanda"
    kind = "hook"
    bakeable = True
    Config = WandaConfig

    def __init__(self, masks: dict[str, dict[str, torch.Tensor]], config: WandaConfig, prompts: list[str] | None = None):
        config.validate()
        self.masks, self.config, self.prompts = masks, config, prompts or []

    @property
    def scope(self) -> str:
        return self.config.scope

    @classmethod
    def check(cls, pipe, config: WandaConfig) -> None:
        ffn_layers(pipe.unet, config.layers)

    @classmethod
    def fit(cls, pipe, prompts, config: WandaConfig | None = None, *, run=None, progress: Progress | None = None) -> Wanda:
        """Score and select weights for the :class:`~dori.prompts.PromptSet` ``prompts``."""
        return cls.calibrate(pipe, [r.prompt for r in prompts.records], config, progress=progress)

    @classmethod
    def calibrate(cls, pipe, prompts: list[str], config: WandaConfig | None = None, *,
                  progress: Progress | None = None) -> Wanda:
        """Score and select weights for ``prompts`` together (``set``, as the authors' code) or one by one."""
        config = config or WandaConfig()
        config.validate()
        if not prompts:
            raise DoriError("prompts: Wanda needs at least one target prompt")
        layers = ffn_layers(pipe.unet, config.layers)
        base = input_norms(pipe, layers, [config.base_prompt], config)
        groups = {"*": prompts} if config.scope == "set" else {p: [p] for p in prompts}
        masks = {}
        for i, (key, group) in enumerate(groups.items()):
            target = input_norms(pipe, layers, group, config)
            # the base prompt once per target prompt (identical runs: the sums of squares add up N times)
            paired = {name: norms * math.sqrt(len(group)) for name, norms in base.items()}
            masks[key] = {name: wanda_masks(layer.weight, target[name], paired[name], config.sparsity, config.timesteps,
                                            config.keep)
                          for name, layer in layers.items()}
            if progress:
                progress("prune (Wanda)", i + 1, len(groups))
        return cls(masks, config, list(prompts)).stamp(pipe)

    def mask_for(self, prompt: str | None = None) -> dict[str, torch.Tensor]:
        if self.scope == "set":
            return self.masks["*"]
        if prompt is not None:
            return self.masks.get(prompt, {})
        union: dict[str, torch.Tensor] = {}
        for masks in self.masks.values():
            for name, m in masks.items():
                union[name] = union[name] | m if name in union else m.clone()
        return union

    def depends_on(self, pipe) -> dict[str, torch.nn.Module]:
        """The FFN layers whose weights were scored."""
        return {"ffn": torch.nn.ModuleList(ffn_layers(pipe.unet, self.config.layers).values())}

    def validate_for(self, pipe) -> None:
        layers = ffn_layers(pipe.unet, self.config.layers)
        for masks in self.masks.values():
            for name, mask in masks.items():
                if name not in layers:
                    raise DoriError(f"mitigation: the model has no layer {name!r}")
                if tuple(mask.shape) != tuple(layers[name].weight.shape):
                    raise DoriError(f"mitigation: the Wanda mask of {name} is {tuple(mask.shape)}, the layer's weight "
                                    f"{tuple(layers[name].weight.shape)} (it was made for another model)")

    def fitted_prompts(self) -> list[str] | None:
        return None if self.scope == "set" else list(self.masks)

    def apply(self, pipe, prompt: str | None = None) -> Handle:
        self.validate_for(pipe)
        layers = ffn_layers(pipe.unet, self.config.layers)
        masks = self.mask_for(prompt)
        handle = handle_for(pipe.unet, self)
        with torch.no_grad():
            for name, mask in masks.items():
                weight = layers[name].weight
                m = mask.to(weight.device)
                values = weight.data[m].clone()
                weight.data[m] = 0
                handle.edit(name, lambda weight=weight, m=m, values=values: weight.data.__setitem__(m, values))
        return handle

    def sparsity_per_layer(self, prompt: str | None = None) -> dict[str, float]:
        """Share of each layer's weights that are zeroed."""
        return {name: float(m.float().mean()) for name, m in self.mask_for(prompt).items()}

    def summary(self) -> dict:
        """What ``dori mitigate wanda`` reports: the share of each layer's weights zeroed (all masks together)."""
        return {"sparsity_per_layer": self.sparsity_per_layer()}

    def describe(self) -> dict:
        return {**self.identity(), "config": self.config.to_dict(), "prompts": self.prompts,
                "keys": list(self.masks), "sparsity_per_layer": self.sparsity_per_layer(),
                "activation_source": "conditional half of the CFG batch; one image per prompt at config.seed"}

    def save(self, path: str | Path) -> Path:
        keys = list(self.masks)
        tensors = {f"{i}/{name}": m.to(torch.uint8).contiguous() for i, k in enumerate(keys)
                   for name, m in self.masks[k].items()}
        return write_saved(path, tensors, self.describe())

    @classmethod
    def load(cls, path: str | Path) -> Wanda:
        meta, tensors = read_saved(path)
        masks: dict[str, dict[str, torch.Tensor]] = {k: {} for k in meta["keys"]}
        for key, value in tensors.items():
            i, name = key.split("/", 1)
            if value.dtype != torch.uint8 or value.ndim != 2 or bool((value > 1).any()):
                raise DoriError(f"mitigation: {path} holds {key!r}, which is not a 0/1 weight mask")
            masks[meta["keys"][int(i)]][name] = value.bool()
        config = from_dict(WandaConfig, {**meta["config"], "scope": meta.get("scope", "set")}, "wanda")
        config.validate()
        wanda = cls(masks, config, meta["prompts"])
        saved = meta.get("sparsity_per_layer") or {}
        for name, share in wanda.sparsity_per_layer().items():
            if name in saved and not math.isclose(share, saved[name], rel_tol=1e-6, abs_tol=1e-9):
                raise DoriError(f"mitigation: {path} masks {share:.4%} of {name}, its sidecar says {saved[name]:.4%} "
                                "(the file is damaged)")
        return wanda
