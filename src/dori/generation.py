"""Batched, seeded generation with Wen et al.'s text-conditional noise norm recorded on the way.

Every image has its own ``torch.Generator`` seeded by its ``seed``, so an image depends only on its
(prompt, seed) and not on the batch it was generated in or the number of processes.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from dataclasses import asdict, dataclass

import torch

from .errors import DoriError
from .hooks import hooked

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class GenerationConfig:
    """Sampler settings (diffusers' names). ``None`` height/width: the model's default size."""

    num_inference_steps: int = 25
    guidance_scale: float = 7.5
    batch_size: int = 16
    height: int | None = None
    width: int | None = None

    def validate(self) -> None:
        if self.num_inference_steps < 1:
            raise DoriError(f"num_inference_steps: must be >= 1, got {self.num_inference_steps}")
        if self.batch_size < 1:
            raise DoriError(f"batch_size: must be >= 1, got {self.batch_size}")
        if self.guidance_scale < 0:
            raise DoriError(f"guidance_scale: must be >= 0, got {self.guidance_scale}")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Generations:
    """``images``: float ``(N, 3, H, W)`` in [0, 1]; ``noise_norm``: ``(N, steps)`` or ``None`` without CFG."""

    images: torch.Tensor
    noise_norm: torch.Tensor | None


def epsilon_scale(scheduler, timestep) -> float:
    """The factor that turns a difference of two UNet outputs at ``timestep`` (same ``x_t``) into the
    difference of their noise predictions: 1 for epsilon models, ``sqrt(alpha_bar_t)`` for v prediction."""
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return 1.0
    alphas = scheduler.alphas_cumprod
    index = int(round(float(timestep))) if timestep is not None else len(alphas) - 1
    alpha = float(alphas[min(max(index, 0), len(alphas) - 1)])
    if kind == "v_prediction":
        return alpha**0.5
    if kind == "sample":
        return (alpha / max(1 - alpha, 1e-12)) ** 0.5
    raise DoriError(f"scheduler: prediction_type {kind!r} is not supported")


@dataclass(frozen=True)
class FirstStep:
    """The first step of a ``steps``-step sampling loop of a pipeline's scheduler (a copy of it, set to that
    schedule): its timestep ``t`` and the factor ``scale`` that turns a difference of UNet outputs there
    into a difference of noise predictions (:func:`epsilon_scale`)."""

    scheduler: object
    t: torch.Tensor
    scale: float

    @classmethod
    def of(cls, pipe, steps: int = 25) -> FirstStep:
        from copy import deepcopy

        scheduler = deepcopy(pipe.scheduler)
        scheduler.set_timesteps(steps, device=pipe.unet.device)
        t = scheduler.timesteps[0]
        return cls(scheduler, t, epsilon_scale(pipe.scheduler, t))

    def model_input(self, noise: torch.Tensor) -> torch.Tensor:
        """The UNet's input at this step for the initial noise ``noise`` ``(B, C, h, w)``, as the pipeline makes it."""
        return self.scheduler.scale_model_input(noise * self.scheduler.init_noise_sigma, self.t)


def text_noise_norm(unet: torch.nn.Module, x: torch.Tensor, step: FirstStep, empty: torch.Tensor,
                    y: torch.Tensor) -> torch.Tensor:
    """Wen et al.'s statistic ``(B,)``: ``||eps(x, y) - eps(x, empty)||`` per row at ``step``, from one UNet
    call on ``[empty; y]`` (differentiable in ``y``; ``x``: the UNet inputs, ``empty`` ``(1, tokens, dim)``)."""
    context = torch.cat([empty.to(x.device, unet.dtype).expand(len(y), -1, -1), y.to(unet.dtype)])
    out = unet(torch.cat([x, x]).to(unet.dtype), step.t, encoder_hidden_states=context).sample.float()
    uncond, cond = out.chunk(2)
    return step.scale * (cond - uncond).flatten(1).norm(dim=1)


@contextmanager
def track_noise_norm(unet: torch.nn.Module, scheduler=None):
    """Record ||eps(x_t, y) - eps(x_t, y_empty)|| per image at every step of a CFG pipeline call.

    Wen et al. (ICLR 2024) detect memorization by this norm; it costs nothing extra here because
    the pipeline already evaluates the unconditional and the conditional prediction in one batch
    ``[uncond, cond]``, which a forward hook splits. On a v- or sample-predicting model the UNet's
    output difference is converted to the noise difference with ``scheduler``'s schedule.
    """
    steps: list[torch.Tensor] = []

    def hook(_module, args, kwargs, output):
        sample = output[0] if isinstance(output, tuple) else output.sample
        if sample.shape[0] % 2 == 0:
            uncond, cond = sample.float().chunk(2)
            timestep = kwargs.get("timestep", args[1] if len(args) > 1 else None)
            scale = epsilon_scale(scheduler, timestep) if scheduler is not None else 1.0
            steps.append(scale * (cond - uncond).flatten(1).norm(dim=1).cpu())

    with hooked(unet, "noise-norm") as hooks:
        hooks.forward("", hook, with_kwargs=True)
        yield steps


def generate(pipe, seeds: list[int], prompts: list[str] | None = None, *, prompt_embeds: torch.Tensor | None = None,
             negative_prompt_embeds: torch.Tensor | None = None, config: GenerationConfig | None = None) -> Generations:
    """Generate one image per ``(prompts[i], seeds[i])`` (or ``(prompt_embeds[i], seeds[i])``) in batches.

    ``prompt_embeds``: ``(N, tokens, dim)`` text-encoder outputs (the attack's triggers).
    """
    config = config or GenerationConfig()
    config.validate()
    n = len(seeds)
    if (prompts is None) == (prompt_embeds is None):
        raise DoriError("generate: give exactly one of prompts and prompt_embeds")
    if len(prompts if prompts is not None else prompt_embeds) != n:
        raise DoriError("generate: need one seed per prompt")
    device = pipe.unet.device
    cfg = config.guidance_scale > 1.0
    empty = None
    if prompt_embeds is not None and negative_prompt_embeds is None and cfg:
        from .models import encode_prompts

        empty = encode_prompts(pipe, [""])
    images, norms = [], []
    for start in range(0, n, config.batch_size):
        sl = slice(start, min(n, start + config.batch_size))
        generators = [torch.Generator(device="cpu").manual_seed(int(s)) for s in seeds[sl]]
        kwargs = dict(num_inference_steps=config.num_inference_steps, guidance_scale=config.guidance_scale,
                      generator=generators, height=config.height, width=config.width, output_type="pt")
        if prompts is not None:
            kwargs["prompt"] = list(prompts[sl])
        else:
            kwargs["prompt_embeds"] = prompt_embeds[sl].to(device, pipe.unet.dtype)
            if negative_prompt_embeds is not None:
                kwargs["negative_prompt_embeds"] = negative_prompt_embeds[sl].to(device, pipe.unet.dtype)
            elif empty is not None:
                kwargs["negative_prompt_embeds"] = empty.expand(sl.stop - sl.start, -1, -1)
        with track_noise_norm(pipe.unet, pipe.scheduler) as steps:
            out = pipe(**kwargs).images
        images.append(out.float().cpu())
        if cfg and steps:
            norms.append(torch.stack(steps, dim=1))
    return Generations(torch.cat(images), torch.cat(norms) if cfg and norms else None)
