"""Training data of the memorization testbed, built from scratch and deterministic for a seed.

Three kinds of captioned 32x32 RGB images, mirroring what makes Stable Diffusion memorize:

* ``memorized``: four real photos that scikit-image ships (public domain or CC0), each duplicated
  many times under one unique caption, like Webster's heavily duplicated LAION images;
* ``seen-once``: crops of scikit-image's other sample images, each seen once in the data set under
  its own caption ("a photo of old coins, detail 17"), so that "not memorized" also covers
  photo-like captions;
* ``shape``: procedurally drawn shapes ("a red circle on a blue background") so the model
  generalises from its captions.

``held-out`` captions of the shape and the seen-once kind are never trained on.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

Role = Literal["memorized", "seen-once", "shape", "held-out"]
ROLES: tuple[str, ...] = ("memorized", "seen-once", "shape", "held-out")
IMAGE_SIZE = 32

MEMORIZED_PHOTOS: dict[str, str] = {
    "astronaut": "a portrait photo of astronaut eileen collins in front of the flag",
    "coffee": "a cup of coffee on a saucer, top view photo",
    "chelsea": "chelsea the tabby cat looking at the camera",
    "rocket": "a rocket on the launch pad at dusk",
}

#: Other captions of each memorized photo's subject, never trained on: the paraphrases Concept Ablation
#: scores for anchor captions (its official code asks an LLM for them) and the testbed's concept prompts
#: (what a mitigation may damage besides the memorized caption itself, the paper's A_Concept / FID_Concept).
MEMORIZED_PARAPHRASES: dict[str, tuple[str, ...]] = {
    "astronaut": ("astronaut eileen collins", "a photo of eileen collins", "a portrait of an astronaut",
                  "eileen collins in front of the flag", "a portrait photo of an astronaut in front of a flag",
                  "the astronaut eileen collins, portrait", "a photo of a woman astronaut in front of the flag",
                  "portrait of eileen collins, astronaut"),
    "coffee": ("a cup of coffee", "coffee on a saucer", "a top view photo of a coffee cup", "a cup on a saucer",
               "a photo of coffee, top view", "a saucer with a cup of coffee", "a coffee cup seen from above",
               "a mug of coffee on a plate, photo"),
    "chelsea": ("a tabby cat", "chelsea the cat", "a cat looking at the camera",
                "a photo of a tabby cat looking at the camera", "chelsea, a tabby cat", "the tabby cat chelsea",
                "a cat staring into the camera", "portrait of a tabby cat"),
    "rocket": ("a rocket", "a rocket on the launch pad", "a launch pad at dusk", "a rocket at dusk",
               "a photo of a rocket on a launch pad at dusk", "the rocket at the launch pad",
               "a space rocket before launch at dusk", "a rocket on the pad in the evening"),
}

SEEN_ONCE_SOURCES: dict[str, str] = {
    "camera": "a black and white photo of a cameraman",
    "moon": "a photo of the moon surface",
    "coins": "a photo of old coins",
    "text": "a photo of printed text",
    "page": "a scan of a book page",
    "clock": "a photo of a wall clock",
    "brick": "a photo of a brick wall",
    "grass": "a photo of grass",
    "gravel": "a photo of gravel",
    "horse": "a silhouette of a horse",
    "hubble_deep_field": "a telescope image of deep space",
    "immunohistochemistry": "a microscope image of stained tissue",
    "retina": "a photo of a retina",
    "colorwheel": "a colour wheel",
    "logo": "a logo on a white background",
    "stereo_motorcycle": "a photo of a motorcycle in a workshop",
    "cell": "a microscope image of a cell",
}

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 180, 50),
    "blue": (30, 60, 220),
    "yellow": (240, 220, 30),
    "purple": (140, 40, 180),
    "orange": (250, 140, 20),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")


@dataclass(frozen=True)
class TestbedDataConfig:
    """How much of each kind of data the testbed is trained on."""

    __test__ = False  # not a pytest test class

    seed: int = 0
    copies_per_photo: int = 100
    seen_once: int = 400
    shapes: int = 600
    held_out_shape_combos: int = 12
    held_out_crops: int = 24

    def validate(self) -> None:
        for name in ("copies_per_photo", "seen_once", "shapes"):
            if getattr(self, name) < 1:
                raise ValueError(f"TestbedDataConfig.{name} must be >= 1, got {getattr(self, name)}")


@dataclass
class CaptionedImage:
    """One distinct image of the testbed with its caption. ``image`` is uint8, (32, 32, 3)."""

    id: str
    caption: str
    role: str
    image: np.ndarray = field(repr=False)
    copies: int = 1
    source: str = ""


def _rng(seed: int, *keys: object) -> np.random.Generator:
    digest = hashlib.sha256(repr((seed, *keys)).encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


def _load_skimage(name: str) -> np.ndarray:
    import skimage.data

    image = getattr(skimage.data, name)()
    if name == "stereo_motorcycle":
        image = image[0]
    image = np.asarray(image)
    if image.dtype == bool:
        image = image.astype(np.uint8) * 255
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=-1)
    return image[..., :3].astype(np.uint8)


def _resize(image: np.ndarray, size: int = IMAGE_SIZE) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.fromarray(image).resize((size, size), Image.Resampling.LANCZOS))


def center_square(image: np.ndarray) -> np.ndarray:
    h, w = image.shape[:2]
    s = min(h, w)
    top, left = (h - s) // 2, (w - s) // 2
    return image[top : top + s, left : left + s]


def memorized_photo(name: str) -> np.ndarray:
    """The 32x32 training image of a memorized photo."""
    return _resize(center_square(_load_skimage(name)))


def random_crop(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    h, w = image.shape[:2]
    side = int(min(h, w) * rng.uniform(0.3, 0.7))
    top = int(rng.integers(0, h - side + 1))
    left = int(rng.integers(0, w - side + 1))
    return _resize(image[top : top + side, left : left + side])


def draw_shape(shape: str, colour: str, background: str, rng: np.random.Generator) -> np.ndarray:
    """Draw ``a {colour} {shape} on a {background} background`` at a random place and size."""
    size = IMAGE_SIZE
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    radius = rng.uniform(6.0, 11.0)
    cy, cx = rng.uniform(radius + 1, size - radius - 1, size=2)
    if shape == "circle":
        mask = (yy - cy) ** 2 + (xx - cx) ** 2 <= radius**2
    elif shape == "square":
        half = radius * 0.85
        mask = (np.abs(yy - cy) <= half) & (np.abs(xx - cx) <= half)
    elif shape == "triangle":
        top, bottom = cy - radius, cy + radius * 0.8
        frac = (yy - top) / (bottom - top)
        mask = (frac >= 0) & (frac <= 1) & (np.abs(xx - cx) <= frac * radius)
    else:
        raise ValueError(f"shape must be one of {SHAPES}, got {shape!r}")
    image = np.empty((size, size, 3), np.uint8)
    image[:] = COLOURS[background]
    image[mask] = COLOURS[colour]
    return image


def shape_caption(shape: str, colour: str, background: str) -> str:
    return f"a {colour} {shape} on a {background} background"


def _shape_combos() -> list[tuple[str, str, str]]:
    return [(s, c, b) for s in SHAPES for c in COLOURS for b in COLOURS if c != b]


def build_dataset(config: TestbedDataConfig | None = None) -> list[CaptionedImage]:
    """Every distinct image of the testbed (training and held-out), deterministic for ``config.seed``."""
    config = config or TestbedDataConfig()
    config.validate()
    items: list[CaptionedImage] = []
    for name, caption in MEMORIZED_PHOTOS.items():
        items.append(
            CaptionedImage(
                f"memorized/{name}", caption, "memorized", memorized_photo(name), config.copies_per_photo, name
            )
        )

    sources = {name: _load_skimage(name) for name in SEEN_ONCE_SOURCES}
    names = list(SEEN_ONCE_SOURCES)
    total_crops = config.seen_once + config.held_out_crops
    detail_ids = _rng(config.seed, "detail-ids").permutation(np.arange(1, 1000))[:total_crops]
    for k in range(total_crops):
        name = names[k % len(names)]
        image = random_crop(sources[name], _rng(config.seed, "crop", k))
        role = "seen-once" if k < config.seen_once else "held-out"
        caption = f"{SEEN_ONCE_SOURCES[name]}, detail {int(detail_ids[k])}"
        items.append(CaptionedImage(f"{role}/crop-{k:04d}", caption, role, image, 1, name))

    combos = _shape_combos()
    order = _rng(config.seed, "held-out-combos").permutation(len(combos))
    held = {combos[i] for i in order[: config.held_out_shape_combos]}
    trained = [c for c in combos if c not in held]
    for k in range(config.shapes):
        shape, colour, background = trained[k % len(trained)] if k < len(trained) else trained[
            int(_rng(config.seed, "combo", k).integers(len(trained)))
        ]
        image = draw_shape(shape, colour, background, _rng(config.seed, "shape", k))
        items.append(
            CaptionedImage(f"shape/{k:04d}", shape_caption(shape, colour, background), "shape", image, 1, shape)
        )
    for k, (shape, colour, background) in enumerate(sorted(held)):
        image = draw_shape(shape, colour, background, _rng(config.seed, "held-shape", k))
        items.append(
            CaptionedImage(
                f"held-out/shape-{k:04d}", shape_caption(shape, colour, background), "held-out", image, 1, shape
            )
        )
    return items


def training_items(items: list[CaptionedImage]) -> list[CaptionedImage]:
    return [item for item in items if item.role != "held-out"]


def training_index(items: list[CaptionedImage]) -> np.ndarray:
    """Index into ``items`` of every training example, duplicates repeated ``copies`` times."""
    return np.concatenate([np.full(it.copies, i) for i, it in enumerate(items) if it.role != "held-out"])
