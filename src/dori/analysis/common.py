"""What the three analyses share: the layers where NeMo and Wanda act, prompt embeddings, figure files."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from pathlib import Path

import torch

from ..errors import DoriError


def analysis_layers(unet: torch.nn.Module, value_patterns: tuple[str, ...],
                    ffn_patterns: tuple[str, ...] | None = None) -> tuple[dict[str, torch.nn.Linear], dict[str, torch.nn.Linear]]:
    """NeMo's value layers and Wanda's FFN output layers for analyses B and C, in execution order.

    ``value_patterns`` are NeMo's selectors (``attn2.to_v`` of the down and mid blocks); the FFN
    layers default to the ``ff.net.2`` of the same transformer blocks (the paper's figures show 7
    layers for each method; which FFN layers is not said), so the two methods' bars line up layer by
    layer. ``ffn_patterns`` picks other FFN layers.
    """
    from ..mitigations.nemo import value_layers
    from ..mitigations.wanda import ffn_layers

    values = value_layers(unet, value_patterns)
    if ffn_patterns is not None:
        return values, ffn_layers(unet, ffn_patterns)
    modules = dict(unet.named_modules())
    names = [re.sub(r"attn2\.to_v$", "ff.net.2", n) for n in values]
    missing = [v for v, n in zip(values, names, strict=True) if not n.endswith("ff.net.2") or n not in modules]
    if missing:
        raise DoriError(f"layers: no ff.net.2 in the transformer block of {missing[0]!r}; give the FFN layers explicitly")
    return values, ffn_layers(unet, tuple(names))


@torch.no_grad()
def first_step_pass(pipe, embeds: torch.Tensor, recorders: Iterable[Callable], *, seed: int = 0,
                    num_inference_steps: int = 50, batch_size: int = 16, owner: str = "first-step") -> None:
    """Run the UNet once per batch of ``embeds`` ``(n, tokens, dim)`` at the first timestep of a
    ``num_inference_steps`` schedule, every embedding from the same initial latent (``seed``): the conditions
    of analysis B. Each recorder is called with a :class:`dori.hooks.Handle` on the UNet before the first
    batch, to register hooks that record what they need; the hooks see the batches in order."""
    from ..hooks import hooked
    from ..models import initial_latents

    unet = pipe.unet
    scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config)
    scheduler.set_timesteps(num_inference_steps, device=unet.device)
    t = scheduler.timesteps[0]
    latent = scheduler.scale_model_input(initial_latents(pipe, [seed]) * scheduler.init_noise_sigma, t)
    with hooked(unet, owner) as hooks:
        for register in recorders:
            register(hooks)
        for i in range(0, len(embeds), batch_size):
            chunk = embeds[i : i + batch_size].to(unet.device, unet.dtype)
            unet(latent.expand(len(chunk), -1, -1, -1), t, encoder_hidden_states=chunk)


def short_name(name: str) -> str:
    """``down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_v`` -> ``down 1.0``; ``mid_block...`` -> ``mid 0``."""
    parts = name.split(".")
    if parts[0] in ("down_blocks", "up_blocks") and len(parts) > 3 and parts[2] == "attentions":
        return f"{parts[0][:-7]} {parts[1]}.{parts[3]}"
    if parts[0] == "mid_block" and len(parts) > 2 and parts[1] == "attentions":
        return f"mid {parts[2]}"
    return name


def prompt_embeddings(pipe, spec: str, limit: int | None, batch_size: int = 64) -> tuple[list[str], list[str], torch.Tensor]:
    """``(ids, prompts, embeddings (n, tokens, dim))`` of the first ``limit`` prompts of a prompt set."""
    from ..models import encode_prompts
    from ..prompts import prompts_for

    records = prompts_for(pipe, spec).records
    records = records if limit is None else records[:limit]
    embeds = torch.cat([encode_prompts(pipe, [r.prompt for r in records[i : i + batch_size]]).float().cpu()
                        for i in range(0, len(records), batch_size)])
    return [r.id for r in records], [r.prompt for r in records], embeds


def evenly_spaced(items: list, n: int | None) -> list:
    """``n`` items spread over the list (all when ``n`` is None or not smaller)."""
    if n is None or n >= len(items):
        return list(items)
    step = len(items) / n
    return [items[int(i * step)] for i in range(n)]


def save_figure(fig, folder: Path, name: str) -> list[Path]:
    """Write ``<name>.png`` and ``<name>.pdf``."""
    paths = [folder / f"{name}.png", folder / f"{name}.pdf"]
    for path in paths:
        fig.savefig(path)
    return paths


def scaled_note(what: list[tuple[str, int, int]]) -> str:
    """A sentence naming each count that is below the paper's: ``(name, used, paper)``."""
    smaller = [f"{name} {used} (paper {paper})" for name, used, paper in what if used < paper]
    if not smaller:
        return "the paper's full counts"
    return "scaled down from the paper's counts: " + ", ".join(smaller)
