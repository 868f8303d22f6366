"""Utility of a (mitigated or fine-tuned) model: does it still make good images for ordinary captions?

* FID through torchmetrics, with the feature extractor passed in:
  :class:`InceptionFeatures` wraps the user's local TorchScript Inception-v3 (the
  ``inception-2015-12-05.pt`` file that clean-fid and StyleGAN use; nothing is downloaded), and
  :class:`LatentFeatures` uses a frozen VAE encoder (offline; the testbed's FID, see below);
* CLIP score (torchmetrics' definition, computed with transformers) on a local ``CLIPModel`` folder;
* :func:`denoising_loss`: the diffusion loss on fixed (noise, t) draws of retain pairs, comparable
  across models because every draw is keyed by the pair's index.
* :func:`testbed_utility_blocks` and :func:`paired_spread`: the testbed's utility figures over disjoint
  blocks of generation seeds, and how far a mitigated model lies from the unmitigated one on the same
  blocks against the figures' own seed-to-seed noise.

On the testbed no Inception or CLIP weights exist; its FID uses the *original* testbed VAE's
posterior means (4 x 8 x 8 = 256 features) as the feature extractor: frozen, the same for every model
compared, and trained on the testbed's images. Values are not comparable with Inception FIDs.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from .errors import DoriError

if TYPE_CHECKING:
    from .generation import GenerationConfig
    from .prompts import PromptRecord, PromptSet


class InceptionFeatures(torch.nn.Module):
    """2048-d pool features of a TorchScript Inception-v3 (clean-fid / StyleGAN convention: input
    ``(N, 3, 299, 299)`` in [0, 255], ``model(x, return_features=True)``)."""

    def __init__(self, path: str | Path):
        super().__init__()
        path = Path(path)
        if not path.is_file():
            raise DoriError(f"inception: no file {path} (give the TorchScript inception-2015-12-05.pt that clean-fid "
                            "and StyleGAN use; it cannot be downloaded here)")
        try:
            self.model = torch.jit.load(str(path), map_location="cpu").eval()
        except RuntimeError as exc:
            raise DoriError(f"inception: {path} is not a TorchScript file ({exc.__class__.__name__})") from exc

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = torch.nn.functional.interpolate(images.float(), size=(299, 299), mode="bilinear", align_corners=False)
        return self.model(x * 255.0, return_features=True).float()


class LatentFeatures(torch.nn.Module):
    """Flattened VAE posterior means as FID features (offline; used on the testbed)."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        size = self.vae.config.sample_size
        x = images.float()
        if x.shape[-1] != size:
            x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", antialias=True)
        return self.vae.encode((x * 2 - 1).to(self.vae.dtype)).latent_dist.mean.flatten(1).float()


