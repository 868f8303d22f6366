"""Ren et al. (ECCV 2024), inference-time mitigation: re-scale the cross-attention logits and mask the
summary tokens.

Official code: ``renjie3/MemAttn`` (``local_cmd_inference_time_mitigation.sh``: ``text2img.py --c1 1.25
--cross_attn_mask --miti_mem``; ``refactored_classes/refactored_attention_processor.py``). Memorized
prompts concentrate cross-attention on a few tokens (low entropy); the mitigation spreads it out:

* **re-scaling** (``--miti_mem --c1 1.25``): in every cross-attention layer (``attn2``) and at every step,
  the pre-softmax logit of token 0 (BOS), after the ``1/sqrt(d)`` scaling, is multiplied by ``c1`` in the
  conditional branch of guidance only;
* **masking** (``--cross_attn_mask``): the positions after the prompt's first end token (the padding,
  the "summary tokens" beyond the prompt) get a ``-inf`` bias in every cross-attention layer, in both
  branches, with the conditional prompt's length (BOS, the prompt's tokens and the first end token stay
  visible).

The official code applies both to every prompt; there is no detection threshold in its generation path.

Here the ``attn2`` processors are swapped for one that computes attention explicitly with both changes
(the originals come back on ``remove()``); a pre-hook on the UNet tells it which rows are unconditional
(equal to the empty prompt's embedding) and each row's prompt length. Lengths come from the text-encoder
calls made while applied (a prompt encoded by the pipeline); a raw embedding (an attack's trigger) gets
the length of the prompt the mitigation is applied for (``apply(pipe, prompt=...)``; the attack and
evaluation verbs pass each target's caption), and no mask when there is none. The changes act in every
UNet call, the attack's loss included, so an attack run with the mitigation applied is adaptive.

Deviations (also in the sidecar): the unconditional rows are found by comparing with the empty prompt's
embedding (the official code takes every second row of a two-image batch, which holds only for one image
per prompt); the mask and scale act on any batch size and head count (the official code hard-codes 2 and
8).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

from ..errors import DoriError
from ..hooks import Handle
from .base import handle_for, register_mitigation
from .kinds import SettingsMitigation
from .sampling_calls import empty_embedding, unconditional_rows, unet_inputs

DEVIATIONS = (
    "unconditional rows found by equality with the empty prompt's embedding (official: every second row "
    "of a batch of 2)",
    "any batch size and head count (official: 2 and 8 hard-coded)",
    "a raw embedding (an attack's trigger) is masked with the length of the prompt the mitigation is applied "
    "for, and not masked without one",
)


@dataclass(frozen=True)
class RenConfig:
    """``scale``: the factor on the BOS logit of the conditional rows (``--c1``; 1 turns re-scaling off);
    ``mask``: mask the positions after the first end token (``--cross_attn_mask``); ``mask_end``: mask the
    first end token too (``--mask_length_minis1``, off in the official mitigation command)."""

    scale: float = 1.25
    mask: bool = True
    mask_end: bool = False

    def validate(self) -> None:
        if not (math.isfinite(self.scale) and self.scale > 0):
            raise DoriError(f"scale: must be a positive number (1 leaves the logits alone), got {self.scale!r}")

    def to_dict(self) -> dict:
        return asdict(self)


class _Rows:
    """What the processors need about the batch of the current UNet call."""

    def __init__(self) -> None:
        self.conditional: torch.Tensor | None = None  # (B,) bool
        self.visible: torch.Tensor | None = None  # (B,) number of visible key positions (tokens: no mask)


class RescaledCrossAttention:
    """An attention processor for ``attn2``: explicit attention with the conditional rows' token-0 logit
    scaled by ``scale`` and the key positions at and beyond each row's ``visible`` count masked."""

    def __init__(self, rows: _Rows, scale: float):
        self.rows, self.scale = rows, scale

    def logits(self, attn, query: torch.Tensor, key: torch.Tensor, batch: int) -> torch.Tensor:
        """The modified pre-softmax logits ``(batch * heads, queries, keys)`` in float32."""
        out = torch.bmm(query.float(), key.float().transpose(-1, -2)) * attn.scale
        heads = out.shape[0] // batch
        out = out.view(batch, heads, *out.shape[1:])
        rows = self.rows
        if rows.conditional is not None and self.scale != 1.0:
            factor = torch.ones(batch, 1, 1, out.shape[-1], device=out.device)
            factor[rows.conditional.to(out.device), :, :, 0] = self.scale
            out = out * factor
        if rows.visible is not None:
            positions = torch.arange(out.shape[-1], device=out.device)
            hidden = positions[None, :] >= rows.visible.to(out.device)[:, None]  # (batch, keys)
            out = out.masked_fill(hidden[:, None, None, :], float("-inf"))
        return out.view(batch * heads, *out.shape[2:])

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None, *args, **kwargs):
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channel, height * width).transpose(1, 2)
        batch = hidden_states.shape[0]
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.head_to_batch_dim(attn.to_k(encoder_hidden_states))
        value = attn.head_to_batch_dim(attn.to_v(encoder_hidden_states))
        query = attn.head_to_batch_dim(query)
        scores = self.logits(attn, query, key, batch)
        if attention_mask is not None:
            scores = scores + attn.prepare_attention_mask(attention_mask, key.shape[1], batch).float()
        probs = scores.softmax(dim=-1).to(value.dtype)
        hidden_states = attn.batch_to_head_dim(torch.bmm(probs, value))
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


