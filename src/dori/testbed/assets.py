"""The testbed's own data inside its pipeline folder: ``<pipeline>/testbed/``.

* ``manifest.json``: one entry per distinct image ``{id, caption, role, copies, source, index, kind}``
  (``kind``: ``VM`` / ``TM`` for memorized and template captions, empty otherwise);
* ``images.safetensors``: ``images`` uint8 ``(N, 32, 32, 3)`` in manifest order;
* ``references/<name>.png``: the memorized photos, for people to look at.

``diffusers`` ignores the extra folder, so the pipeline folder still loads with
``StableDiffusionPipeline.from_pretrained`` unchanged.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

TESTBED_VERSION = "2"
SUBFOLDER = "testbed"


@dataclass(frozen=True)
class TestbedEntry:
    __test__ = False  # not a pytest test class

    id: str
    caption: str
    role: str
    copies: int
    source: str
    index: int
    kind: str = ""


def save_testbed_data(folder: str | Path, items, config=None) -> None:
    from PIL import Image

    target = Path(folder) / SUBFOLDER
    (target / "references").mkdir(parents=True, exist_ok=True)
    entries = [
        {"id": it.id, "caption": it.caption, "role": it.role, "copies": it.copies, "source": it.source, "index": i,
         "kind": it.kind}
        for i, it in enumerate(items)
    ]
    manifest = {"version": TESTBED_VERSION, "entries": entries}
    if config is not None:
        manifest["build_config"] = config.to_dict()
        manifest["build_config_hash"] = config.hash()
    (target / "manifest.json").write_text(json.dumps(manifest, indent=1))
    save_file({"images": torch.from_numpy(np.stack([it.image for it in items]))}, str(target / "images.safetensors"))
    for it in items:
        if it.role == "memorized":
            Image.fromarray(it.image).save(target / "references" / f"{it.source}.png")


def is_testbed_folder(folder: str | Path) -> bool:
    return (Path(folder) / SUBFOLDER / "manifest.json").exists()


def has_template_captions(folder: str | Path) -> bool:
    """Whether a testbed folder's data holds template (TM) captions, as a ``dori testbed build --recipe v2``
    folder's does (the shipped v1 testbed's does not)."""
    manifest = json.loads((Path(folder) / SUBFOLDER / "manifest.json").read_text())
    return any(entry["role"] == "template" for entry in manifest["entries"])


def load_testbed_data(folder: str | Path) -> tuple[list[TestbedEntry], np.ndarray]:
    """Return the manifest entries and the uint8 ``(N, 32, 32, 3)`` images of a testbed folder."""
    target = Path(folder) / SUBFOLDER
    manifest = json.loads((target / "manifest.json").read_text())
    # version-1 manifests have no kind: their memorized photos are all verbatim (one caption each)
    default = {"memorized": "VM"} if manifest.get("version") == "1" else {}
    entries = [TestbedEntry(**{"kind": default.get(e["role"], ""), **e}) for e in manifest["entries"]]
    images = load_file(str(target / "images.safetensors"))["images"].numpy()
    return entries, images
