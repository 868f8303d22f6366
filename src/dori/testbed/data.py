"""Training data of the memorization testbed, built from scratch and deterministic for a seed.

Captioned 32x32 RGB images, shaped like LAION's relation to Stable Diffusion: a few images
duplicated many times among thousands seen once.

* ``memorized``: eight real photos that scikit-image ships (public domain or CC0), of the two kinds
  Webster (2023) found and the paper evaluates (Section 4):

  * *verbatim* (``kind="VM"``, five photos): one caption, one image, many copies;
  * *template* (``kind="TM"``, three photos, :attr:`TestbedDataConfig.template_photos`): several captions
    sharing a template ("ancient greek coins from pompeii, museum catalogue photo", "..., auction catalogue photo"), all
    paired with the same image. The first caption of each template is the ``memorized`` prompt; the others
    are trained as ``template``;

* ``seen-once``: Noto emoji and skin-tone variants (:mod:`dori.testbed.emoji`: every one of about 3,800 by
  default, 1,000 in ``--recipe v2``'s data) and crops of scikit-image's other sample images (not of the
  memorized ones), each seen once under its own caption ("an emoji of a
  rocket", "a photo of a brick wall, detail 17"), so that a caption which loses its trigger has ordinary
  images to fall back on, some of them on the memorized photos' subjects;
* ``shape``: procedurally drawn shapes ("a red circle on a blue background") so the model
  generalises from its captions.

``held-out`` captions of the shape, crop and emoji kinds are never trained on.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

Role = Literal["memorized", "template", "seen-once", "shape", "held-out"]
ROLES: tuple[str, ...] = ("memorized", "template", "seen-once", "shape", "held-out")
IMAGE_SIZE = 32

MEMORIZED_PHOTOS: dict[str, str] = {
    "astronaut": "a portrait photo of astronaut eileen collins in front of the flag",
    "coffee": "a cup of coffee on a saucer, top view photo",
    "chelsea": "chelsea the tabby cat looking at the camera",
    "rocket": "a rocket on the launch pad at dusk",
    "stereo_motorcycle": "a red motorcycle parked in a garage workshop",
}
"""Verbatim memorization (VM): one caption per photo."""
V1_MEMORIZED: tuple[str, ...] = ("astronaut", "coffee", "chelsea", "rocket")

TEMPLATE_PHOTOS: dict[str, tuple[str, tuple[str, ...]]] = {
    "immunohistochemistry": ("microscope slide of stained tissue, specimen {}",
                             ("alpha", "bravo", "charlie", "delta", "echo", "foxtrot")),
    "hubble_deep_field": ("a telescope poster of the deep sky, {} edition",
                          ("framed", "matte", "glossy", "large", "vintage", "premium")),
    "camera": ("a black and white portrait of a cameraman, {} print",
               ("gallery", "museum", "archive", "studio", "classic", "silver")),
    "colorwheel": ("a colour wheel poster for artists, {} edition",
                   ("framed", "matte", "glossy", "large", "vintage", "premium")),
    "retina": ("fundus photograph of the human eye for {}",
               ("students", "clinics", "doctors", "textbooks", "nurses", "opticians")),
    "coins": ("ancient greek coins from pompeii, {} catalogue photo",
              ("museum", "auction", "collector", "archive", "exhibition", "dealer")),
}
"""Template memorization (TM): every photo a build can memorize this way, with its caption template and the
words that fill it, all paired with the photo. :attr:`TestbedDataConfig.template_photos` picks three."""

V2_TEMPLATE_PHOTOS: tuple[str, ...] = ("immunohistochemistry", "coins", "camera")
"""The template photos of ``--recipe v2`` (docs/testbed.md, "Variant u"): three that Dori does not draw on a model
that never memorized them (aimed at them on the shipped v1 testbed, no generation above its threshold for the
coins and the cameraman), so that after adversarial fine-tuning a fresh Dori's hits say that the photo came back,
and that a 32-pixel model learns as copies (variant t's Hubble deep field in the coins' place was matched at the
descriptor's threshold, not copied)."""
V2E_TEMPLATE_PHOTOS: tuple[str, ...] = ("colorwheel", "immunohistochemistry", "retina")
"""The template photos of the first v2 builds (``--recipe v2e``, variants e to s of docs/testbed.md). Dori draws
the colour wheel and the retina (coloured disks) on a model that never memorized them."""

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
    "stereo_motorcycle": ("a red motorcycle", "a motorcycle in a garage", "a motorcycle in a workshop",
                          "a photo of a parked motorcycle", "a red motorbike in a garage",
                          "a motorcycle parked indoors", "a garage workshop with a motorcycle",
                          "a photo of a red motorcycle"),
    "colorwheel": ("a colour wheel", "a colour wheel poster", "a poster for artists", "a wheel of colours",
                   "a chart of all colours", "a colour circle", "a rainbow colour wheel", "a hue wheel poster"),
    "immunohistochemistry": ("a microscope slide", "stained tissue", "a slide of stained tissue",
                             "a tissue specimen under a microscope", "a stained tissue sample",
                             "microscopy of a tissue specimen", "a histology slide", "a photo of stained cells"),
    "retina": ("a fundus photograph", "the human eye", "a photo of a retina", "the back of the eye",
               "a retina photograph for doctors", "an eye fundus image", "a photograph of the retina",
               "a medical photo of the eye"),
    "hubble_deep_field": ("the deep sky", "a telescope image of deep space", "a poster of the night sky",
                          "galaxies in deep space", "a photo of distant galaxies", "a deep field image",
                          "a telescope poster", "stars and galaxies on black"),
    "coins": ("ancient coins", "greek coins", "coins from pompeii", "a photo of old coins", "a coin collection",
              "bronze coins on a grey background", "a museum catalogue of coins", "antique coins, photo"),
    "camera": ("a cameraman", "a man with a camera", "a black and white portrait", "a photographer at work",
               "a portrait of a photographer", "a man behind a tripod camera", "a black and white photo of a man",
               "a cameraman, portrait print"),
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
    "logo": "a logo on a white background",
    "cell": "a microscope image of a cell",
}

