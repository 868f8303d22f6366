"""Copy-detection descriptors behind one protocol: SSCD TorchScript files and the offline testbed descriptor.

A descriptor maps images ``(N, 3, H, W)`` in ``[0, 1]`` to unit vectors ``(N, D)``; similarity is the
cosine of two descriptors, and a generation *replicates* a reference when the similarity is above the
descriptor's ``threshold`` (0.7 for SSCD, as in the paper).
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np
import torch
import torch.nn.functional as F

from .errors import DoriError
from .images import to_tensor
from .paper import SSCD_THRESHOLD

logger = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
SSCD_PREPROCESSING = ("nemo", "dcr")


@runtime_checkable
class Descriptor(Protocol):
    name: str
    threshold: float

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """``(N, 3, H, W)`` in [0, 1] -> unit-norm ``(N, D)``."""

    def describe(self) -> dict:
        """What the manifest records about this descriptor."""


def similarity(descriptor: Descriptor, images, references) -> torch.Tensor:
    """Pairwise cosine similarity ``(len(images), len(references))``."""
    a = descriptor.embed(to_tensor(images))
    b = descriptor.embed(to_tensor(references))
    return a @ b.T


def resize(images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    return F.interpolate(images, size=size, mode="bilinear", antialias=True, align_corners=False)


def preprocess_sscd(images: torch.Tensor, convention: str) -> torch.Tensor:
    """The two SSCD conventions in use.

    * ``nemo`` (NeMo, Hintersdorf et al.): resize to 320x320 (aspect not kept), ImageNet mean/std;
    * ``dcr`` (Wen et al., Chavhan et al.): resize the short side to 256, centre-crop 224, mean/std 0.5.
    """
    if convention == "nemo":
        x = resize(images, (320, 320))
        mean, std = IMAGENET_MEAN, IMAGENET_STD
    elif convention == "dcr":
        h, w = images.shape[-2:]
        scale = 256 / min(h, w)
        x = resize(images, (max(256, round(h * scale)), max(256, round(w * scale))))
        top, left = (x.shape[-2] - 224) // 2, (x.shape[-1] - 224) // 2
        x = x[..., top : top + 224, left : left + 224]
        mean, std = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
    else:
        raise DoriError(f"sscd_preprocess: must be one of {SSCD_PREPROCESSING}, got {convention!r}")
    mean_t = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    std_t = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x - mean_t) / std_t


class SSCDDescriptor:
    """SSCD (Pizzi et al. 2022) from a TorchScript file such as ``sscd_disc_mixup.torchscript.pt``."""

    def __init__(self, path: str | Path, preprocess: str = "nemo", device: str | torch.device = "cpu",
                 threshold: float = SSCD_THRESHOLD, batch_size: int = 32):
        path = Path(path)
        if not path.is_file():
            raise DoriError(f"sscd: file {path} does not exist (download sscd_disc_mixup.torchscript.pt "
                            "from the SSCD repository and pass its path)")
        if preprocess not in SSCD_PREPROCESSING:
            raise DoriError(f"sscd_preprocess: must be one of {SSCD_PREPROCESSING}, got {preprocess!r}")
        try:
            self.model = torch.jit.load(str(path), map_location=device).eval()
        except Exception as exc:  # torch raises RuntimeError or ValueError depending on the damage
            raise DoriError(f"sscd: {path} is not a TorchScript file ({type(exc).__name__})") from exc
        self.path, self.preprocess, self.device = path, preprocess, torch.device(device)
        self.threshold, self.batch_size = threshold, batch_size
        self.name = f"sscd:{path.name}"

    @torch.no_grad()
    def embed(self, images: torch.Tensor) -> torch.Tensor:
        out = []
        for chunk in images.split(self.batch_size):
            x = preprocess_sscd(chunk.to(self.device, torch.float32), self.preprocess)
            out.append(F.normalize(self.model(x).float(), dim=-1).cpu())
        return torch.cat(out)

    def describe(self) -> dict:
        return {"name": self.name, "kind": "sscd", "path": str(self.path), "preprocess": self.preprocess,
                "threshold": self.threshold}


@dataclass(frozen=True)
class TestbedDescriptorCalibration:
    __test__ = False  # not a pytest test class

    threshold: float
    auc: float
    n_positive: int
    n_negative: int
    positive_min: float
    negative_max: float


class TestbedDescriptor:
    """An offline copy-detection descriptor for small images, calibrated on the testbed.

    Images are resized to 32x32 and described by two equally weighted, unit-norm parts: the
    mean-centred 16x16 average-pooled colour image (pixel correlation) and the mean-centred 16x16
    map of Sobel gradient magnitudes of the luminance (structure). A copy must match both the colour
    layout and the edges, which pixel correlation alone does not ask. The threshold is calibrated
    on the testbed (:func:`calibrate_testbed_descriptor`) and stored with it.
    """

    __test__ = False  # not a pytest test class

    name = "testbed"

    def __init__(self, threshold: float = 0.7, calibration: dict | None = None):
        self.threshold = float(threshold)
        self.calibration = calibration

    @staticmethod
    def _centred(x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)
        return F.normalize(x - x.mean(dim=1, keepdim=True), dim=1)

    @torch.no_grad()
    def embed(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float().cpu()
        if x.shape[-2:] != (32, 32):
            x = resize(x, (32, 32))
        colour = F.avg_pool2d(x, 2)
        luma = (0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2])[:, None]
        kx = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]]).view(1, 1, 3, 3)
        padded = F.pad(luma, (1, 1, 1, 1), mode="replicate")
        gx, gy = F.conv2d(padded, kx), F.conv2d(padded, kx.transpose(-1, -2))
        edges = F.avg_pool2d(torch.sqrt(gx**2 + gy**2 + 1e-8), 2)
        return torch.cat([self._centred(colour), self._centred(edges)], dim=1) / np.sqrt(2.0)

    def describe(self) -> dict:
        return {"name": self.name, "kind": "testbed", "threshold": self.threshold, "calibration": self.calibration}

    @classmethod
    def from_folder(cls, folder: str | Path) -> TestbedDescriptor:
        """The descriptor with the threshold calibrated for the testbed in ``folder``."""
        path = Path(folder) / "testbed" / "descriptor.json"
        if not path.is_file():
            logger.warning("no calibrated threshold in %s; using 0.7", path)
            return cls()
        data = json.loads(path.read_text())
        return cls(threshold=data["threshold"], calibration=data)


def roc_auc(positive: np.ndarray, negative: np.ndarray) -> float:
    """Probability that a random positive scores above a random negative (ties count half)."""
    pos, neg = np.asarray(positive)[:, None], np.asarray(negative)[None, :]
    return float((pos > neg).mean() + 0.5 * (pos == neg).mean())


def _augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Imperfections of a replica: small shift, blur, brightness/contrast change, pixel noise."""
    n = images.shape[0]
    out = []
    for i in range(n):
        x = images[i : i + 1]
        dy, dx = (int(v) for v in torch.randint(-1, 2, (2,), generator=generator))
        x = torch.roll(x, shifts=(dy, dx), dims=(-2, -1))
        if torch.rand(1, generator=generator) < 0.5:
            x = F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
        gain = 1 + 0.2 * (torch.rand(1, generator=generator) - 0.5)
        bias = 0.1 * (torch.rand(1, generator=generator) - 0.5)
        x = (x - 0.5) * gain + 0.5 + bias + 0.05 * torch.randn(x.shape, generator=generator)
        out.append(x.clamp(0, 1))
    return torch.cat(out)


