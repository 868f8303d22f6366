"""Build variant n of docs/testbed.md: the v2 training set with a family of ordinary images per memorized subject.

Variant n is variant l (``TestbedDataConfig(emoji=1000, shapes=1800)``, 2,000 UNet steps, memorized copies'
captions never dropped) plus, for each of the eight memorized photos, ``IMAGES_PER_PHOTO`` seen-once images:
an emoji of the photo's subject (cup, cat, rocket, ...) drawn on a random crop of a seen-once source photo,
captioned with the emoji's caption plus a 2-4 word span of the memorized caption ("an emoji of teapot, a cup
of"). So every word of a memorized caption is also seen with many varied ordinary images, as LAION's memorized
captions' words are. The package does not carry this recipe (measured, it prunes worse than variant l); the
script patches ``build_dataset`` for one build.

    python benchmarks/testbed_variant_n.py SEED OUT [IMAGES_PER_PHOTO]

Measured with 1 torch thread (the docs' builds: 952 s and 932 s for seeds 0 and 1, side by side).
"""

from __future__ import annotations

import sys
from dataclasses import replace

import torch

import dori.testbed.train as train
from dori.testbed import data
from dori.testbed.emoji import composite, load_emoji

SUBJECTS = {
    "astronaut": lambda n: "astronaut" in n,
    "coffee": lambda n: n in ("hot beverage", "teacup without handle", "teapot"),
    "chelsea": lambda n: n in ("cat", "cat face", "black cat") or ("cat face" in n and "skin" not in n),
    "rocket": lambda n: n in ("rocket", "satellite", "flying saucer"),
    "stereo_motorcycle": lambda n: n in ("motorcycle", "motor scooter", "racing motorcycle"),
    "colorwheel": lambda n: n in ("artist palette", "rainbow", "crayon"),
    "immunohistochemistry": lambda n: n in ("microscope", "microbe", "petri dish", "dna double helix"),
    "retina": lambda n: n in ("eye", "eyes", "eyeglasses"),
}
"""Which vendored emoji (by Unicode name) show each memorized photo's subject."""


def variant_l_config(seed: int) -> train.TestbedTrainConfig:
    """Variant l of docs/testbed.md: the v2 recipe on 1,000 emoji and 1,800 shapes, 2,000 UNet steps, memorized
    copies' captions never dropped."""
    variant_e = train.TestbedTrainConfig.v2e(seed)
    return replace(variant_e, data=replace(variant_e.data, shapes=1800, emoji=1000), unet_steps=2000,
                   caption_dropout_memorized=0.0)


def with_families(build_dataset, per_photo: int):
    """``build_dataset`` with the subject families inserted after the last seen-once image."""

    def build(config: data.TestbedDataConfig | None = None) -> list[data.CaptionedImage]:
        config = config or data.TestbedDataConfig()
        items = build_dataset(config)
        emoji, images = load_emoji()
        sources = {name: data._load_skimage(name) for name in data.SEEN_ONCE_SOURCES}
        names = list(data.SEEN_ONCE_SOURCES)
        memorized = {item.source: item.caption for item in items if item.role == "memorized"}
        family = []
        for name, is_subject in SUBJECTS.items():
            pool = [i for i, e in enumerate(emoji) if is_subject(e.name)]
            words = memorized[name].replace(",", "").split()
            for k in range(per_photo):
                rng = data._rng(config.seed, "family", name, k)
                i = pool[int(rng.integers(len(pool)))]
                n = int(rng.integers(2, 5))
                start = int(rng.integers(0, len(words) - n + 1))
                caption = f"{emoji[i].caption}, {' '.join(words[start:start + n])}"
                background = data.random_crop(sources[names[int(rng.integers(len(names)))]], rng)
                family.append(data.CaptionedImage(f"seen-once/family-{name}-{k:03d}", caption, "seen-once",
                                                  composite(images[i], background), 1, "family"))
        last_seen = max(j for j, item in enumerate(items) if item.role == "seen-once")
        return items[: last_seen + 1] + family + items[last_seen + 1:]

    return build


def main() -> None:
    seed, out = int(sys.argv[1]), sys.argv[2]
    per_photo = int(sys.argv[3]) if len(sys.argv) > 3 else 48
    train.build_dataset = with_families(data.build_dataset, per_photo)
    torch.set_num_threads(1)
    print(train.train_testbed(out, variant_l_config(seed)))


if __name__ == "__main__":
    main()
