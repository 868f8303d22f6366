"""The parts of an embedding attack, passed explicitly (after TextAttack): objective, success check,
constraint, initialiser, and an optional early check. Each part is a small protocol (below); the
optimiser loop (:class:`dori.attack.loop.EmbeddingAttack`) checks the parts when it is built and uses
nothing but these interfaces.

Shapes: a batch of triggers ``y`` is ``(B, tokens, dim)``, the text-encoder output fed to the UNet's
cross-attention; trigger ``b`` aims at target latent ``targets[b]`` ``(C, h, w)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import DoriError
from ..models import diffusion_target
from ..seeding import item_generator


# -- the protocols ---------------------------------------------------------------------------------------
@runtime_checkable
class Objective(Protocol):
    """A differentiable loss per trigger; ``pairs`` is how many UNet evaluations one call costs a trigger."""

    pairs: int

    def __call__(self, y: torch.Tensor, targets: torch.Tensor, generators: list[torch.Generator]) -> torch.Tensor:
        """``y`` ``(B, tokens, dim)``, ``targets`` ``(B, C, h, w)``, one generator per trigger -> ``(B,)``."""


@dataclass
class CheckOutcome:
    """What a success check found for ``B`` triggers and ``S`` evaluation seeds."""

    scores: np.ndarray
    """Similarity of each seed's image to the trigger's target, ``(B, S)``."""
    replicated: np.ndarray
    """Whether that image replicates, ``(B, S)`` bool."""
    succeeded: np.ndarray
    """Whether the trigger counts as a success, ``(B,)`` bool."""
    images: torch.Tensor | None = None
    """The images, ``(B, S, 3, H, W)``, when the check keeps them."""

    @property
    def mr(self) -> np.ndarray:
        """Share of replicating images per trigger ``(B,)``."""
        return self.replicated.mean(1)


@runtime_checkable
class SuccessCheck(Protocol):
    """Whether triggers replicate their targets; kept apart from the loss."""

    def __call__(self, y: torch.Tensor, which: list[int]) -> CheckOutcome:
        """Triggers ``y`` ``(B, tokens, dim)`` aimed at targets ``which`` (indices into the run's targets)."""


@runtime_checkable
class EarlyCheck(Protocol):
    """A cheap check during the optimisation; ``cost`` is its UNet evaluations per trigger."""

    cost: int

    def __call__(self, y: torch.Tensor, which: list[int]) -> np.ndarray:
        """``(B,)`` bool: which triggers pass."""


@runtime_checkable
class Constraint(Protocol):
    def project(self, y: torch.Tensor, origin: torch.Tensor) -> torch.Tensor:
        """``y`` moved back into the allowed set around ``origin`` (both ``(B, tokens, dim)``)."""


@runtime_checkable
class Initializer(Protocol):
    name: str

    def __call__(self, pipe, prompt: str, restart: int) -> torch.Tensor:
        """The start embedding ``(tokens, dim)`` of restart ``restart`` for ``prompt``."""


# -- objective ------------------------------------------------------------------------------------------
class DiffusionLoss:
    """The ordinary diffusion training loss of each trigger's target latent under the frozen UNet.

    Each call draws ``pairs`` fresh ``(noise, t)`` per trigger, ``t`` uniform over the training
    timesteps (or over ``timesteps``, a range ``[low, high)`` of them), and regresses the model's own
    target (epsilon, or v for v-prediction models). Returns the per-trigger loss ``(B,)``.
    """

    def __init__(self, pipe, pairs: int = 8, unet: torch.nn.Module | None = None,
                 timesteps: tuple[int, int] | None = None):
        from diffusers import DDPMScheduler

        if pairs < 1:
            raise DoriError(f"pairs: must be >= 1, got {pairs}")
        self.unet = unet if unet is not None else pipe.unet  # e.g. an accelerate-wrapped copy of pipe.unet
        self.device, self.dtype = pipe.unet.device, pipe.unet.dtype
        self.pairs = pairs
        self.scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
        total = self.scheduler.config.num_train_timesteps
        self.timesteps = (0, total) if timesteps is None else (int(timesteps[0]), int(timesteps[1]))  # [low, high)
        if not 0 <= self.timesteps[0] < self.timesteps[1] <= total:
            raise DoriError(f"timesteps: must be a range [low, high) with 0 <= low < high <= {total} (the scheduler's "
                            f"training timesteps), got {timesteps}")
        kind = self.scheduler.config.prediction_type
        if kind not in ("epsilon", "v_prediction"):  # fail at construction, not in the first step
            raise DoriError(f"scheduler: prediction_type {kind!r} is not supported by the attack")

    def inputs(self, y: torch.Tensor, targets: torch.Tensor,
               generators: list[torch.Generator]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The UNet inputs and regression target of one call: ``(noisy, t, conditioning, target)``, each
        with ``B * pairs`` rows (so several losses can share one UNet call, as DDP wants)."""
        p = self.pairs
        device, dtype = self.device, self.dtype
        x0 = targets.to(device, dtype).repeat_interleave(p, dim=0)
        noise = torch.cat([torch.randn((p, *targets.shape[1:]), generator=g) for g in generators]).to(device, dtype)
        t = torch.cat([torch.randint(*self.timesteps, (p,), generator=g) for g in generators])
        t = t.to(device)
        noisy = self.scheduler.add_noise(x0, noise, t)
        target = diffusion_target(self.scheduler, x0, noise, t)
        return noisy, t, y.to(dtype).repeat_interleave(p, dim=0), target

    def reduce(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Per-trigger loss ``(B,)`` from predictions and targets of ``B * pairs`` rows."""
        return F.mse_loss(pred.float(), target.float(), reduction="none").flatten(1).mean(1).view(-1, self.pairs).mean(1)

    def __call__(self, y: torch.Tensor, targets: torch.Tensor, generators: list[torch.Generator]) -> torch.Tensor:
        """``y`` ``(B, tokens, dim)``, ``targets`` ``(B, C, h, w)``, one generator per trigger -> ``(B,)``."""
        noisy, t, cond, target = self.inputs(y, targets, generators)
        return self.reduce(self.unet(noisy, t, encoder_hidden_states=cond).sample, target)


def initial_noise(targets: torch.Tensor, generators: list[torch.Generator]) -> torch.Tensor:
    """One initial sampling noise per trigger ``(B, C, h, w)``, drawn from each trigger's generator."""
    return torch.stack([torch.randn(tuple(targets.shape[1:]), generator=g) for g in generators])


class ThroughAdjustments:
    """An objective evaluated at the triggers as inference mitigations would adjust them before sampling
    (Wen et al.'s adjustment: ``mitigation.adjuster(pipe)``, a function of the triggers and the initial
    noise), for the adaptive attack.

    Each call draws one initial noise per trigger from its generator (before the inner objective's
    draws), adjusts the triggers from it, and passes the gradient straight through the adjustment
    (``y + stopgrad(adjust(y) - y)``: the adjustment is an optimisation without a usable derivative, the
    BPDA of Athalye et al. 2018)."""

    def __init__(self, objective: Objective, pipe, mitigations: list):
        self.objective, self.pipe = objective, pipe
        self.adjusters = [m.adjuster(pipe) for m in mitigations]
        self.pairs = objective.pairs

    def __call__(self, y: torch.Tensor, targets: torch.Tensor, generators: list[torch.Generator]) -> torch.Tensor:
        noise = initial_noise(targets, generators).to(self.pipe.unet.device, self.pipe.unet.dtype)
        adjusted = y
        for adjust in self.adjusters:
            adjusted = adjusted + (adjust(adjusted, noise).to(y.dtype) - adjusted).detach()
        return self.objective(adjusted, targets, generators)


class NoiseNormPenalty:
    """The diffusion loss plus ``weight`` times the trigger's text-conditional noise norm at the first
    sampling step (Wen et al.'s detection statistic), hinged at ``target``: a trigger that replicates
    while the noise-norm detector (and Wen's adjustment, which stops at its target) sees nothing.

    Each call draws one initial noise per trigger (after the inner loss's draws) and evaluates the UNet on
    ``[empty; trigger]`` at the first timestep of a ``steps``-step schedule of the pipeline's scheduler
    (:func:`dori.generation.text_noise_norm`); the norm is divided by the square root of the latent's size
    so that ``weight`` means the same at any resolution."""

    def __init__(self, pipe, inner: Objective, weight: float = 1.0, target: float = 0.0, steps: int = 25):
        from ..generation import FirstStep
        from ..mitigations.sampling_calls import empty_embedding

        if weight < 0 or target < 0:
            raise DoriError(f"weight, target: must be >= 0, got {weight}, {target}")
        self.pipe, self.inner, self.weight, self.target = pipe, inner, weight, target
        self.pairs = inner.pairs + 2
        self.step = FirstStep.of(pipe, steps)
        self.empty = empty_embedding(pipe)
        self.last_norm: torch.Tensor | None = None
        """The per-trigger noise norm of the last call (not divided by the size)."""

    def __call__(self, y: torch.Tensor, targets: torch.Tensor, generators: list[torch.Generator]) -> torch.Tensor:
        from ..generation import text_noise_norm

        loss = self.inner(y, targets, generators)
        x = self.step.model_input(initial_noise(targets, generators).to(self.pipe.unet.device))
        norm = text_noise_norm(self.pipe.unet, x, self.step, self.empty, y)
        self.last_norm = norm.detach().cpu()
        size = float(targets[0].numel()) ** 0.5
        return loss + self.weight * torch.relu(norm - self.target) / size


class WithMitigations:
    """A success or early check that generates with ``mitigations`` applied (for ``prompt``), so that the
    attack's loss can run without them (the non-adaptive attack on inference mitigations)."""

    def __init__(self, check, pipe, mitigations: list, prompt: str | None = None):
        self.check, self.pipe, self.mitigations, self.prompt = check, pipe, list(mitigations), prompt
        if hasattr(check, "cost"):
            self.cost = check.cost

    def __call__(self, y: torch.Tensor, which: list[int]):
        from ..mitigations.base import mitigated

        with mitigated(self.pipe, *self.mitigations, prompt=self.prompt):
            return self.check(y, which)


# -- constraints ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class NoConstraint:
    """No constraint (the paper's setting)."""

    def project(self, y: torch.Tensor, origin: torch.Tensor) -> torch.Tensor:
        return y


@dataclass(frozen=True)
class L2Ball:
    """``||y - origin||_2 <= radius`` per trigger; ``relative``: radius as a share of ``||origin||``."""

    radius: float
    relative: bool = True

    def project(self, y: torch.Tensor, origin: torch.Tensor) -> torch.Tensor:
        delta = y - origin
        limit = self.radius * (origin.flatten(1).norm(dim=1) if self.relative else torch.ones(len(y), device=y.device))
        norm = delta.flatten(1).norm(dim=1).clamp_min(1e-12)
        scale = (limit / norm).clamp(max=1.0).view(-1, *[1] * (y.ndim - 1))
        return origin + delta * scale


@dataclass(frozen=True)
class LinfBall:
    """``|y - origin| <= radius`` element-wise."""

    radius: float

    def project(self, y: torch.Tensor, origin: torch.Tensor) -> torch.Tensor:
        return origin + (y - origin).clamp(-self.radius, self.radius)


CONSTRAINTS = ("none", "l2", "linf")


def make_constraint(name: str | None, radius: float | None = None) -> Constraint:
    """``none`` (the paper), ``l2`` (relative radius, default 0.5) or ``linf`` (default 0.1)."""
    if name in (None, "none"):
        return NoConstraint()
    if name == "l2":
        return L2Ball(radius if radius is not None else 0.5)
    if name == "linf":
        return LinfBall(radius if radius is not None else 0.1)
    raise DoriError(f"constraint: must be one of {', '.join(CONSTRAINTS)}, got {name!r}")


# -- initialisers ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class FromPrompt:
    """Start from the memorized prompt's own embedding (the paper's main attack)."""

    name: str = "prompt"

    def __call__(self, pipe, prompt: str, restart: int) -> torch.Tensor:
        from ..models import encode_prompts

        return encode_prompts(pipe, [prompt])[0]


@dataclass(frozen=True)
class RandomNormal:
    """Start from y ~ N(0, I) (the paper's locality analysis); one draw per (prompt, restart, seed)."""

    seed: int = 0
    name: str = "random"

    def __call__(self, pipe, prompt: str, restart: int) -> torch.Tensor:
        tokens, dim = pipe.tokenizer.model_max_length, pipe.unet.config.cross_attention_dim
        g = item_generator("random-init", self.seed, prompt, restart)
        return torch.randn((tokens, dim), generator=g).to(pipe.unet.device, pipe.unet.dtype)


@dataclass(frozen=True)
class OtherPrompt:
    """Start from the embedding of another (non-memorized) prompt."""

    prompt: str
    name: str = "other"

    def __call__(self, pipe, prompt: str, restart: int) -> torch.Tensor:
        from ..models import encode_prompts

        return encode_prompts(pipe, [self.prompt])[0]


# -- success check -------------------------------------------------------------------------------------
class ReplicationCheck:
    """Success = generations from the trigger replicate the reference (similarity above the threshold)
    for at least ``min_rate`` of the ``seeds``.

    It generates ``seeds`` images per trigger with the pipeline (CFG with the empty prompt as the
    unconditional embedding) and scores them with the descriptor.
    """

    def __init__(self, pipe, descriptor, references: list[np.ndarray], seeds: list[int], generation=None,
                 min_rate: float = 0.5):
        from ..generation import GenerationConfig

        if not seeds:
            raise DoriError("seeds: the success check needs at least one seed")
        self.pipe, self.descriptor, self.references = pipe, descriptor, references
        self.seeds, self.generation = list(seeds), generation or GenerationConfig()
        self.min_rate = min_rate

    def __call__(self, y: torch.Tensor, which: list[int]) -> CheckOutcome:
        from ..generation import generate
        from ..memorization import score_images

        n = len(self.seeds)
        gens = generate(self.pipe, self.seeds * len(y), prompt_embeds=y.detach().repeat_interleave(n, dim=0),
                        config=self.generation)
        refs = [self.references[i] for i in which for _ in range(n)]
        scores = score_images(self.descriptor, gens.images, refs).sscd_orig.reshape(len(y), n)
        replicated = scores > self.descriptor.threshold
        return CheckOutcome(scores, replicated, replicated.mean(1) >= self.min_rate,
                            gens.images.view(len(y), n, *gens.images.shape[1:]))


class ShortSamplingCheck:
    """A cheap early-stop check: a few-step DDIM sample from the trigger for ``seeds`` seeds; passes when
    every seed's image clears the descriptor's threshold by ``margin``.

    Costs ``len(seeds) * num_inference_steps * 2`` UNet evaluations per trigger (guided), far less
    than the full success check.
    """

    def __init__(self, pipe, descriptor, references: list[np.ndarray], seeds: list[int], guidance_scale: float = 7.5,
                 num_inference_steps: int = 5, margin: float = 0.1):
        from ..generation import GenerationConfig

        self.pipe, self.descriptor, self.references, self.seeds = pipe, descriptor, references, list(seeds)
        self.generation = GenerationConfig(num_inference_steps=num_inference_steps, guidance_scale=guidance_scale)
        self.margin = margin

    @property
    def cost(self) -> int:
        """UNet evaluations per trigger per check."""
        return len(self.seeds) * self.generation.num_inference_steps * 2

    def __call__(self, y: torch.Tensor, which: list[int]) -> np.ndarray:
        from ..generation import generate
        from ..memorization import score_images

        n = len(self.seeds)
        gens = generate(self.pipe, self.seeds * len(y), prompt_embeds=y.detach().repeat_interleave(n, dim=0),
                        config=self.generation)
        refs = [self.references[i] for i in which for _ in range(n)]
        lowest = score_images(self.descriptor, gens.images, refs).sscd_orig.reshape(len(y), n).min(1)
        return lowest > self.descriptor.threshold + self.margin