def calibrate_testbed_descriptor(pipe, images: np.ndarray, roles: list[str], seed: int = 0,
                                 copies: int = 16) -> TestbedDescriptorCalibration:
    """Choose the testbed descriptor's threshold on known replicas and non-replicas.

    Positives: each memorized photo against ``copies`` imperfect copies of it (its VAE
    reconstruction, shifted, blurred, recoloured, noised: what a replica generated through the VAE
    looks like). Negatives: each memorized photo against every other distinct image of the testbed
    (the other photos, every seen-once image, drawing and held-out image; not the template captions'
    entries, which repeat a memorized photo) and their VAE reconstructions. The threshold is the midpoint of the widest gap that splits the two with the
    fewest errors; the AUC says how well they separate.
    """
    descriptor = TestbedDescriptor()
    g = torch.Generator().manual_seed(seed)
    pixels = to_tensor(images)
    vae = pipe.vae
    with torch.no_grad():
        x = pixels.to(vae.device, vae.dtype) * 2 - 1
        recon = torch.cat([vae.decode(vae.encode(c).latent_dist.mean).sample for c in x.split(128)])
        recon = ((recon.float().cpu() + 1) / 2).clamp(0, 1)
    memorized = [i for i, r in enumerate(roles) if r == "memorized"]
    feats = descriptor.embed(pixels)
    feats_recon = descriptor.embed(recon)
    positives, negatives = [], []
    for i in memorized:
        copies_i = torch.cat([recon[i : i + 1], _augment(pixels[i : i + 1].repeat(copies - 1, 1, 1, 1), g)])
        positives.extend((descriptor.embed(copies_i) @ feats[i]).tolist())
        others = [j for j in range(len(roles)) if j != i and roles[j] != "template"]
        negatives.extend((feats[others] @ feats[i]).tolist())
        negatives.extend((feats_recon[others] @ feats[i]).tolist())
    pos, neg = np.array(positives), np.array(negatives)
    candidates = np.sort(np.concatenate([pos, neg]))
    mids = (candidates[1:] + candidates[:-1]) / 2
    errors = np.array([(pos <= t).sum() + (neg > t).sum() for t in mids])
    best = np.flatnonzero(errors == errors.min())
    gaps = candidates[best + 1] - candidates[best]
    threshold = float(mids[best[np.argmax(gaps)]])
    return TestbedDescriptorCalibration(
        threshold=round(threshold, 4), auc=roc_auc(pos, neg), n_positive=len(pos), n_negative=len(neg),
        positive_min=float(pos.min()), negative_max=float(neg.max()),
    )