def fid(real: torch.Tensor, fake: torch.Tensor, features: torch.nn.Module) -> float:
    """Fréchet distance between the feature statistics of two image sets ``(N, 3, H, W)`` in [0, 1]."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    if len(real) < 2 or len(fake) < 2:
        raise DoriError("fid: need at least 2 images on each side")
    # every image is this process's own: no gathering across the processes of a launched run
    metric = FrechetInceptionDistance(feature=features, normalize=True, sync_on_compute=False)
    metric.update(real.float(), real=True)
    metric.update(fake.float(), real=False)
    return float(metric.compute())


@torch.no_grad()
def clip_score(images: torch.Tensor, captions: list[str], model: str | Path, batch_size: int = 64) -> float:
    """Mean CLIP score, ``100 * max(cos(image, caption), 0)`` (Hessel et al.; torchmetrics' definition), of
    images ``(N, 3, H, W)`` in [0, 1] and their captions, with a local ``CLIPModel`` folder (e.g. a saved
    openai/clip-vit-base-patch32 with its processor). Computed with transformers directly: torchmetrics'
    CLIPScore accepts only hub names and breaks on transformers 5's feature outputs."""
    from transformers import CLIPModel, CLIPProcessor

    folder = Path(model)
    if not (folder / "config.json").is_file():
        raise DoriError(f"clip_model: {folder} has no config.json (give a local CLIPModel folder saved with "
                        "save_pretrained; hub downloads are not possible here)")
    if len(images) != len(captions):
        raise DoriError(f"captions: need one per image, got {len(captions)} for {len(images)}")
    clip = CLIPModel.from_pretrained(folder).eval()
    processor = CLIPProcessor.from_pretrained(folder)
    scores = []
    for start in range(0, len(images), batch_size):
        chunk = images[start : start + batch_size].clamp(0, 1)
        pixels = [(img.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8) for img in chunk]
        inputs = processor(text=list(captions[start : start + batch_size]), images=pixels, return_tensors="pt",
                           padding=True, truncation=True)
        out = clip(**inputs)
        image, text = out.image_embeds, out.text_embeds
        cos = (image * text).sum(-1) / (image.norm(dim=-1) * text.norm(dim=-1)).clamp_min(1e-12)
        scores.append(100 * cos.clamp_min(0))
    return float(torch.cat(scores).mean())


@torch.no_grad()
def denoising_loss(pipe, latents: torch.Tensor, embeds: torch.Tensor, *, pairs: int = 4, seed: int = 0) -> float:
    """Mean diffusion loss of ``latents`` under ``embeds`` on draws keyed by (seed, index): the same
    draws for every model, so a lower value means the model denoises these pairs better."""
    from .attack.parts import DiffusionLoss
    from .seeding import item_generator

    loss = DiffusionLoss(pipe, pairs)
    values = []
    for start in range(0, len(latents), 64):
        idx = range(start, min(len(latents), start + 64))
        values.append(loss(embeds[idx.start:idx.stop], latents[idx.start:idx.stop],
                           [item_generator("utility", seed, i) for i in idx]))
    return float(torch.cat(values).mean())


def utility_shapes(pipe, num_images: int = 60) -> tuple[PromptSet, list[PromptRecord]]:
    """The shape captions the utility stage draws: ``num_images`` of ``testbed:shape`` spread evenly over the
    set, as ``(prompt set, chosen records)``."""
    from .prompts import prompts_for

    shape_set = prompts_for(pipe, "testbed:shape")
    shapes = shape_set.records
    pick = np.linspace(0, len(shapes) - 1, min(num_images, len(shapes))).round().astype(int)
    return shape_set, [shapes[i] for i in pick]


def testbed_utility(pipe, *, original_vae=None, num_images: int = 60, seed: int = 0, failures: bool = False,
                    generation: GenerationConfig | None = None) -> dict:
    """The testbed's utility bundle for one model: shape-colour accuracy of generated shape captions, FID
    (VAE-latent features) of those generations against the training shapes, and the retain denoising loss.
    ``failures``: also how the shape generations miss their colours (``shape_`` + each failure of
    :data:`dori.testbed.shape_colours.OUTCOMES`, and ``shape_confusions``; :func:`colour_failures`).
    ``generation``: the sampler settings of the shape generations (None: the defaults, as in the demo)."""
    from .generation import generate
    from .images import to_tensor
    from .models import encode_images, encode_prompts
    from .prompts import prompts_for
    from .testbed.shape_colours import colour_failures

    shape_set, chosen = utility_shapes(pipe, num_images)
    real = to_tensor(np.stack([shape_set.references[r.id] for r in chosen]))
    gens = generate(pipe, [seed + i for i in range(len(chosen))], [r.prompt for r in chosen], config=generation)
    features = LatentFeatures(original_vae if original_vae is not None else pipe.vae)
    seen = prompts_for(pipe, "testbed:seen-once")
    retain = [(r.prompt, shape_set.references[r.id]) for r in chosen] + \
             [(r.prompt, seen.references[r.id]) for r in seen.records[: len(chosen)]]
    latents = encode_images(pipe, to_tensor(np.stack([img for _, img in retain])))
    embeds = encode_prompts(pipe, [p for p, _ in retain])
    missed = colour_failures(gens.images, [r.prompt for r in chosen])
    values = {"shape_accuracy": missed.pop("right"),
              "fid_vae": fid(real, gens.images, features),
              "retain_loss": denoising_loss(pipe, latents, embeds, seed=seed),
              "utility_images": len(chosen)}
    if failures:
        values.update({f"shape_{k}": v for k, v in missed.items()})
    return values


def testbed_utility_blocks(pipe, *, original_vae=None, blocks: int = 10, num_images: int = 60, seed: int = 0,
                           stride: int = 1000, failures: bool = False,
                           generation: GenerationConfig | None = None) -> list[dict]:
    """:func:`testbed_utility` over ``blocks`` disjoint blocks of generation seeds: block ``b`` draws the same
    ``num_images`` shape captions with seeds ``seed + b * stride + i``, so block 0 is the demo's utility
    stage and the spread of a figure over the blocks is its seed-to-seed noise (compare two models with
    :func:`paired_spread`). One dict per block, as :func:`testbed_utility` returns (with ``failures``), plus its
    ``seed``."""
    if blocks < 1:
        raise DoriError(f"blocks: {blocks} is not allowed; give at least 1")
    if stride < num_images:
        raise DoriError(f"stride: {stride} is smaller than num_images ({num_images}), so the blocks' seeds "
                        f"would overlap; give a stride of at least {num_images}")
    return [{**testbed_utility(pipe, original_vae=original_vae, num_images=num_images, seed=seed + b * stride,
                               failures=failures, generation=generation), "seed": seed + b * stride}
            for b in range(blocks)]


def paired_spread(base: list[float], other: list[float], *, level: float = 0.95) -> dict:
    """How far ``other`` lies from ``base`` when both were measured on the same blocks (the same captions
    and seeds, :func:`testbed_utility_blocks`): each side's mean and standard deviation over the blocks,
    the blocks' differences ``other - base`` (mean, standard deviation: the noise of a comparison on one
    block), and a Student-t interval for the mean difference at ``level``."""
    from scipy import stats

    a, b = np.asarray(base, dtype=float), np.asarray(other, dtype=float)
    if a.shape != b.shape or a.ndim != 1 or len(a) < 2:
        raise DoriError(f"paired_spread: base and other need the same number of blocks, at least 2 "
                        f"(got {a.shape} and {b.shape})")
    if not 0 < level < 1:
        raise DoriError(f"level: {level} is not allowed; give a share between 0 and 1")
    diff = b - a
    sd = float(diff.std(ddof=1))
    half = float(stats.t.ppf(0.5 + level / 2, len(diff) - 1)) * sd / np.sqrt(len(diff))
    mean = float(diff.mean())
    return {"blocks": len(diff), "base_mean": float(a.mean()), "base_sd": float(a.std(ddof=1)),
            "other_mean": float(b.mean()), "other_sd": float(b.std(ddof=1)),
            "diff_mean": mean, "diff_sd": sd, "level": level, "diff_low": mean - half, "diff_high": mean + half}


def testbed_concept(pipe, *, baseline: torch.Tensor | None = None, original_vae=None, seed: int = 0,
                    num_seeds: int = 2) -> tuple[dict, torch.Tensor]:
    """The testbed's counterpart of the paper's concept damage (A_Concept, FID_Concept; Wanda at 10%): what
    the model still draws for *other* captions of each memorized photo's subject (``testbed:concept``, the
    shipped paraphrases, never trained on).

    ``a_concept``: share of their generations whose closest memorized photo (by the testbed's copy
    descriptor) is their own subject's, a 4-way nearest-subject accuracy (chance 0.25). On the testbed a
    subject's only images are its memorized photo, so drawing the subject means drawing toward it.
    ``fid_concept``: FID with the original VAE's latents as features between these generations and
    ``baseline`` (the unmitigated model's generations of the same captions with other seeds; for the
    unmitigated model itself this is the seed-to-seed floor). Returns the figures and the generations.
    """
    from .descriptors import DescriptorConfig
    from .generation import generate
    from .memorization import score_images
    from .prompts import prompts_for

    concept = prompts_for(pipe, "testbed:concept")
    records = [r for r in concept.records for _ in range(num_seeds)]
    seeds = [seed + k for _ in concept.records for k in range(num_seeds)]
    images = generate(pipe, seeds, [r.prompt for r in records]).images
    scored = score_images(DescriptorConfig().build(pipe), images, [concept.references[r.id] for r in records],
                          concept.gallery)
    subjects = [r.id.split("/")[1].rsplit("-", 1)[0] for r in records]
    figures = {"a_concept": float(np.mean([m == s for m, s in zip(scored.gallery_match, subjects, strict=True)])),
               "concept_images": len(records)}
    if baseline is not None:
        figures["fid_concept"] = fid(baseline, images, LatentFeatures(original_vae if original_vae is not None else pipe.vae))
    return figures, images
