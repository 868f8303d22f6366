"""ESD, Erased Stable Diffusion (Gandikota et al., ICCV 2023), as a ``weights`` mitigation: the memorized
caption is the concept to erase. Finding Dori's Table 2 (v3) fine-tunes SD v1.4 with ESD and finds
that Dori still brings replication back (MR 0.98): erasing a caption does not erase its image.

The method, as the official code (``rohitgandikota/erasing``, ``esd_sd.py`` for SD v1.x) does it:

* a frozen copy of the UNet draws ``x_t`` (here ``sampling_batch`` steps' trajectories at once): the pipeline's own sampler (``esd_sd.py`` calls the
  pipeline: PNDM for SD v1.4, DDIM for the testbed) from a seeded noise, ``num_inference_steps``
  steps, guidance ``start_guidance`` with the empty prompt, stopped before step ``k`` (``k``
  uniform in ``0..num_inference_steps - 1``), ``t`` the sampler's ``k``-th timestep;
* the frozen copy predicts ``e_c`` (the concept) and ``e_0`` (the empty prompt) at ``(x_t, t)``;
  the trained UNet, conditioned on the concept, regresses
  ``e_c - negative_guidance * (e_c - e_0)`` (mean squared error), batch 1, Adam;
* ``esd-x`` trains the cross-attention (``attn2``) Linear and Conv2d layers, ``esd-u`` every other
  Linear and Conv2d layer (norms and biases of other modules stay);
* defaults: 200 iterations per concept, lr 5e-5, negative guidance 2, start guidance 3, 50 sampler
  steps.

Deviations, all in the saved sidecar (``deviations``):

* several captions share one model: it trains ``iterations`` steps per caption, and step ``k``
  erases caption ``(k - 1) mod n`` (the official script erases one concept per run);
* the draws of step ``k`` come from a generator keyed by ``(seed, k)`` instead of Python's ``random``,
  so a resumed run ends with the same weights;
* the trained UNet keeps the pipeline's dtype (the official script trains in bfloat16);
* on a v-prediction model the regression is on the UNet's output (v), as guidance is applied there.

:meth:`ESDConfig.testbed` is the setting for the embedded testbed (docs/methods.md says why).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from ..errors import DoriError
from ..finetune.unlearning import TrainingSettings
from ..models import encode_prompts
from ..progress import Progress
from ..seeding import item_generator
from .base import register_mitigation
from .kinds import WeightsMitigation, fit_unlearning

VARIANTS = ("esd-x", "esd-u")
DEVIATIONS = (
    "several captions share one model: iterations steps per caption, step k erases caption (k - 1) mod n",
    "draws keyed by (seed, step) instead of Python's random",
    "trained in the pipeline's dtype (official: bfloat16)",
    "on a v-prediction model the regression target is in the UNet's output space",
)


@dataclass(frozen=True)
class ESDConfig(TrainingSettings):
    """ESD's settings; the defaults are ``esd_sd.py``'s (200 iterations, lr 5e-5, Adam). ``iterations``
    counts per caption: a model erasing n captions trains ``iterations * n`` steps."""

    variant: str = "esd-x"
    """``esd-x``: cross-attention layers; ``esd-u``: every other Linear and Conv2d layer."""
    negative_guidance: float = 2.0
    start_guidance: float = 3.0
    """Guidance of the frozen model's DDIM sampling of ``x_t``."""
    num_inference_steps: int = 50
    sampling_batch: int = 64
    """Steps whose ``x_t`` are sampled together: the frozen model's draws do not depend on the training, so
    the trajectories of ``sampling_batch`` consecutive steps (aligned to multiples of it, so a resumed run
    samples the same batches) run as one batch. Equal to sampling step by step up to floating-point order."""

    def validate(self) -> None:
        self.validate_training()
        if self.variant not in VARIANTS:
            raise DoriError(f"variant: must be one of {', '.join(VARIANTS)}, got {self.variant!r}")
        if self.num_inference_steps < 1:
            raise DoriError(f"num_inference_steps: must be >= 1, got {self.num_inference_steps}")
        if self.sampling_batch < 1:
            raise DoriError(f"sampling_batch: must be >= 1, got {self.sampling_batch}")

    @classmethod
    def testbed(cls, **changes) -> ESDConfig:
        """The embedded testbed's setting: lr 1e-4 and 100 iterations per memorized caption (400 steps for
        its 4). At the official lr 5e-5 the tiny UNet barely moves (MR 0.95 after 50 per caption); 1e-4 is
        the lowest rate measured that cuts MR 3-fold; 2e-4 and 5e-4 erase more and wreck the shape
        captions (docs/methods.md)."""
        return replace(cls(lr=1e-4, iterations=100, checkpoint_every=100), **changes)


def trainable_names(unet: torch.nn.Module, variant: str) -> list[str]:
    """The parameters ESD trains: those of Linear and Conv2d modules inside (``esd-x``) or outside
    (``esd-u``) the cross-attention blocks ``attn2``."""
    names = []
    for module_name, module in unet.named_modules():
        if not isinstance(module, torch.nn.Linear | torch.nn.Conv2d):
            continue
        cross = "attn2" in module_name
        if (variant == "esd-x") == cross:
            names += [f"{module_name}.{n}" for n, _ in module.named_parameters()]
    return names