def token_lengths(input_ids: torch.Tensor, eos_token_id: int) -> torch.Tensor:
    """``(B,)`` positions after each row's first end token (BOS + prompt + end), the row's length when it has none."""
    is_end = input_ids == eos_token_id
    first = torch.where(is_end.any(1), is_end.int().argmax(1), torch.full_like(is_end[:, 0], input_ids.shape[1] - 1,
                                                                                dtype=torch.long))
    return first + 1


def cross_attention_layers(unet: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """The UNet's cross-attention modules (``...attn2``), by path."""
    found = {n: m for n, m in unet.named_modules() if n.endswith("attn2") and hasattr(m, "set_processor")}
    if not found:
        raise DoriError("ren: the UNet has no cross-attention layers (attn2)")
    return found


@register_mitigation("ren")
class RenRescaling(SettingsMitigation):
    """Scale the BOS logit of the conditional cross-attention by ``scale`` and mask the padding tokens."""

    name = "ren"
    scope = "per-prompt"
    Config = RenConfig
    deviations = DEVIATIONS

    @classmethod
    def check(cls, pipe, config: RenConfig) -> None:
        cross_attention_layers(pipe.unet)

    def visible_count(self, length: int) -> int:
        return max(1, length - 1) if self.config.mask_end else length

    def apply(self, pipe, prompt: str | None = None) -> Handle:
        """Swap every ``attn2`` processor for :class:`RescaledCrossAttention` and record prompt lengths from
        the text encoder; ``remove()`` puts the original processors back."""
        handle = handle_for(pipe.unet, self)
        rows = _Rows()
        empty = empty_embedding(pipe)
        known: dict[float, list[tuple[torch.Tensor, int]]] = {}
        fallback = None
        eos = pipe.tokenizer.eos_token_id
        if prompt is not None and self.config.mask:
            ids = pipe.tokenizer([prompt], padding="max_length", max_length=pipe.tokenizer.model_max_length,
                                 truncation=True, return_tensors="pt").input_ids
            fallback = int(token_lengths(ids, eos)[0])
        seen: dict = {}

        def text_pre(_module, args, kwargs):
            ids = kwargs.get("input_ids", args[0] if args else None)
            seen["lengths"] = token_lengths(ids, eos) if ids is not None else None

        def text_post(_module, _args, _kwargs, output):
            lengths = seen.pop("lengths", None)
            hidden = output[0] if isinstance(output, tuple) else output.last_hidden_state
            if lengths is None or len(known) > 4096:
                return
            for row, length in zip(hidden.detach(), lengths.tolist(), strict=True):
                known.setdefault(float(row.double().sum()), []).append((row.clone(), int(length)))

        def length_of(row: torch.Tensor) -> int | None:
            for stored, length in known.get(float(row.double().sum()), ()):
                if stored.shape == row.shape and torch.equal(stored.to(row.dtype), row):
                    return length
            return fallback

        def unet_pre(_module, args, kwargs):
            _sample, _timestep, states = unet_inputs(args, kwargs)
            if states is None:
                rows.conditional = rows.visible = None
                return None
            uncond = unconditional_rows(states, empty)
            rows.conditional = ~uncond
            if not self.config.mask:
                rows.visible = None
                return None
            tokens = states.shape[1]
            lengths = [length_of(row) for row in states.detach()]
            n = len(states)
            paired = n % 2 == 0 and bool(uncond[: n // 2].all()) and not bool(uncond[n // 2 :].any())
            if paired:  # guidance: an unconditional row is masked with its conditional row's length
                lengths[: n // 2] = lengths[n // 2 :]
            rows.visible = torch.tensor([self.visible_count(v) if v is not None and (paired or not uncond[i]) else tokens
                                         for i, v in enumerate(lengths)])
            return None

        layers = cross_attention_layers(pipe.unet)
        for path, layer in layers.items():
            original = layer.processor
            layer.set_processor(RescaledCrossAttention(rows, self.config.scale))
            handle.edit(f"{path}.processor", lambda layer=layer, original=original: layer.set_processor(original))
        handle.pre("", unet_pre, with_kwargs=True, name="rows")
        if self.config.mask and getattr(pipe, "text_encoder", None) is not None:
            text = Handle(pipe.text_encoder, f"{handle.owner}-lengths")
            text.pre("", text_pre, with_kwargs=True)
            text.forward("", text_post, with_kwargs=True)
            handle.edit("text-encoder-hooks", text.remove)
        return handle
