"""What the inference-time mitigations need to know about a UNet call: its inputs, whether it is a
step of a sampling loop, and which rows of its batch are the unconditional branch of guidance.

A diffusers pipeline calls the UNet once per denoising step with one timestep for the whole batch (a
0-d tensor or a number) and, under classifier-free guidance, the batch ``[unconditional; conditional]``.
Training-style calls (the attack's diffusion loss, fine-tuning) pass one timestep per row. Wen et
al.'s adjustment is defined on the sampling trajectory and acts only in sampling calls; Ren et al.'s
re-scaling acts in every call but leaves the unconditional rows alone, as their code does.
"""

from __future__ import annotations

import torch


def unet_inputs(args: tuple, kwargs: dict) -> tuple[torch.Tensor, object, torch.Tensor | None]:
    """``(sample, timestep, encoder_hidden_states)`` of a ``UNet2DConditionModel`` call, however passed."""
    sample = kwargs["sample"] if "sample" in kwargs else args[0]
    timestep = kwargs["timestep"] if "timestep" in kwargs else (args[1] if len(args) > 1 else None)
    states = kwargs.get("encoder_hidden_states", args[2] if len(args) > 2 else None)
    return sample, timestep, states


def with_states(args: tuple, kwargs: dict, states: torch.Tensor) -> tuple[tuple, dict]:
    """The call's ``(args, kwargs)`` with ``encoder_hidden_states`` replaced."""
    if "encoder_hidden_states" in kwargs or len(args) <= 2:
        return args, {**kwargs, "encoder_hidden_states": states}
    return (*args[:2], states, *args[3:]), kwargs


def is_sampling_call(timestep) -> bool:
    """Whether a UNet call is a step of a sampling loop: one timestep for the whole batch."""
    return not isinstance(timestep, torch.Tensor) or timestep.ndim == 0


def empty_embedding(pipe) -> torch.Tensor:
    """The text-encoder output of the empty prompt ``(1, tokens, dim)``: the unconditional embedding of
    guidance when no negative prompt is given."""
    from ..models import encode_prompts

    return encode_prompts(pipe, [""])


def unconditional_rows(states: torch.Tensor, empty: torch.Tensor) -> torch.Tensor:
    """``(B,)`` bool: the rows of ``states`` equal (to 1e-5 relative) to the empty prompt's embedding."""
    ref = empty.to(states.device, states.dtype).flatten(1)
    rows = states.detach().flatten(1)
    tol = 1e-5 * ref.abs().max().clamp_min(1e-12) if states.dtype == torch.float32 else 1e-2 * ref.abs().max()
    return (rows - ref).abs().amax(1) <= tol
