"""NeMo (Hintersdorf et al., NeurIPS 2024): localise memorization neurons in the cross-attention value
layers and deactivate them.

Faithful to the algorithm of the official code (``ml-research/localizing_memorization_in_diffusion_models``):

* neurons are output channels of ``attn2.to_v`` in the down and mid blocks, found by module path;
* a neuron's activation for a prompt is the token-mean of ``|to_v(y)|``; z-scores against the mean
  and std over non-memorized prompts;
* the memorization test compares min-max scaled *noise differences* (predicted noise minus the
  initial latent, at the second timestep of a 50-step schedule, guidance 0) with MS-SSIM; seeds whose
  max pairwise SSIM exceeds the threshold are "memorized-looking", a prompt without any is skipped;
* initial selection: z > theta plus the top-k neurons by activation per layer, theta from 5 down by
  0.25 to 1 while k grows by 1, until the blocked-vs-unblocked SSIM is at or below the threshold;
* refinement: layer-wise (last to first), then neuron-wise, re-activating what is not needed;
* deactivation: forward hooks scaling the chosen channels (default factor 0).

Deviations, all recorded in the saved sidecar, each with the official behaviour one setting away
(``official=True``-style settings; the ``paper-sd1`` preset selects them all):

* the SSIM threshold is calibrated per model (mean + 1 std of pairwise SSIM of non-memorized prompts at
  guidance 7, as the official 0.428 was made) instead of fixed (``ssim_threshold``: a fixed value);
* classifier-free guidance in that calibration splits ``[uncond, cond]`` the right way round; the
  official code swaps them, so its 0.428 is a statistic of reversed guidance (``calibration_cfg``:
  ``official`` reproduces it);
* each seed has its own generator; the official code draws all seeds' latents from one
  (``seed_draws``: ``official``);
* MS-SSIM normalises its betas and shrinks its window and scales for latents smaller than 11x11
  (:mod:`dori.ssim`; ``ms_ssim_betas``: ``official`` uses them as given);
* the activation statistics come from the model's own non-memorized prompts; the official file
  (mean and std of 50,000 LAION prompts on SD v1.4, MIT) can be given as ``statistics_file``.

The detection always samples with DDIM (the official code's scheduler), whatever the pipeline's own.

Speed (``benchmarks/nemo.py``): activations depend only on the text embedding, so neurons are scored
with no UNet pass; the unblocked noise differences are the memorization test's; every blocked
evaluation is one UNet call with all seeds batched, each neuron set is scored once, and the initial
selection's next ``search_batch`` levels share one call.

Used in Finding Dori (Kowalczuk et al. 2025, section 4) as the first mitigation that assumes
memorization is local; Dori's triggers bring replication back under it.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..config_files import from_dict
from ..errors import DoriError
from ..hooks import Handle, counting_calls, hooked
from ..models import encode_prompts, initial_latents, linear_layers, testbed_folder, weights_fingerprint
from ..progress import Progress
from ..runs import cache_dir
from ..ssim import ms_ssim, ssim_settings
from .base import MitigationBase, check_scope, handle_for, read_saved, register_mitigation, write_saved

logger = logging.getLogger(__name__)

Selection = dict[str, list[int]]
"""Layer name -> indices of the deactivated output channels."""


@dataclass(frozen=True)
class NeMoConfig:
    """NeMo's settings; defaults are the official code's (``ssim_threshold=None``: calibrated).

    ``scope``: ``per-prompt`` (each prompt's own neurons, as NeMo deploys them) or ``set`` (their union);
    ``statistics``: the non-memorized prompt set of the activation statistics and the SSIM threshold
    (None: the testbed's seen-once and shape captions on the testbed, ``laion-nonmem`` elsewhere).
    """

    layers: tuple[str, ...] = ("down_blocks.*attn2.to_v", "mid_block.*attn2.to_v")
    scope: str = "per-prompt"
    statistics: str | None = None
    num_seeds: int = 10
    seed: int = 1
    num_inference_steps: int = 50
    detection_step: int = 1
    guidance_scale: float = 0.0
    ssim_threshold: float | None = None
    initial_theta: float = 5.0
    theta_step: float = 0.25
    min_theta: float = 1.0
    initial_k: int = 0
    scaling_factor: float = 0.0
    refine: bool = True
    calibration_guidance_scale: float = 7.0
    calibration_prompts: int = 200
    """How many of the non-memorized prompts calibrate the SSIM threshold (evenly spaced); the
    activation statistics use all of them (they need no UNet pass)."""
    kernel_size: int = 11
    ms_ssim_betas: str = "normalized"
    """``normalized`` (betas rescaled to sum 1) or ``official`` (as given, torchmetrics' convention)."""
    calibration_cfg: str = "uncond-cond"
    """Guidance in the threshold calibration: ``uncond-cond`` (diffusers' order) or ``official`` (swapped)."""
    seed_draws: str = "per-seed"
    """``per-seed`` generators, or ``official``: every seed's latent from one generator seeded by ``seed``."""
    statistics_file: str | None = None
    """The official statistics (``torch.save((means, stds))``, one tensor per value layer) instead of
    statistics computed from ``statistics``."""
    search_batch: int = 8
    """Initial-selection levels (theta, k) scored per UNet call: the levels the schedule would visit
    next are scored together, each with its own seeds' channel masks, and the search reads them in
    order, so it takes the path of scoring them one by one. The UNet batch is this times the
    memorized-looking seeds (80 at the defaults): lower it where memory is short (1: one level per
    call)."""

    def validate(self) -> None:
        check_scope(self.scope)
        if self.search_batch < 1:
            raise DoriError(f"search_batch: must be >= 1, got {self.search_batch}")
        if self.num_seeds < 2:
            raise DoriError(f"num_seeds: NeMo compares seeds pairwise, need >= 2, got {self.num_seeds}")
        if self.num_inference_steps < 1 or not 0 <= self.detection_step < self.num_inference_steps:
            raise DoriError("num_inference_steps / detection_step: need 0 <= detection_step < num_inference_steps")
        if self.ssim_threshold is not None and not -1 <= self.ssim_threshold <= 1:
            raise DoriError(f"ssim_threshold: must be in [-1, 1], got {self.ssim_threshold}")
        if self.theta_step <= 0:
            raise DoriError(f"theta_step: must be > 0, got {self.theta_step}")
        for name, allowed in (("ms_ssim_betas", ("normalized", "official")),
                              ("calibration_cfg", ("uncond-cond", "official")),
                              ("seed_draws", ("per-seed", "official"))):
            if getattr(self, name) not in allowed:
                raise DoriError(f"{name}: must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        if self.statistics_file is not None and not Path(self.statistics_file).is_file():
            raise DoriError(f"statistics_file: {self.statistics_file} does not exist")

    def ssim(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """MS-SSIM of pairs ``(N, C, h, w)`` -> ``(N,)`` with this config's window and betas."""
        return ms_ssim(x, y, kernel_size=self.kernel_size, normalize_betas=self.ms_ssim_betas == "normalized")

    def latents(self, pipe) -> torch.Tensor:
        """The initial latents of the ``num_seeds`` seeds ``(S, C, h, w)``."""
        seeds = [self.seed + i for i in range(self.num_seeds)]
        if self.seed_draws == "per-seed":
            return initial_latents(pipe, seeds)
        unet = pipe.unet
        shape = (len(seeds), unet.config.in_channels, unet.config.sample_size, unet.config.sample_size)
        return torch.randn(shape, generator=torch.Generator().manual_seed(self.seed)).to(unet.device, unet.dtype)

    def to_dict(self) -> dict:
        return asdict(self)


# -- layers, activations, statistics ------------------------------------------------------------------
def value_layers(unet: torch.nn.Module, patterns: tuple[str, ...]) -> dict[str, torch.nn.Linear]:
    """The value projections NeMo works on, in execution order (down blocks, mid block, up blocks)."""
    return linear_layers(unet, patterns)


encode = encode_prompts
TESTBED_STATISTICS = ("testbed:seen-once", "testbed:shape")


def statistics_prompts(spec: str | None, pipe) -> list[str]:
    """Non-memorized prompts for NeMo's statistics: the testbed's seen-once and shape captions on the
    testbed, ``laion-nonmem`` elsewhere, or the set ``spec`` names."""
    from ..prompts import load_prompt_set

    folder = testbed_folder(pipe)
    specs = (spec,) if spec is not None else (TESTBED_STATISTICS if folder else ("laion-nonmem",))
    prompts = [r.prompt for s in specs for r in load_prompt_set(s, model_folder=folder).records]
    if len(prompts) < 2:
        raise DoriError("statistics: need at least 2 non-memorized prompts")
    return prompts


def neuron_activations(layers: dict[str, torch.nn.Linear], embeds: torch.Tensor) -> dict[str, torch.Tensor]:
    """Token-mean ``|to_v(y)|`` per layer, ``(N, channels)``; ``to_v`` sees only the text embedding."""
    with torch.no_grad():
        return {name: layer(embeds.to(layer.weight.dtype)).abs().mean(dim=1).float().cpu() for name, layer in layers.items()}


@dataclass
class ActivationStatistics:
    """Per-layer mean and std of neuron activations over non-memorized prompts."""

    mean: dict[str, torch.Tensor]
    std: dict[str, torch.Tensor]
    n_prompts: int

    def z_scores(self, activations: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``|a - mean| / std`` per layer (as the official code, the absolute deviation)."""
        return {name: (a - self.mean[name]).abs() / self.std[name].clamp_min(1e-12) for name, a in activations.items()}

    @classmethod
    def compute(cls, pipe, layers: dict[str, torch.nn.Linear], prompts: list[str], batch_size: int = 256) -> ActivationStatistics:
        if len(prompts) < 2:
            raise DoriError("statistics: need at least 2 non-memorized prompts")
        acts: dict[str, list[torch.Tensor]] = {name: [] for name in layers}
        for start in range(0, len(prompts), batch_size):
            for name, a in neuron_activations(layers, encode(pipe, prompts[start : start + batch_size])).items():
                acts[name].append(a)
        stacked = {name: torch.cat(v) for name, v in acts.items()}
        return cls({n: a.mean(0) for n, a in stacked.items()}, {n: a.std(0) for n, a in stacked.items()}, len(prompts))

    def save(self, path: Path) -> None:
        tensors = {f"mean/{n}": t.contiguous() for n, t in self.mean.items()}
        tensors |= {f"std/{n}": t.contiguous() for n, t in self.std.items()}
        save_file(tensors, str(path), metadata={"n_prompts": str(self.n_prompts)})

    @classmethod
    def from_official(cls, path: str | Path, layers: dict[str, torch.nn.Linear]) -> ActivationStatistics:
        """The official statistics file: ``(means, stds)``, one tensor per value layer in execution order."""
        try:
            means, stds = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as exc:  # a pickle error, a wrong structure: name the file
            raise DoriError(f"statistics_file: {path} is not NeMo's statistics file ((means, stds) per layer)") from exc
        names = list(layers)
        if not (isinstance(means, list | tuple) and isinstance(stds, list | tuple)):
            raise DoriError(f"statistics_file: {path} is not NeMo's statistics file ((means, stds) per layer)")
        if len(means) != len(names) or len(stds) != len(names):
            raise DoriError(f"statistics_file: {path} has {len(means)} layers, the model {len(names)} value layers")
        for name, mean, std in zip(names, means, stds, strict=True):
            if not (isinstance(mean, torch.Tensor) and isinstance(std, torch.Tensor)):
                raise DoriError(f"statistics_file: {path} is not NeMo's statistics file ((means, stds) per layer)")
            if not (bool(torch.isfinite(mean).all()) and bool(torch.isfinite(std).all())):
                raise DoriError(f"statistics_file: {path} holds non-finite statistics for {name}")
            if mean.numel() != layers[name].out_features or std.numel() != mean.numel():
                raise DoriError(f"statistics_file: {path} has {mean.numel()} neurons for {name}, the model "
                                f"{layers[name].out_features}")
        return cls({n: m.float().flatten() for n, m in zip(names, means, strict=True)},
                   {n: s.float().flatten() for n, s in zip(names, stds, strict=True)}, n_prompts=0)

    @classmethod
    def load(cls, path: Path) -> ActivationStatistics:
        from safetensors import safe_open

        tensors = load_file(str(path))
        with safe_open(str(path), "pt") as f:
            n = int(f.metadata()["n_prompts"])
        mean = {k[5:]: v for k, v in tensors.items() if k.startswith("mean/")}
        std = {k[4:]: v for k, v in tensors.items() if k.startswith("std/")}
        return cls(mean, std, n)


def activation_statistics(pipe, layers: dict[str, torch.nn.Linear], config: NeMoConfig,
                          prompts: list[str]) -> ActivationStatistics:
    """The z-scores' statistics NeMo localises with: the official file ``config.statistics_file``, or computed
    over the non-memorized ``prompts`` and cached under ``$DORI_CACHE/nemo`` per model and prompts."""
    if config.statistics_file is not None:
        return ActivationStatistics.from_official(config.statistics_file, layers)
    key = model_fingerprint(pipe, layers, sorted(prompts))
    return _cached(cache_dir() / "nemo" / f"statistics-{key}.safetensors",
                   lambda: ActivationStatistics.compute(pipe, layers, prompts),
                   lambda s, p: s.save(p), ActivationStatistics.load)


def model_fingerprint(pipe, layers: dict[str, torch.nn.Linear], *extra: object, whole_unet: bool = False) -> str:
    """A hash of what NeMo's cached numbers depend on: the text encoder, the value layers (or the whole
    UNet, for the SSIM threshold), and ``extra`` (the prompts, the settings)."""
    modules = [pipe.text_encoder, pipe.unet if whole_unet else torch.nn.ModuleList(layers.values())]
    return weights_fingerprint(*modules, extra=(list(layers), *extra))


# -- noise differences and the memorization test ------------------------------------------------------
def _epsilon(scheduler, model_output: torch.Tensor, sample: torch.Tensor, t) -> torch.Tensor:
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return model_output
    alpha = scheduler.alphas_cumprod.to(sample.device)[int(t)].to(sample.dtype)
    if kind == "v_prediction":
        return alpha.sqrt() * model_output + (1 - alpha).sqrt() * sample
    if kind == "sample":
        return (sample - alpha.sqrt() * model_output) / (1 - alpha).sqrt()
    raise DoriError(f"scheduler: prediction_type {kind!r} is not supported")


def minmax_scale(x: torch.Tensor) -> torch.Tensor:
    lo = x.amin(dim=(2, 3), keepdim=True)
    hi = x.amax(dim=(2, 3), keepdim=True)
    return (x - lo) / (hi - lo).clamp_min(1e-12)


def detection_step(pipe, config: NeMoConfig, device=None):
    """``(scheduler, t)``: a DDIM scheduler (the official code's) of the pipeline's noise schedule, set to
    the detection schedule, and the detection timestep."""
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    scheduler.set_timesteps(config.num_inference_steps, device=device or pipe.unet.device)
    return scheduler, scheduler.timesteps[config.detection_step]


@torch.no_grad()
def noise_differences(pipe, embeds: torch.Tensor, latents: torch.Tensor, config: NeMoConfig,
                      uncond: torch.Tensor | None = None, guidance_scale: float | None = None,
                      step=None, swap_guidance: bool = False) -> torch.Tensor:
    """Min-max scaled ``eps(x_T, t) - x_T`` at step ``detection_step`` for each latent (one UNet call).

    ``embeds``: ``(1, tokens, dim)`` (expanded over the latents) or ``(S, tokens, dim)``; ``step``:
    a prepared :func:`detection_step` to reuse.
    """
    guidance = config.guidance_scale if guidance_scale is None else guidance_scale
    scheduler, t = step or detection_step(pipe, config, latents.device)
    x = latents * scheduler.init_noise_sigma
    model_in = scheduler.scale_model_input(x, t)
    cond = embeds.expand(len(latents), -1, -1) if embeds.shape[0] == 1 else embeds
    if guidance > 0:
        if uncond is None:
            uncond = encode(pipe, [""])
        context = torch.cat([uncond.expand(len(latents), -1, -1), cond])
        out = pipe.unet(torch.cat([model_in, model_in]), t, encoder_hidden_states=context).sample
        out_uncond, out_cond = out.chunk(2)
        if swap_guidance:  # the official calibration's order: the halves read the wrong way round
            out_uncond, out_cond = out_cond, out_uncond
        out = out_uncond + guidance * (out_cond - out_uncond)
    else:
        out = pipe.unet(model_in, t, encoder_hidden_states=cond).sample
    return minmax_scale((_epsilon(scheduler, out, x, t) - x).float())


def pairwise_ssim(diffs: torch.Tensor, config: NeMoConfig | None = None) -> torch.Tensor:
    """SSIM of every pair ``(i < j)`` of noise differences, ``(S * (S - 1) / 2,)``."""
    pairs = torch.combinations(torch.arange(len(diffs)), r=2)
    return (config or NeMoConfig()).ssim(diffs[pairs[:, 0]], diffs[pairs[:, 1]])


def max_pairwise_ssim(diffs: torch.Tensor, config: NeMoConfig | None = None) -> torch.Tensor:
    """For each seed, its highest SSIM with any other seed ``(S,)``."""
    return seed_maxima(pairwise_ssim(diffs, config), len(diffs))


def seed_maxima(values: torch.Tensor, num_seeds: int) -> torch.Tensor:
    """:func:`pairwise_ssim`'s values ``(S * (S - 1) / 2,)`` -> each seed's highest one ``(S,)``."""
    pairs = torch.combinations(torch.arange(num_seeds), r=2)
    out = torch.full((num_seeds,), -math.inf)
    for col in (0, 1):
        out = out.scatter_reduce(0, pairs[:, col], values, reduce="amax")
    return out


# -- deactivation -------------------------------------------------------------------------------------
def block_neurons(unet: torch.nn.Module, selection: Selection, factor: float = 0.0,
                  handle: Handle | None = None) -> Handle:
    """Forward hooks that scale the selected output channels of each layer (a module path of ``unet``)
    by ``factor``; added to ``handle`` when given, else to a new one."""
    handle = handle if handle is not None else Handle(unet, "nemo-block")
    for name, indices in selection.items():
        if not indices:
            continue
        index = torch.tensor(sorted(set(indices)), dtype=torch.long)

        def hook(_module, _args, output, index=index):
            output = output.clone()
            output[..., index.to(output.device)] *= factor
            return output

        try:
            handle.forward(name, hook)
        except DoriError:
            handle.remove()
            raise
    return handle


# -- localisation -------------------------------------------------------------------------------------
def calibrate_ssim_threshold(pipe, layers: dict[str, torch.nn.Linear], prompts: list[str], config: NeMoConfig) -> float:
    """Mean + 1 std of pairwise SSIM of noise differences over non-memorized prompts (NeMo's 0.428 rule)."""
    values = calibration_ssims(pipe, prompts, config)
    return float(values.mean() + values.std())


def calibration_ssims(pipe, prompts: list[str], config: NeMoConfig) -> torch.Tensor:
    """The pairwise SSIMs the threshold is calibrated on: every seed pair of up to
    ``calibration_prompts`` evenly spaced non-memorized prompts, at the calibration's guidance."""
    latents = config.latents(pipe)
    uncond = encode(pipe, [""])
    step = detection_step(pipe, config, latents.device)
    stride = max(1, len(prompts) // max(1, config.calibration_prompts))
    prompts = prompts[::stride][: config.calibration_prompts]
    values = []
    for prompt in prompts:
        diffs = noise_differences(pipe, encode(pipe, [prompt]), latents, config, uncond=uncond, step=step,
                                  guidance_scale=config.calibration_guidance_scale,
                                  swap_guidance=config.calibration_cfg == "official")
        values.append(pairwise_ssim(diffs, config))
    return torch.cat(values)


def _cached(path: Path, compute: Callable[[], object], save: Callable[[object, Path], None], load: Callable[[Path], object]):
    """``load(path)`` if it exists, else ``compute()`` saved there (through a temporary file, so that several
    processes computing the same value never read a half-written one)."""
    if path.is_file():
        logger.info("using cached %s", path)
        return load(path)
    value = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}{path.suffix}")
    save(value, tmp)
    tmp.replace(path)
    return value


def _union(selections: list[Selection]) -> Selection:
    out: dict[str, set[int]] = {}
    for sel in selections:
        for name, idx in sel.items():
            out.setdefault(name, set()).update(idx)
    return {name: sorted(idx) for name, idx in out.items()}


@dataclass
class PromptLocalization:
    """What NeMo found for one prompt."""

    prompt: str
    memorized: bool
    seeds_memorized: list[int]
    initial: Selection = field(default_factory=dict)
    initial_ssim: float | None = None
    refined: Selection = field(default_factory=dict)
    refined_ssim: float | None = None
    theta: float | None = None
    k: int | None = None
    unet_calls: int = 0

    def n_neurons(self, refined: bool = True) -> int:
        return sum(len(v) for v in (self.refined if refined else self.initial).values())


class _Searcher:
    """The official search, with each blocked evaluation one batched UNet call.

    ``vanilla``: the unblocked noise differences of ``latents`` (the memorization test's, reused).
    Each selection is evaluated once: the search asks again for sets it has scored (the refined set
    is always one of them), and the answer is the same computation.
    """

    def __init__(self, pipe, layers, config: NeMoConfig, embeds: torch.Tensor, latents: torch.Tensor,
                 vanilla: torch.Tensor):
        self.pipe, self.layers, self.config, self.embeds, self.latents = pipe, layers, config, embeds, latents
        self.step = detection_step(pipe, config, latents.device)
        self.vanilla = vanilla
        self._scored: dict[tuple, float] = {}

    @staticmethod
    def _key(selection: Selection) -> tuple:
        return tuple(sorted((name, tuple(sorted(set(idx)))) for name, idx in selection.items() if idx))

    def ssim(self, selection: Selection) -> float:
        self.prefetch([selection])
        return self._scored[self._key(selection)]

    def prefetch(self, selections: list[Selection]) -> None:
        """Score the not yet scored ``selections`` in one UNet call, each on all seeds with its own
        channel masks (the scaling :func:`block_neurons` applies)."""
        todo: dict[tuple, Selection] = {}
        for selection in selections:
            key = self._key(selection)
            if key not in self._scored:
                todo.setdefault(key, selection)
        if not todo:
            return
        n, seeds = len(todo), len(self.latents)
        masks = {}
        for name, layer in self.layers.items():
            mask = torch.ones(n, layer.out_features, device=self.latents.device, dtype=self.latents.dtype)
            for row, selection in enumerate(todo.values()):
                if selection.get(name):
                    mask[row, sorted(set(selection[name]))] = self.config.scaling_factor
            if (mask != 1).any():
                masks[name] = mask.repeat_interleave(seeds, dim=0)[:, None, :]
        with hooked(self.pipe.unet, "nemo-search") as hooks:
            for name, mask in masks.items():
                hooks.forward(name, lambda _m, _a, out, mask=mask: out * mask.to(out.dtype))
            blocked = noise_differences(self.pipe, self.embeds, self.latents.repeat(n, 1, 1, 1), self.config, step=self.step)
        values = self.config.ssim(self.vanilla.repeat(n, 1, 1, 1), blocked).view(n, seeds)
        for key, value in zip(todo, values.max(dim=1).values.tolist(), strict=True):
            self._scored[key] = float(value)


def initial_selection(activations: dict[str, torch.Tensor], z: dict[str, torch.Tensor], theta: float, k: int) -> Selection:
    """Neurons with z-score above ``theta`` plus the ``k`` largest activations of each layer."""
    out = {}
    for name, a in activations.items():
        chosen = torch.nonzero(z[name] > theta).flatten().tolist()
        chosen += a.abs().topk(min(k, a.numel())).indices.tolist()
        out[name] = sorted(set(chosen))
    return out


def refine(searcher: _Searcher, selection: Selection, threshold: float) -> Selection:
    """Layer-wise (last layer first), then neuron-wise: re-activate what keeps SSIM below ``threshold``."""
    current = {name: list(idx) for name, idx in selection.items()}
    for name in reversed(list(current)):
        if current[name]:
            trial = {**current, name: []}
            if searcher.ssim(trial) < threshold:
                current[name] = []
    for name in reversed(list(current)):
        for neuron in list(current[name]):
            trial = {**current, name: [n for n in current[name] if n != neuron]}
            if searcher.ssim(trial) < threshold:
                current[name] = trial[name]
    return current


def localize_prompt(pipe, layers, prompt: str, stats: ActivationStatistics, threshold: float,
                    config: NeMoConfig, *, prompt_embeds: torch.Tensor | None = None) -> PromptLocalization:
    """NeMo's per-prompt search (memorization test, initial selection, refinement).

    ``prompt_embeds``: search for this text-encoder output ``(tokens, dim)`` or ``(1, tokens, dim)``
    (e.g. a Dori trigger) instead of ``prompt``'s; ``prompt`` is then only the result's label.
    """
    if prompt_embeds is not None:
        if prompt_embeds.ndim == 2:
            prompt_embeds = prompt_embeds[None]
        if prompt_embeds.ndim != 3 or prompt_embeds.shape[0] != 1:
            raise DoriError(f"prompt_embeds: expected (tokens, dim) or (1, tokens, dim), got {tuple(prompt_embeds.shape)}")
    with counting_calls(pipe.unet) as counter:
        result = _search(pipe, layers, prompt, stats, threshold, config, prompt_embeds)
    result.unet_calls = counter.calls
    return result


def search_schedule(config: NeMoConfig, max_k: int) -> list[tuple[float, int]]:
    """The initial-selection levels ``(theta, k)`` the official loop visits while each fails: theta down
    by ``theta_step`` to ``min_theta``, k up by 1, ending before a level that is exhausted."""
    schedule = [(config.initial_theta, config.initial_k)]
    while True:
        theta, k = schedule[-1]
        theta, k = (theta - config.theta_step if theta > config.min_theta else theta), k + 1
        if _exhausted(config, max_k, theta, k):
            return schedule
        schedule.append((theta, k))


def _exhausted(config: NeMoConfig, max_k: int, theta: float, k: int) -> bool:
    return math.isclose(theta, config.min_theta) or theta < config.min_theta or k >= max_k


def _search(pipe, layers, prompt: str, stats: ActivationStatistics, threshold: float, config: NeMoConfig,
            prompt_embeds: torch.Tensor | None) -> PromptLocalization:
    seeds = [config.seed + i for i in range(config.num_seeds)]
    embeds = encode(pipe, [prompt]) if prompt_embeds is None else prompt_embeds.to(pipe.unet.device, pipe.unet.dtype)
    latents = config.latents(pipe)
    detection = noise_differences(pipe, embeds, latents, config)
    memorized_seeds = (max_pairwise_ssim(detection, config) > threshold).nonzero().flatten()
    result = PromptLocalization(prompt, bool(len(memorized_seeds)), [seeds[i] for i in memorized_seeds.tolist()])
    if not result.memorized:
        return result
    searcher = _Searcher(pipe, layers, config, embeds, latents[memorized_seeds], detection[memorized_seeds])
    activations = {n: a[0] for n, a in neuron_activations(layers, embeds).items()}
    z = stats.z_scores(activations)
    max_k = max(layer.out_features for layer in layers.values())
    schedule = search_schedule(config, max_k)
    refinement_threshold = threshold
    for level, (theta, k) in enumerate(schedule):
        if level % config.search_batch == 0:
            searcher.prefetch([initial_selection(activations, z, *lv) for lv in schedule[level : level + config.search_batch]])
        selection = initial_selection(activations, z, theta, k)
        ssim = searcher.ssim(selection)
        result.theta, result.k = theta, k
        if ssim <= threshold:
            if _exhausted(config, max_k, theta, k):  # only an initial level at the limit: the official loop checks it first
                refinement_threshold = ssim
            break
    else:  # every level failed: refine against the SSIM reached, as the official code does
        refinement_threshold = ssim
    result.initial, result.initial_ssim = selection, ssim
    refined = refine(searcher, selection, refinement_threshold) if config.refine else selection
    result.refined, result.refined_ssim = refined, searcher.ssim(refined)
    return result


# -- the mitigation -----------------------------------------------------------------------------------
@register_mitigation("nemo")
class NeMo(MitigationBase):
    """Deactivate NeMo's memorization neurons; per prompt (``config.scope="per-prompt"``) or their union (``"set"``)."""

    name = "nemo"
    kind = "hook"
    Config = NeMoConfig
    distributed_fit = True
    """With several processes (``accelerate launch``) each localises its share of the prompts."""

    def __init__(self, results: list[PromptLocalization], layers: list[str], config: NeMoConfig,
                 threshold: float | None = None, refined: bool = True):
        config.validate()
        self.results, self.layer_names, self.config = results, layers, config
        self.threshold, self.refined = threshold, refined
        self._by_prompt = {r.prompt: r for r in results}

    @property
    def scope(self) -> str:
        return self.config.scope

    @classmethod
    def check(cls, pipe, config: NeMoConfig) -> None:
        layers = value_layers(pipe.unet, config.layers)
        if config.statistics_file is not None:
            ActivationStatistics.from_official(config.statistics_file, layers)

    @classmethod
    def fit(cls, pipe, prompts, config: NeMoConfig | None = None, *, run=None, progress: Progress | None = None) -> NeMo:
        """Localise neurons for every prompt of the :class:`~dori.prompts.PromptSet` ``prompts``; with a
        ``run``, each prompt's result is a record and a rerun resumes from them."""
        config = config or NeMoConfig()
        texts = [r.prompt for r in prompts.records]
        done, on_result = {}, None
        known = PromptLocalization.__dataclass_fields__

        def recorded() -> dict[str, PromptLocalization]:
            return {r["prompt"]: PromptLocalization(**{k: v for k, v in r.items() if k in known}) for r in run.records()}

        if run is not None:
            done = recorded()

            def on_result(result: PromptLocalization) -> None:
                run.append([{"key": result.prompt, **asdict(result)}])

            if run.world_size > 1:  # this process's share, then every process's results
                mine = texts[run.rank :: run.world_size]
                cls._localize_reporting(pipe, mine, config, done, on_result, progress)
                run.barrier()
                done = recorded()
        return cls._localize_reporting(pipe, texts, config, done, on_result, progress)

    @classmethod
    def _localize_reporting(cls, pipe, texts: list[str], config: NeMoConfig, done: dict, on_result,
                            progress: Progress | None) -> NeMo:
        count = {"n": sum(t in done for t in texts)}

        def report(result: PromptLocalization) -> None:
            if on_result is not None:
                on_result(result)
            count["n"] += 1
            if progress:
                progress("localize (NeMo)", count["n"], len(texts))

        if progress:
            progress("localize (NeMo)", count["n"], len(texts))
        return cls.localize(pipe, texts, config, statistics_prompts=statistics_prompts(config.statistics, pipe),
                            done=done, on_result=report)

    @classmethod
    def localize(cls, pipe, prompts: list[str], config: NeMoConfig | None = None, *, statistics_prompts: list[str],
                 done: dict[str, PromptLocalization] | None = None,
                 on_result: Callable[[PromptLocalization], None] | None = None,
                 prompt_embeds: torch.Tensor | None = None) -> NeMo:
        """Localise neurons for each memorized prompt; statistics and the SSIM threshold come from
        ``statistics_prompts`` (non-memorized) and are cached under ``$DORI_CACHE`` (``~/.cache/dori``).

        ``prompt_embeds``: ``(len(prompts), tokens, dim)`` text-encoder outputs to localise instead of
        the prompts' own (e.g. Dori triggers); ``prompts`` then only label the results."""
        config = config or NeMoConfig()
        config.validate()
        if prompt_embeds is not None and (prompt_embeds.ndim != 3 or len(prompt_embeds) != len(prompts)):
            raise DoriError(f"prompt_embeds: expected ({len(prompts)}, tokens, dim), one per prompt label, "
                            f"got {tuple(prompt_embeds.shape)}")
        layers = value_layers(pipe.unet, config.layers)
        stats = activation_statistics(pipe, layers, config, statistics_prompts)
        threshold = config.ssim_threshold
        if threshold is None:
            setting = (config.num_seeds, config.seed, config.num_inference_steps, config.detection_step,
                       config.calibration_guidance_scale, config.kernel_size, config.calibration_prompts,
                       config.ms_ssim_betas, config.calibration_cfg, config.seed_draws,
                       dict(pipe.scheduler.config))
            tkey = model_fingerprint(pipe, layers, sorted(statistics_prompts), setting, whole_unet=True)
            threshold = _cached(cache_dir() / "nemo" / f"ssim-threshold-{tkey}.txt",
                                lambda: calibrate_ssim_threshold(pipe, layers, statistics_prompts, config),
                                lambda v, p: p.write_text(repr(v)), lambda p: float(p.read_text()))
        logger.info("NeMo: %d statistics prompts, SSIM threshold %.3f", stats.n_prompts, threshold)
        results = []
        for i, prompt in enumerate(prompts):
            embeds = None if prompt_embeds is None else prompt_embeds[i : i + 1]
            result = (done or {}).get(prompt) or localize_prompt(pipe, layers, prompt, stats, threshold, config,
                                                                 prompt_embeds=embeds)
            if on_result is not None and prompt not in (done or {}):
                on_result(result)
            results.append(result)
        return cls(results, list(layers), config, threshold).stamp(pipe)

    def selection(self, prompt: str | None = None) -> Selection:
        """The neurons deactivated for ``prompt`` (per-prompt scope) or for every prompt (set scope)."""
        pick = (lambda r: r.refined) if self.refined else (lambda r: r.initial)
        if self.scope == "per-prompt" and prompt is not None:
            result = self._by_prompt.get(prompt)
            return pick(result) if result is not None else {}
        return _union([pick(r) for r in self.results])

    def depends_on(self, pipe) -> dict[str, torch.nn.Module]:
        """The text encoder (the activations that chose the neurons) and the value layers (the neurons)."""
        return {"text_encoder": pipe.text_encoder,
                "values": torch.nn.ModuleList(value_layers(pipe.unet, self.layer_names).values())}

    def validate_for(self, pipe) -> None:
        layers = dict(pipe.unet.named_modules())
        for result in self.results:
            for selection in (result.initial, result.refined):
                for name, idx in selection.items():
                    layer = layers.get(name)
                    if not isinstance(layer, torch.nn.Linear):
                        raise DoriError(f"mitigation: NeMo blocks neurons of {name!r}, which this model does not have")
                    if idx and (min(idx) < 0 or max(idx) >= layer.out_features):
                        raise DoriError(f"mitigation: NeMo blocks neuron {max(idx)} of {name}, which has "
                                        f"{layer.out_features} (the file is damaged or made for another model)")

    def fitted_prompts(self) -> list[str]:
        return [r.prompt for r in self.results]

    def apply(self, pipe, prompt: str | None = None) -> Handle:
        self.validate_for(pipe)
        handle = handle_for(pipe.unet, self)
        return block_neurons(pipe.unet, self.selection(prompt), self.config.scaling_factor, handle)

    def neurons_per_layer(self) -> dict[str, dict[str, int]]:
        """``{prompt: {layer: count}}`` of the refined selections."""
        return {r.prompt: {n: len(r.refined.get(n, [])) for n in self.layer_names} for r in self.results}

    def summary(self) -> dict:
        """What ``dori mitigate nemo`` reports: the SSIM threshold and the neurons per prompt and layer."""
        return {"ssim_threshold": self.threshold, "neurons_per_layer": self.neurons_per_layer()}

    def describe(self) -> dict:
        return {**self.identity(), "refined": self.refined, "ssim_threshold": self.threshold,
                "config": self.config.to_dict(), "layers": self.layer_names,
                "ssim_settings": "window/betas per dori.ssim.ssim_settings for the latent size",
                "prompts": [{k: v for k, v in asdict(r).items() if k not in ("initial", "refined")} for r in self.results]}

    def save(self, path: str | Path) -> Path:
        tensors = {f"{i}/{stage}/{name}": torch.tensor(idx, dtype=torch.int64)
                   for i, r in enumerate(self.results)
                   for stage, sel in (("initial", r.initial), ("refined", r.refined)) for name, idx in sel.items()}
        return write_saved(path, tensors, self.describe())

    @classmethod
    def load(cls, path: str | Path) -> NeMo:
        meta, tensors = read_saved(path)
        results = []
        for i, info in enumerate(meta["prompts"]):
            sel = {"initial": {}, "refined": {}}
            for key, value in tensors.items():
                idx, stage, name = key.split("/", 2)
                if int(idx) == i:
                    sel[stage][name] = value.tolist()
            results.append(PromptLocalization(**info, initial=sel["initial"], refined=sel["refined"]))
        config = from_dict(NeMoConfig, {**meta["config"], "scope": meta.get("scope", "per-prompt")}, "nemo")
        config.validate()
        threshold = meta["ssim_threshold"]
        if not isinstance(threshold, int | float) or not math.isfinite(threshold):
            raise DoriError(f"mitigation: {path} has SSIM threshold {threshold!r}, not a finite number")
        bad = [k for k, v in tensors.items() if v.dtype != torch.int64 or v.ndim != 1]
        if bad:
            raise DoriError(f"mitigation: {path} holds {bad[0]!r}, not a list of neuron indices")
        return cls(results, meta["layers"], config, threshold, meta.get("refined", True))

    def with_scope(self, scope: str) -> NeMo:
        other = NeMo(self.results, self.layer_names, replace(self.config, scope=scope), self.threshold, self.refined)
        other.made_for = self.made_for
        return other


__all__ = ["NeMo", "NeMoConfig", "ActivationStatistics", "PromptLocalization", "block_neurons", "value_layers",
           "noise_differences", "localize_prompt", "ssim_settings", "statistics_prompts", "activation_statistics"]
