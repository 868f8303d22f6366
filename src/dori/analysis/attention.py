"""Where the cross-attention looks, beside analysis B (the paper's section 2.3): per embedding set and layer, the
attention's share on the first token and the effective number of tokens attended.

At one fixed initial noise and the first denoising step (the conditions of :mod:`dori.analysis.activations`),
each cross-attention layer's probabilities over the ``tokens`` of an embedding are averaged over heads and
image positions:

* ``first_token``: the mean probability on token 0 (the text encoder's start token for a prompt; a free
  row for a trigger grown from N(0, I));
* ``effective_tokens``: ``exp`` of the entropy of the attention row, averaged: 1 when every position
  looks at one token, ``tokens`` when attention is uniform.

Why it is beside the discrepancy: how far apart the activations of a set lie after a cross-attention layer
depends on what that layer reads from each embedding. Reported for Stable Diffusion v1.4 (not measured here;
no SD weights can be loaded where dori is built): almost all of the attention rests on the start token,
whose text-encoder output is the same for every prompt (docs/testbed.md, "Why Y_adv is small in Wanda's
layers"). The probabilities are recomputed beside the forward from the layer's own projections and
:meth:`diffusers.models.attention_processor.Attention.get_attention_scores`, the path diffusers'
``AttnProcessor`` takes, so the model's output is untouched.
"""

from __future__ import annotations

import torch

from ..errors import DoriError


def cross_attention_layers(unet: torch.nn.Module, value_layers: dict[str, torch.nn.Module]) -> list[str]:
    """The cross-attention modules (``...attn2``) whose ``to_v`` are the given value layers, in the same order."""
    modules = dict(unet.named_modules())
    names = [name.removesuffix(".to_v") for name in value_layers]
    wrong = [n for n in names if not getattr(modules.get(n), "is_cross_attention", False)]
    if wrong:
        raise DoriError(f"layers: {wrong[0]!r} is not a cross-attention module (give attn2.to_v value layers)")
    return names


@torch.no_grad()
def attention_concentration(pipe, layers: list[str], embeds: torch.Tensor, *, seed: int = 0,
                            num_inference_steps: int = 50, batch_size: int = 16) -> dict[str, dict[str, torch.Tensor]]:
    """Per layer, ``{"first_token": (n,), "effective_tokens": (n,)}`` for the embeddings ``(n, tokens, dim)``.

    Every embedding sees the same initial latent (``seed``) at the first timestep of a ``num_inference_steps``
    schedule, as in :func:`dori.analysis.activations.wanda_statistic`.
    """
    from ..hooks import hooked
    from ..models import initial_latents

    if embeds.ndim != 3 or len(embeds) == 0:
        raise DoriError(f"embeddings: need a non-empty (n, tokens, dim) tensor, got shape {tuple(embeds.shape)}")
    unet = pipe.unet
    scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config)
    scheduler.set_timesteps(num_inference_steps, device=unet.device)
    t = scheduler.timesteps[0]
    latent = scheduler.scale_model_input(initial_latents(pipe, [seed]) * scheduler.init_noise_sigma, t)
    current: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def make_hook(name: str):
        def hook(attn, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            context = kwargs.get("encoder_hidden_states")
            if context is None:
                raise DoriError(f"layers: {name!r} was called without text embeddings")
            if hidden.ndim == 4:
                hidden = hidden.flatten(2).transpose(1, 2)
            if attn.group_norm is not None:
                hidden = attn.group_norm(hidden.transpose(1, 2)).transpose(1, 2)
            if attn.norm_cross:
                context = attn.norm_encoder_hidden_states(context)
            query = attn.head_to_batch_dim(attn.to_q(hidden))
            key = attn.head_to_batch_dim(attn.to_k(context))
            probs = attn.get_attention_scores(query, key, None).float()
            probs = probs.reshape(len(context), -1, *probs.shape[1:])  # (batch, heads, positions, tokens)
            entropy = -(probs * probs.clamp_min(1e-30).log()).sum(-1)
            current[name] = (probs[..., 0].mean((1, 2)).cpu(), entropy.exp().mean((1, 2)).cpu())

        return hook

    out: dict[str, dict[str, list[torch.Tensor]]] = {name: {"first_token": [], "effective_tokens": []} for name in layers}
    with hooked(unet, "attention-concentration") as hooks:
        for name in layers:
            hooks.pre(name, make_hook(name), with_kwargs=True)
        for i in range(0, len(embeds), batch_size):
            chunk = embeds[i : i + batch_size].to(unet.device, unet.dtype)
            unet(latent.expand(len(chunk), -1, -1, -1), t, encoder_hidden_states=chunk)
            for name in layers:
                first, effective = current.pop(name)
                out[name]["first_token"].append(first)
                out[name]["effective_tokens"].append(effective)
    return {name: {k: torch.cat(v) for k, v in parts.items()} for name, parts in out.items()}
