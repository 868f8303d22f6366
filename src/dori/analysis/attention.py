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
from .common import first_step_pass

MEASURES = ("first_token", "effective_tokens")
"""What :class:`AttentionRecorder` records per embedding and layer (the module docstring)."""


def cross_attention_layers(unet: torch.nn.Module, value_layers: dict[str, torch.nn.Module]) -> list[str]:
    """The cross-attention modules (``...attn2``) whose ``to_v`` are the given value layers, in the same order."""
    modules = dict(unet.named_modules())
    names = [name.removesuffix(".to_v") for name in value_layers]
    wrong = [n for n in names if not getattr(modules.get(n), "is_cross_attention", False)]
    if wrong:
        raise DoriError(f"layers: {wrong[0]!r} is not a cross-attention module (give attn2.to_v value layers)")
    return names


class AttentionRecorder:
    """Records, for every batch a UNet runs while its hooks are registered (:meth:`register`, a recorder of
    :func:`dori.analysis.common.first_step_pass`), each embedding's first-token share and effective number of
    tokens in ``layers``; :meth:`collect` returns them, ``{layer: {"first_token": (n,), "effective_tokens": (n,)}}``,
    and starts over."""

    def __init__(self, layers: list[str]) -> None:
        self.layers = list(layers)
        self._parts: dict[str, dict[str, list[torch.Tensor]]] = self._empty()

    def _empty(self) -> dict[str, dict[str, list[torch.Tensor]]]:
        return {name: {what: [] for what in MEASURES} for name in self.layers}

    def register(self, hooks) -> None:
        for name in self.layers:
            hooks.pre(name, self._hook(name), with_kwargs=True)

    def collect(self) -> dict[str, dict[str, torch.Tensor]]:
        parts, self._parts = self._parts, self._empty()
        return {name: {what: torch.cat(values) for what, values in per.items()} for name, per in parts.items()}

    def _hook(self, name: str):
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
            self._parts[name]["first_token"].append(probs[..., 0].mean((1, 2)).cpu())
            self._parts[name]["effective_tokens"].append(entropy.exp().mean((1, 2)).cpu())

        return hook


def attention_concentration(pipe, layers: list[str], embeds: torch.Tensor, *, seed: int = 0,
                            num_inference_steps: int = 50, batch_size: int = 16) -> dict[str, dict[str, torch.Tensor]]:
    """Per layer, ``{"first_token": (n,), "effective_tokens": (n,)}`` for the embeddings ``(n, tokens, dim)``, in
    a pass of its own (:func:`dori.analysis.common.first_step_pass`: one fixed initial latent, the first
    timestep of a ``num_inference_steps`` schedule)."""
    if embeds.ndim != 3 or len(embeds) == 0:
        raise DoriError(f"embeddings: need a non-empty (n, tokens, dim) tensor, got shape {tuple(embeds.shape)}")
    recorder = AttentionRecorder(layers)
    first_step_pass(pipe, embeds, (recorder.register,), seed=seed, num_inference_steps=num_inference_steps,
                    batch_size=batch_size, owner="attention-concentration")
    return recorder.collect()
