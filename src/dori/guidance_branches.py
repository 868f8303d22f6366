"""Classifier-free guidance with one branch taken from another UNet: which branch carries a change of a model.

A guided Stable Diffusion pipeline evaluates its UNet once per step on the batch ``[unconditional,
conditional]`` (the empty caption's predictions first, as in diffusers' pipelines). Generating with one half
of that batch predicted by another UNet of the same architecture (for example the model before a mitigation)
tells whether a change in what a mitigated model draws comes from its predictions under the captions or from
those under the empty caption that guidance extrapolates away from (docs/testbed.md, "What the lost shape
colours are on u seed 0").
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from .errors import DoriError
from .hooks import hooked

BRANCHES: tuple[str, ...] = ("unconditional", "conditional")


def _check_compatible(unet: torch.nn.Module, other: torch.nn.Module) -> None:
    if type(other) is not type(unet):
        raise DoriError(f"other: must be a {type(unet).__name__} like the pipeline's UNet, got {type(other).__name__}")
    for key in ("in_channels", "out_channels", "cross_attention_dim", "sample_size"):
        if other.config.get(key) != unet.config.get(key):
            raise DoriError(f"other: its {key} is {other.config.get(key)!r}, the pipeline's UNet has "
                            f"{unet.config.get(key)!r}; give a UNet of the same architecture")
    if other.device != unet.device or other.dtype != unet.dtype:
        raise DoriError(f"other: it is on {other.device} in {other.dtype}, the pipeline's UNet on {unet.device} in "
                        f"{unet.dtype}; move it there first")


@contextmanager
def split_guidance(pipe, other: torch.nn.Module, branch: str = "unconditional") -> Iterator[None]:
    """Within the block, the ``branch`` half of every guidance batch of ``pipe.unet`` is predicted by ``other``
    (a UNet of the same architecture, device and dtype); the other half stays ``pipe.unet``'s.

    Only for guided generation (guidance scale above 1, so that each call's batch is ``[unconditional,
    conditional]``); a call with per-sample timesteps (a training or denoising loss, not a sampling step) is
    left as it is. A forward pre-hook (:mod:`dori.hooks`) hands ``other`` its half and passes ``pipe.unet`` only
    the other, so a step costs one UNet call on the whole batch as without the split; a forward hook joins the
    halves in the batch's order. Hooks registered on ``pipe.unet`` inside the block see the half it predicts;
    both are removed when the block ends."""
    if branch not in BRANCHES:
        raise DoriError(f"branch: must be one of {', '.join(BRANCHES)}, got {branch!r}")
    _check_compatible(pipe.unet, other)
    first = branch == "unconditional"
    names = list(inspect.signature(type(pipe.unet).forward).parameters)[1:]  # a call's positional arguments, by name
    pending: list[torch.Tensor] = []  # other's half of the call in progress

    def hand_over(_module, args, kwargs):
        pending.clear()
        call = {**dict(zip(names, args, strict=False)), **kwargs}
        timestep = call["timestep"]
        if torch.is_tensor(timestep) and timestep.numel() > 1:
            return None
        sample, states = call["sample"], call["encoder_hidden_states"]
        if sample.shape[0] % 2:
            raise DoriError(f"split_guidance: a UNet call with {sample.shape[0]} latents is not a guidance batch "
                            "[unconditional, conditional]; generate with guidance_scale > 1")
        n = sample.shape[0] // 2
        theirs, ours = (slice(0, n), slice(n, None)) if first else (slice(n, None), slice(0, n))
        rest = {k: v for k, v in call.items() if k not in ("sample", "encoder_hidden_states", "return_dict")}
        pending.append(other(sample[theirs], encoder_hidden_states=states[theirs], return_dict=False, **rest)[0])
        return (), {**call, "sample": sample[ours], "encoder_hidden_states": states[ours]}

    def join(_module, _args, output):
        if not pending:
            return None
        pred = output[0] if isinstance(output, tuple) else output.sample
        pred = torch.cat([pending.pop(), pred]) if first else torch.cat([pred, pending.pop()])
        return (pred, *output[1:]) if isinstance(output, tuple) else type(output)(sample=pred)

    with hooked(pipe.unet, "split-guidance") as hooks:
        hooks.pre("", hand_over, with_kwargs=True)
        hooks.forward("", join)
        yield