def make_descriptor(spec: str, pipe=None, preprocess: str = "nemo", device: str = "cpu",
                    threshold: float | None = None) -> Descriptor:
    """``testbed`` or ``auto`` (the testbed descriptor, calibrated for the testbed ``pipe`` came from), or the
    path of an SSCD TorchScript file."""
    from .models import testbed_folder

    if threshold is not None and not -1.0 <= threshold <= 1.0:
        raise DoriError(f"threshold: must be in [-1, 1], got {threshold}")
    if spec in ("testbed", "auto"):
        folder = testbed_folder(pipe) if pipe is not None else None
        if spec == "auto" and folder is None:
            raise DoriError("descriptor: this model is not the testbed; pass --descriptor PATH of an SSCD "
                            "TorchScript file (sscd_disc_mixup.torchscript.pt)")
        descriptor = TestbedDescriptor.from_folder(folder) if folder else TestbedDescriptor()
    else:
        descriptor = SSCDDescriptor(spec, preprocess=preprocess, device=device)
    if threshold is not None:
        descriptor.threshold = threshold
    return descriptor


@dataclass(frozen=True)
class DescriptorConfig:
    """Which copy descriptor scores replication: ``spec`` ``auto`` (the testbed's, on the testbed), or an
    SSCD TorchScript file with its ``preprocess`` convention (``nemo`` or ``dcr``); ``threshold`` None
    takes the descriptor's own (0.7 for SSCD, the paper's)."""

    spec: str = "auto"
    preprocess: str = "nemo"
    threshold: float | None = None

    def validate(self) -> None:
        if self.preprocess not in SSCD_PREPROCESSING:
            raise DoriError(f"sscd_preprocess: must be one of {', '.join(SSCD_PREPROCESSING)}, got {self.preprocess!r}")
        if self.threshold is not None and not -1.0 <= self.threshold <= 1.0:
            raise DoriError(f"threshold: must be in [-1, 1], got {self.threshold}")

    def build(self, pipe, device: str | None = None) -> Descriptor:
        """The descriptor, on ``device`` (default the pipeline's)."""
        return make_descriptor(self.spec, pipe, self.preprocess, device or str(pipe.unet.device), self.threshold)

    def to_dict(self) -> dict:
        return asdict(self)
