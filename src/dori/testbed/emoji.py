"""Noto emoji as the testbed's seen-once images: thousands of small pictures, each with its own caption.

Stable Diffusion's memorized images are a tiny, heavily duplicated part of LAION; most of what it
saw, it saw once. A caption whose trigger a mitigation removes then falls back on such ordinary
images. The testbed gets that from Google's Noto emoji (Apache 2.0) as packaged with their names by
the npm package ``emoji-datasource-google`` (MIT): every emoji and skin-tone variant at 32x32 with
its transparency, captioned by its Unicode name ("an emoji of a rocket", "an emoji of waving
hand, medium skin tone").

The package vendors them once (:func:`vendor_emoji`, from the npm tarball) into
``dori/assets/emoji/``: ``noto-emoji-32.png`` (an RGBA atlas, 64 emoji a row, in index order) and
``noto-emoji-32.json`` (name, category, code points per emoji), so a build reads local files only.
Licences: ``dori/assets/emoji/NOTICE.md``.
"""

from __future__ import annotations

import json
import tarfile
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np

ATLAS = "noto-emoji-32.png"
INDEX = "noto-emoji-32.json"
SIZE = 32
COLUMNS = 64
_SHEET = "package/img/google/sheets-clean/32.png"
_CELL = SIZE + 2  # emoji-datasource sheets pad every 32 px emoji by 1 px on each side
SKIN_TONES = {"1F3FB": "light", "1F3FC": "medium-light", "1F3FD": "medium", "1F3FE": "medium-dark", "1F3FF": "dark"}


@dataclass(frozen=True)
class Emoji:
    """One vendored emoji: its caption's subject (Unicode name, lower case), category and code points."""

    name: str
    category: str
    unified: str

    @property
    def caption(self) -> str:
        return f"an emoji of {self.name}"


def _skin_name(name: str, tones: str) -> str:
    words = [SKIN_TONES[t] for t in tones.split("-")]
    if len(words) == 2 and words[0] != words[1]:
        return f"{name}, {words[0]} and {words[1]} skin tones"
    return f"{name}, {words[0]} skin tone"


def vendor_emoji(tarball: str | Path, out: str | Path | None = None) -> Path:
    """Write the atlas and index from ``emoji-datasource-google-<version>.tgz`` (``npm pack
    emoji-datasource-google``) into ``out`` (default: the package's ``assets/emoji``)."""
    from PIL import Image

    out = Path(out) if out is not None else Path(str(resources.files("dori") / "assets" / "emoji"))
    out.mkdir(parents=True, exist_ok=True)
    with tarfile.open(tarball) as tar:
        table = json.load(tar.extractfile("package/emoji.json"))
        sheet = Image.open(tar.extractfile(_SHEET)).convert("RGBA")
        sheet.load()
    entries: list[tuple[dict, int, int]] = []
    for item in sorted(table, key=lambda e: e["sort_order"]):
        if not item.get("has_img_google"):
            continue
        base = {"name": item["name"].lower(), "category": item["category"], "unified": item["unified"]}
        entries.append((base, item["sheet_x"], item["sheet_y"]))
        for tones, variant in sorted(item.get("skin_variations", {}).items()):
            if variant.get("has_img_google"):
                entries.append(({"name": _skin_name(base["name"], tones), "category": item["category"],
                                 "unified": variant["unified"]}, variant["sheet_x"], variant["sheet_y"]))
    rows = -(-len(entries) // COLUMNS)
    atlas = Image.new("RGBA", (COLUMNS * SIZE, rows * SIZE), (0, 0, 0, 0))
    for k, (_, x, y) in enumerate(entries):
        cell = sheet.crop((x * _CELL + 1, y * _CELL + 1, x * _CELL + 1 + SIZE, y * _CELL + 1 + SIZE))
        atlas.paste(cell, ((k % COLUMNS) * SIZE, (k // COLUMNS) * SIZE))
    atlas.save(out / ATLAS, optimize=True)
    (out / INDEX).write_text(json.dumps({"source": Path(tarball).name, "emoji": [e for e, _, _ in entries]}, indent=0))
    return out


def load_emoji() -> tuple[list[Emoji], np.ndarray]:
    """The vendored emoji and their images, uint8 ``(N, 32, 32, 4)`` (RGBA; :func:`composite` puts one on a
    background)."""
    from PIL import Image

    folder = resources.files("dori") / "assets" / "emoji"
    index = json.loads((folder / INDEX).read_text(encoding="utf-8"))
    emoji = [Emoji(**e) for e in index["emoji"]]
    with (folder / ATLAS).open("rb") as handle:
        atlas = np.asarray(Image.open(handle).convert("RGBA"))
    images = np.stack([atlas[(i // COLUMNS) * SIZE:(i // COLUMNS + 1) * SIZE, (i % COLUMNS) * SIZE:(i % COLUMNS + 1) * SIZE]
                       for i in range(len(emoji))])
    return emoji, images


def composite(rgba: np.ndarray, background: np.ndarray) -> np.ndarray:
    """An RGBA emoji over a uint8 RGB background of the same size."""
    alpha = rgba[..., 3:].astype(np.float32) / 255.0
    out = rgba[..., :3].astype(np.float32) * alpha + background.astype(np.float32) * (1.0 - alpha)
    return np.clip(np.round(out), 0, 255).astype(np.uint8)


if __name__ == "__main__":  # python -m dori.testbed.emoji emoji-datasource-google-16.0.0.tgz
    import sys

    vendor_emoji(sys.argv[1])