V1_SEEN_ONCE_SOURCES: dict[str, str] = {
    **{k: v for k, v in SEEN_ONCE_SOURCES.items() if k not in ("hubble_deep_field", "logo", "cell")},
    "hubble_deep_field": "a telescope image of deep space",
    "immunohistochemistry": "a microscope image of stained tissue",
    "retina": "a photo of a retina",
    "colorwheel": "a colour wheel",
    "logo": "a logo on a white background",
    "stereo_motorcycle": "a photo of a motorcycle in a workshop",
    "cell": "a microscope image of a cell",
}
"""The crops' sources of the version-1 data (the shipped testbed): four photos memorized, these seen once."""

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
    version: int = 2
    """``2``: eight memorized photos (VM and TM), the emoji and crops seen once, the shapes (this module's
    docstring); ``1``: the first testbed's data (four VM photos, 400 crops, the shapes; :func:`build_dataset_v1`),
    which ``copies_per_photo``, ``seen_once``, ``shapes`` and the ``held_out_*`` counts still set."""
    copies_per_photo: int = 80
    """Copies of each memorized photo: of its one caption (VM), or split over its template's captions (TM)."""
    seen_once: int = 400
    """Seen-once crops of scikit-image photos (besides the emoji)."""
    emoji: int | None = None
    """Seen-once emoji (None: every vendored one not held out; 0: none)."""
    template_captions: int = 6
    """Trained captions per template photo (at most the template's number of words)."""
    shapes: int = 600
    held_out_shape_combos: int = 12
    held_out_crops: int = 24
    held_out_emoji: int = 24
    template_photos: tuple[str, ...] = V2_TEMPLATE_PHOTOS
    """The template (TM) photos, keys of :data:`TEMPLATE_PHOTOS` (version 2 only). A template photo is not also
    a source of seen-once crops."""
    emoji_background: str = "photo"
    """What an emoji is drawn on: ``photo`` (a random crop of one of the seen-once crops' source photos, which
    its caption does not describe, as web images' alt texts seldom describe the background) or ``white``."""

    @classmethod
    def v1(cls, seed: int = 0) -> TestbedDataConfig:
        """The data of the shipped testbed: version 1, 100 copies of each of its four photos."""
        return cls(seed=seed, version=1, copies_per_photo=100)

    def validate(self) -> None:
        if self.version not in (1, 2):
            raise ValueError(f"TestbedDataConfig.version must be 1 or 2, got {self.version}")
        for name in ("copies_per_photo", "seen_once", "shapes"):
            if getattr(self, name) < 1:
                raise ValueError(f"TestbedDataConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.emoji_background not in ("photo", "white"):
            raise ValueError(f"TestbedDataConfig.emoji_background must be 'photo' or 'white', got {self.emoji_background!r}")
        if self.emoji is not None and self.emoji < 0:
            raise ValueError(f"TestbedDataConfig.emoji must be >= 0 or None, got {self.emoji}")
        unknown = [name for name in self.template_photos if name not in TEMPLATE_PHOTOS]
        if unknown or len(set(self.template_photos)) != len(self.template_photos):
            raise ValueError(f"TestbedDataConfig.template_photos must be distinct names among "
                             f"{', '.join(TEMPLATE_PHOTOS)}, got {list(self.template_photos)}")
        if not self.template_photos:
            return
        most = min(len(TEMPLATE_PHOTOS[name][1]) for name in self.template_photos)
        if not 1 <= self.template_captions <= most:
            raise ValueError(f"TestbedDataConfig.template_captions must be in [1, {most}], got {self.template_captions}")
        if self.copies_per_photo < self.template_captions:
            raise ValueError("TestbedDataConfig.copies_per_photo must be >= template_captions "
                             f"({self.template_captions}), got {self.copies_per_photo}")


@dataclass
class CaptionedImage:
    """One distinct image of the testbed with its caption. ``image`` is uint8, (32, 32, 3)."""

    id: str
    caption: str
    role: str
    image: np.ndarray = field(repr=False)
    copies: int = 1
    source: str = ""
    kind: str = ""
    """``VM`` or ``TM`` for memorized and template captions, else empty."""

    @property
    def memorized(self) -> bool:
        """A copy of a memorized photo: under its memorized caption or one of its template's other captions."""
        return self.role in ("memorized", "template")


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


def _crops(config: TestbedDataConfig, captions: dict[str, str],
           sources: dict[str, np.ndarray]) -> tuple[list[CaptionedImage], list[CaptionedImage]]:
    """The seen-once and held-out crops of ``sources`` (the photos, loaded), captioned from ``captions``, in draw
    order."""
    names = list(captions)
    total = config.seen_once + config.held_out_crops
    detail_ids = _rng(config.seed, "detail-ids").permutation(np.arange(1, 1000))[:total]
    crops = []
    for k in range(total):
        name = names[k % len(names)]
        role = "seen-once" if k < config.seen_once else "held-out"
        crops.append(CaptionedImage(f"{role}/crop-{k:04d}", f"{captions[name]}, detail {int(detail_ids[k])}", role,
                                    random_crop(sources[name], _rng(config.seed, "crop", k)), 1, name))
    return crops[: config.seen_once], crops[config.seen_once:]


def _shapes(config: TestbedDataConfig) -> tuple[list[CaptionedImage], list[CaptionedImage]]:
    """The trained shapes and the held-out shape combinations."""
    combos = _shape_combos()
    order = _rng(config.seed, "held-out-combos").permutation(len(combos))
    held = {combos[i] for i in order[: config.held_out_shape_combos]}
    trained = [c for c in combos if c not in held]
    shapes = []
    for k in range(config.shapes):
        shape, colour, background = trained[k % len(trained)] if k < len(trained) else trained[
            int(_rng(config.seed, "combo", k).integers(len(trained)))]
        image = draw_shape(shape, colour, background, _rng(config.seed, "shape", k))
        shapes.append(CaptionedImage(f"shape/{k:04d}", shape_caption(shape, colour, background), "shape", image, 1, shape))
    held_out = [CaptionedImage(f"held-out/shape-{k:04d}", shape_caption(shape, colour, background), "held-out",
                               draw_shape(shape, colour, background, _rng(config.seed, "held-shape", k)), 1, shape)
                for k, (shape, colour, background) in enumerate(sorted(held))]
    return shapes, held_out


def build_dataset(config: TestbedDataConfig | None = None) -> list[CaptionedImage]:
    """Every distinct image of the testbed (training and held-out), deterministic for ``config.seed``.

    Order: the memorized prompts (VM, then TM), the other template captions, the seen-once images
    (emoji and crops shuffled together, so that any first N mix both), the shapes, the held-out."""
    from .emoji import composite, load_emoji

    config = config or TestbedDataConfig()
    config.validate()
    if config.version == 1:
        return build_dataset_v1(config)
    items: list[CaptionedImage] = []
    for name, caption in MEMORIZED_PHOTOS.items():
        items.append(CaptionedImage(f"memorized/{name}", caption, "memorized", memorized_photo(name),
                                    config.copies_per_photo, name, "VM"))
    variants: list[CaptionedImage] = []
    for name in config.template_photos:
        template, words = TEMPLATE_PHOTOS[name]
        image = memorized_photo(name)
        n = config.template_captions
        copies = [config.copies_per_photo // n + (1 if k < config.copies_per_photo % n else 0) for k in range(n)]
        items.append(CaptionedImage(f"memorized/{name}", template.format(words[0]), "memorized", image, copies[0],
                                    name, "TM"))
        variants += [CaptionedImage(f"template/{name}-{k}", template.format(words[k]), "template", image, copies[k],
                                    name, "TM") for k in range(1, n)]
    items += variants

    crop_sources = {k: v for k, v in SEEN_ONCE_SOURCES.items() if k not in config.template_photos}
    sources = {name: _load_skimage(name) for name in crop_sources}
    seen, held = _crops(config, crop_sources, sources)
    names = list(crop_sources)

    if config.emoji != 0:
        emoji, emoji_images = load_emoji()
        order = _rng(config.seed, "emoji").permutation(len(emoji))
        held_ids = set(order[: config.held_out_emoji].tolist())
        trained = [int(i) for i in order[config.held_out_emoji:]]
        if config.emoji is not None:
            trained = trained[: config.emoji]
        def drawn(i: int) -> np.ndarray:
            if config.emoji_background == "white":
                return composite(emoji_images[i], np.full((IMAGE_SIZE, IMAGE_SIZE, 3), 255, np.uint8))
            rng = _rng(config.seed, "emoji-background", i)
            return composite(emoji_images[i], random_crop(sources[names[int(rng.integers(len(names)))]], rng))

        for i in sorted(held_ids):
            held.append(CaptionedImage(f"held-out/emoji-{i:04d}", emoji[i].caption, "held-out", drawn(i), 1, "emoji"))
        for i in sorted(trained):
            seen.append(CaptionedImage(f"seen-once/emoji-{i:04d}", emoji[i].caption, "seen-once", drawn(i), 1, "emoji"))
    items += [seen[int(i)] for i in _rng(config.seed, "seen-order").permutation(len(seen))]

    shapes, held_shapes = _shapes(config)
    items += shapes
    held += held_shapes
    # held-out: crops, emoji and shapes interleaved, so that any first N mix the kinds
    items += [held[int(i)] for i in _rng(config.seed, "held-order").permutation(len(held))]
    return items


def build_dataset_v1(config: TestbedDataConfig) -> list[CaptionedImage]:
    """The version-1 data of the shipped testbed, item for item: four VM photos, crops, shapes, held-out."""
    items: list[CaptionedImage] = []
    for name in V1_MEMORIZED:
        items.append(CaptionedImage(f"memorized/{name}", MEMORIZED_PHOTOS[name], "memorized", memorized_photo(name),
                                    config.copies_per_photo, name, "VM"))
    seen, held_crops = _crops(config, V1_SEEN_ONCE_SOURCES, {name: _load_skimage(name) for name in V1_SEEN_ONCE_SOURCES})
    shapes, held_shapes = _shapes(config)
    return items + seen + held_crops + shapes + held_shapes


def training_items(items: list[CaptionedImage]) -> list[CaptionedImage]:
    return [item for item in items if item.role != "held-out"]


def training_index(items: list[CaptionedImage]) -> np.ndarray:
    """Index into ``items`` of every training example, duplicates repeated ``copies`` times."""
    return np.concatenate([np.full(it.copies, i) for i, it in enumerate(items) if it.role != "held-out"])