class ESDObjective:
    """ESD's loss (see the module docstring) for the captions ``prompts``."""

    name = "esd"

    def __init__(self, pipe, prompts: list[str], config: ESDConfig):
        if not prompts:
            raise DoriError("prompts: ESD needs at least one caption to erase")
        self.config = config
        self.base = copy.deepcopy(pipe.unet).eval().requires_grad_(False)
        self.concepts = encode_prompts(pipe, prompts)
        self.empty = encode_prompts(pipe, [""])
        unet = pipe.unet
        self.shape = (1, unet.config.in_channels, unet.config.sample_size, unet.config.sample_size)
        self.device, self.dtype = unet.device, unet.dtype
        self.sampler = type(pipe.scheduler), pipe.scheduler.config
        self.timesteps = self.new_scheduler().timesteps
        self.block: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # step -> (x_t, target), current block

    def trainable(self, unet: torch.nn.Module) -> list[str]:
        return trainable_names(unet, self.config.variant)

    def optimizer(self, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
        return torch.optim.Adam(params, lr=self.config.lr)

    def draw(self, step: int) -> tuple[int, int, torch.Tensor]:
        """Step ``step``'s caption index, stopping step ``k`` and initial noise."""
        g = item_generator("esd", self.config.seed, step)
        k = int(torch.randint(self.config.num_inference_steps, (1,), generator=g))
        noise = torch.randn(self.shape, generator=g)
        return (step - 1) % len(self.concepts), k, noise.to(self.device, self.dtype)

    def new_scheduler(self):
        """A fresh copy of the pipeline's sampler set to ``num_inference_steps`` (multistep samplers such as
        PNDM keep state between steps, so every sampling starts from a new one)."""
        kind, config = self.sampler
        scheduler = kind.from_config(config)
        scheduler.set_timesteps(self.config.num_inference_steps, device=self.device)
        return scheduler

    @torch.no_grad()
    def sample_until(self, concepts: torch.Tensor, noise: torch.Tensor, ks: list[int]) -> torch.Tensor:
        """The frozen model's guided latents, trajectory ``i`` (concept ``concepts[i]``, initial noise
        ``noise[i]``) stopped before step ``ks[i]`` of the pipeline's sampler (after ``ks[i]`` steps)."""
        scheduler, g, n = self.new_scheduler(), self.config.start_guidance, len(ks)
        x = noise * scheduler.init_noise_sigma
        out = x.clone()
        context = torch.cat([self.empty.expand(n, -1, -1), concepts])
        stops = torch.tensor(ks, device=x.device)
        for j, t in enumerate(scheduler.timesteps[: max(ks)]):
            model_in = scheduler.scale_model_input(torch.cat([x, x]), t)
            uncond, cond = self.base(model_in, t, encoder_hidden_states=context).sample.chunk(2)
            x = scheduler.step(uncond + g * (cond - uncond), t, x).prev_sample
            done = stops == j + 1
            out[done] = x[done]
        return out

    @torch.no_grad()
    def sampled(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``x_t`` of ``step`` and its target ``e_c - negative_guidance (e_c - e_0)`` (both from the frozen
        model), from the block of ``sampling_batch`` steps it belongs to (computed on first use)."""
        if step not in self.block:
            size = self.config.sampling_batch
            first = (step - 1) // size * size + 1
            steps = list(range(first, first + size))
            draws = [self.draw(s) for s in steps]
            concepts = torch.cat([self.concepts[i : i + 1] for i, _, _ in draws])
            x = self.sample_until(concepts, torch.cat([n for _, _, n in draws]), [k for _, k, _ in draws])
            t = self.timesteps[[k for _, k, _ in draws]]
            e_c, e_0 = self.base(torch.cat([x, x]), torch.cat([t, t]),
                                 encoder_hidden_states=torch.cat([concepts, self.empty.expand(len(steps), -1, -1)])
                                 ).sample.chunk(2)
            target = e_c - self.config.negative_guidance * (e_c - e_0)
            self.block = {s: (x[j : j + 1], target[j : j + 1]) for j, s in enumerate(steps)}
        return self.block[step]

    def loss(self, model: torch.nn.Module, step: int) -> tuple[torch.Tensor, dict[str, float]]:
        index, k, _ = self.draw(step)
        concept = self.concepts[index : index + 1]
        x, target = self.sampled(step)
        t = self.timesteps[k]
        pred = model(x, t, encoder_hidden_states=concept).sample
        return F.mse_loss(pred.float(), target.float()), {"k": float(k), "caption": float(index)}


@register_mitigation("esd")
class ESD(WeightsMitigation):
    """The UNet weights ESD changed to erase the memorized captions."""
    distributed_fit = True
    """Under several processes every one runs the same training (the same draws; accelerate averages
    identical gradients), so the weights are those of one process and no process waits on another's fit."""

    name = "esd"
    Config = ESDConfig
    summary_keys = ("steps", "loss_first", "loss_last", "pipeline")

    @classmethod
    def fit(cls, pipe, prompts, config: ESDConfig | None = None, *, run=None, progress: Progress | None = None) -> ESD:
        """Erase every caption of the :class:`~dori.prompts.PromptSet` ``prompts``; with a ``run``, the
        training (checkpoints, steps, the pipeline folder) is kept in ``<run>/esd`` and resumes."""
        config = config or ESDConfig()
        config.validate()
        texts = [r.prompt for r in prompts.records]
        return fit_unlearning(cls, pipe, prompts, config, lambda: ESDObjective(pipe, texts, config), stage="ESD",
                              folder="esd", deviations=DEVIATIONS, run=run, progress=progress)
