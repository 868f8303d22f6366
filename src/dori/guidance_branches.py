"""Where a change of a model lives: sampling with parts taken from another UNet, and guidance taken apart.

* :func:`split_guidance`: one branch taken from another UNet (which branch carries a change);
* :func:`split_timesteps`: the high- or the low-noise steps of sampling taken from another UNet (where on the
  sampling trajectory a change is set);
* :func:`guidance_difference` and :func:`compare_guidance`: how large the part of a guided step that guidance
  scales is (the prediction under a caption minus the prediction under the empty caption), and how a changed
  model's compares with the original's in size and direction.

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


SIDES: tuple[str, ...] = ("high", "low")


@contextmanager
def split_timesteps(pipe, other: torch.nn.Module, boundary: int, side: str = "high") -> Iterator[None]:
    """Within the block ``pipe`` samples, and is trained or attacked, as a hybrid of two UNets: every UNet input at
    a timestep at or above ``boundary`` (``side="high"``, the noisy start of sampling where the layout is set) or
    below it (``side="low"``) is predicted by ``other`` (a UNet of the same architecture, device and dtype), the rest
    by ``pipe.unet``. A sampling call (one timestep) goes wholly to one UNet; a call with a timestep per row (a
    diffusion loss, such as Dori's objective) is split row by row, each UNet given its rows (every tensor argument
    whose first dimension is the batch's is split with them) and the predictions put back in the batch's order,
    gradients included. ``pipe.unet``'s forward is replaced for the block (recorded as an edit of
    :mod:`dori.hooks`, so a second split of the same UNet is refused); hooks on ``pipe.unet`` still see every call
    with the whole batch, and the hybrid's output."""
    if side not in SIDES:
        raise DoriError(f"side: must be one of {', '.join(SIDES)}, got {side!r}")
    _check_compatible(pipe.unet, other)
    unet = pipe.unet
    plain = unet.forward
    names = list(inspect.signature(type(unet).forward).parameters)[1:]  # a call's positional arguments, by name

    def routed(*args, **kwargs):
        call = {**dict(zip(names, args, strict=False)), **kwargs}
        sample, timestep = call["sample"], call["timestep"]
        t = torch.as_tensor(timestep, device=sample.device)
        theirs = t >= boundary if side == "high" else t < boundary
        if bool(theirs.all()):  # a sampling step (one timestep), or a batch wholly on one side
            return other(**call)
        if not bool(theirs.any()):
            return plain(**call)
        rows = [torch.nonzero(theirs).flatten(), torch.nonzero(~theirs).flatten()]
        n = sample.shape[0]
        outputs = [model(**{k: v[index] if torch.is_tensor(v) and v.dim() and v.shape[0] == n else v
                            for k, v in call.items()}) for model, index in zip((other, plain), rows, strict=True)]
        pred = torch.cat([out[0] for out in outputs])[torch.argsort(torch.cat(rows))]
        return (pred,) if isinstance(outputs[0], tuple) else type(outputs[0])(sample=pred)

    with hooked(unet, "split-timesteps") as hooks:
        hooks.edit("forward", lambda: delattr(unet, "forward"))
        unet.forward = routed
        yield


def guidance_difference(unet: torch.nn.Module, scheduler, latents: torch.Tensor, captions: torch.Tensor,
                        empty: torch.Tensor, timesteps: list[int], *, pairs: int = 2, seed: int = 0,
                        batch_size: int = 32) -> torch.Tensor:
    """The guidance difference ``unet(x_t, t, caption) - unet(x_t, t, empty)`` on noised training latents: for
    each clean latent ``latents[i]`` ``(N, C, h, w)`` with its caption embedding ``captions[i]``, each timestep,
    and ``pairs`` noise draws (from a generator keyed by ``(seed, i, t, pair)``, so every UNet sees the same
    ``x_t``), ``x_t`` is the latent noised by ``scheduler`` (a diffusers noise scheduler: its ``add_noise``).
    ``empty`` is the empty caption's embedding ``(1, tokens, dim)``. The UNet's own output kind (noise or
    velocity) is differenced, so two UNets of one pipeline compare directly. Returns ``(N, len(timesteps),
    pairs, C, h, w)`` in float32."""
    from .seeding import item_generator

    if pairs < 1:
        raise DoriError(f"pairs: must be >= 1, got {pairs}")
    total = scheduler.config.num_train_timesteps
    bad = [t for t in timesteps if not 0 <= int(t) < total]
    if not timesteps or bad:
        raise DoriError(f"timesteps: each must be in [0, {total}) and at least one given, got {list(timesteps)}")
    if len(captions) != len(latents):
        raise DoriError(f"captions: one per latent, got {len(captions)} for {len(latents)} latents")
    device, dtype = unet.device, unet.dtype
    rows = [(i, j, k) for i in range(len(latents)) for j in range(len(timesteps)) for k in range(pairs)]
    out = torch.empty((len(latents), len(timesteps), pairs, *latents.shape[1:]))
    flat = out.view(len(rows), *latents.shape[1:])  # row r of ``rows`` is flat[r]
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        noise = torch.stack([torch.randn(tuple(latents.shape[1:]), generator=item_generator(
            "guidance-difference", seed, i, int(timesteps[j]), k)) for i, j, k in chunk])
        t = torch.tensor([int(timesteps[j]) for _, j, _ in chunk])
        x0 = torch.stack([latents[i] for i, _, _ in chunk])
        noisy = scheduler.add_noise(x0, noise, t).to(device, dtype)
        states = torch.cat([captions[[i for i, _, _ in chunk]].to(device, dtype),
                            empty.to(device, dtype).expand(len(chunk), *empty.shape[1:])])
        with torch.no_grad():
            pred = unet(torch.cat([noisy, noisy]), torch.cat([t, t]).to(device), encoder_hidden_states=states).sample
        flat[start : start + len(chunk)] = (pred[: len(chunk)] - pred[len(chunk) :]).float().cpu()
    return out


def compare_guidance(base: torch.Tensor, other: torch.Tensor, timesteps: list[int]) -> list[dict]:
    """Per timestep, how another model's guidance differences (:func:`guidance_difference`, same latents, captions
    and draws) compare with ``base``'s: the mean norm of each, their ratio (other over base; below 1 the other
    model's predictions follow the captions less strongly), and the mean cosine of the two differences of each
    ``x_t`` (1: the same direction; a zero difference counts as cosine 0)."""
    if base.shape != other.shape or base.shape[1] != len(timesteps):
        raise DoriError(f"other: its guidance differences have shape {tuple(other.shape)}, the base's "
                        f"{tuple(base.shape)}, for {len(timesteps)} timesteps; compute both on the same draws")
    rows = []
    for j, t in enumerate(timesteps):
        b, o = base[:, j].flatten(2), other[:, j].flatten(2)
        norm_b, norm_o = float(b.norm(dim=-1).mean()), float(o.norm(dim=-1).mean())
        cosine = float(torch.nn.functional.cosine_similarity(b, o, dim=-1, eps=1e-12).mean())
        rows.append({"timestep": int(t), "norm_base": norm_b, "norm_other": norm_o,
                     "ratio": norm_o / norm_b if norm_b else float("nan"), "cosine": cosine})
    return rows
