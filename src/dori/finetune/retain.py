"""The retain set of adversarial fine-tuning: ordinary image-caption pairs for the L_DM term.

The paper trains on regular LAION image-caption pairs (section 2.6). A retain set is one of:

* ``testbed:retain``: the testbed's shape and seen-once pairs (the default on the testbed);
* a folder of image-caption pairs: an image folder with ``metadata.jsonl`` / ``metadata.csv``
  (Hugging Face ImageFolder's convention: ``file_name`` and ``text`` or ``caption``), or images each
  with a ``.txt`` caption of the same name beside it;
* a prompt file (CSV / JSONL / TXT) with ``retain_images``, a folder of ``<id>.png``;
* a prompt file alone with ``retain_generate``: the model's own generations of its prompts (made once
  before fine-tuning and kept in the run folder), where no training images are at hand.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import DoriError
from ..images import load_image
from ..prompts import IMAGE_SUFFIXES, load_prompt_set

TESTBED_RETAIN = ("testbed:shape", "testbed:seen-once")


@dataclass
class RetainSet:
    captions: list[str]
    images: list[np.ndarray]

    def __len__(self) -> int:
        return len(self.captions)

    def batch(self, pipe, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(latents, caption embeddings)`` of the chosen pairs (encoded now, frozen VAE and text encoder)."""
        from ..models import encode_images, encode_prompts

        return encode_images(pipe, [self.images[i] for i in indices]), encode_prompts(pipe, [self.captions[i] for i in indices])


def _metadata(folder: Path) -> list[tuple[str, str]]:
    """``(file name, caption)`` pairs from ``metadata.jsonl`` / ``metadata.csv``, else from ``<image>.txt`` files."""
    from ..config_files import read_text

    rows: list[dict] = []
    if (folder / "metadata.jsonl").is_file():
        for n, line in enumerate(read_text(folder / "metadata.jsonl", "retain", "JSON lines").splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise DoriError(f"retain: {folder / 'metadata.jsonl'} line {n} is not JSON ({exc.msg})") from exc
                if not isinstance(rows[-1], dict):
                    raise DoriError(f"retain: {folder / 'metadata.jsonl'} line {n} is not a JSON object")
    elif (folder / "metadata.csv").is_file():
        rows = list(csv.DictReader(io.StringIO(read_text(folder / "metadata.csv", "retain", "a CSV file"))))
    else:
        pairs = [(p.name, read_text(p.with_suffix(".txt"), "retain", "a caption").strip()) for p in sorted(folder.iterdir())
                 if p.suffix.lower() in IMAGE_SUFFIXES and p.with_suffix(".txt").is_file()]
        if not pairs:
            raise DoriError(f"retain: {folder} holds no image-caption pairs (give metadata.jsonl / metadata.csv with "
                            "file_name and text, or a .txt caption beside each image)")
        return pairs
    out = []
    for row in rows:
        caption = row.get("text") or row.get("caption") or row.get("prompt")
        if not row.get("file_name") or not caption:
            raise DoriError(f"retain: {folder} metadata rows need file_name and text (or caption), got {sorted(row)}")
        out.append((str(row["file_name"]), str(caption)))
    return out


def load_retain_folder(folder: str | Path) -> RetainSet:
    folder = Path(folder)
    pairs = _metadata(folder)
    missing = [name for name, _ in pairs if not (folder / name).is_file()]
    if missing:
        raise DoriError(f"retain: {folder} has no image {missing[0]!r} ({len(missing)} of {len(pairs)} missing)")
    return RetainSet([c for _, c in pairs], [load_image(folder / name) for name, _ in pairs])


def check_retain_folder(folder: str | Path) -> None:
    """Refuse a retain folder whose metadata cannot be read or whose images are missing or not images,
    without decoding them (PIL's ``verify``)."""
    from PIL import Image

    folder = Path(folder)
    pairs = _metadata(folder)
    if not pairs:
        raise DoriError(f"retain: {folder} holds no image-caption pairs")
    for name, _ in pairs:
        try:
            with Image.open(folder / name) as image:
                image.verify()
        except Exception:  # PIL raises many kinds for a damaged or foreign file
            raise DoriError(f"retain: {folder / name} is missing or not a readable image") from None


def check_retain(spec: str | None, images: str | None, generate: bool, model_folder) -> None:
    """Refuse retain settings that cannot give pairs, before anything is loaded or written."""
    if spec is None and model_folder is None:
        raise DoriError("retain: fine-tuning needs retain pairs; give --retain (a folder of image-caption pairs, "
                        "or a prompt file with --retain-images DIR or --retain-generate)")
    if spec not in (None, "testbed:retain") and not Path(spec).exists():
        raise DoriError(f"retain: {spec} does not exist (give a folder of image-caption pairs or a prompt file)")
    if spec is not None and Path(spec).is_file() and images is None and not generate:
        raise DoriError(f"retain: the prompt file {spec!r} needs its images: --retain-images DIR (<id>.png) or "
                        "--retain-generate (the model's own generations)")
    if spec is not None and Path(spec).is_file() and not load_prompt_set(spec).records:
        raise DoriError(f"retain: {spec} holds no prompts")


def load_retain_set(spec: str | None, images: str | None, model_folder: str | None, *, generate_with=None,
                    cache: Path | None = None, seed: int = 0, generation=None) -> RetainSet:
    """The retain set ``spec`` names (see the module docstring). ``generate_with``: a pipeline that makes
    the images of a prompt file without ``images`` (kept under ``cache``)."""
    if spec is None:
        if model_folder is None:
            raise DoriError("retain: fine-tuning needs retain pairs; give --retain (a folder of image-caption pairs, "
                            "or a prompt file with --retain-images DIR or --retain-generate)")
        spec = "testbed:retain"
    if spec == "testbed:retain":
        sets = [load_prompt_set(s, model_folder=model_folder) for s in TESTBED_RETAIN]
    elif Path(spec).is_dir():
        return load_retain_folder(spec)
    elif images is not None:
        sets = [load_prompt_set(spec, references=images, model_folder=model_folder)]
    elif generate_with is not None:
        return _generated(load_prompt_set(spec, model_folder=model_folder), generate_with, cache, seed, generation)
    else:
        raise DoriError(f"retain: the prompt file {spec!r} needs its images: --retain-images DIR (<id>.png) or "
                        "--retain-generate (the model's own generations)")
    captions = [r.prompt for s in sets for r in s.records]
    pictures = [s.references[r.id] for s in sets for r in s.records]
    if not captions:
        raise DoriError(f"retain: {spec!r} holds no image-caption pairs")
    return RetainSet(captions, pictures)


def _generated(prompt_set, pipe, cache: Path | None, seed: int, generation) -> RetainSet:
    """The model's own image for each prompt (seed ``seed``), made once and kept in ``cache``."""
    from ..generation import generate
    from ..images import save_png
    from ..runs import safe_filename

    records = prompt_set.records
    if not records:
        raise DoriError(f"retain: {prompt_set.name!r} holds no prompts")
    paths = [(cache / f"{safe_filename(r.id)}.png") if cache else None for r in records]
    todo = [i for i, p in enumerate(paths) if p is None or not p.is_file()]
    images: dict[int, np.ndarray] = {}
    batch = generation.batch_size if generation is not None else 16
    for start in range(0, len(todo), batch):
        chunk = todo[start : start + batch]
        out = generate(pipe, [seed] * len(chunk), [records[i].prompt for i in chunk], config=generation).images
        for i, image in zip(chunk, out, strict=True):
            images[i] = (image.permute(1, 2, 0).clamp(0, 1).numpy() * 255).round().astype(np.uint8)
            if paths[i] is not None:
                paths[i].parent.mkdir(parents=True, exist_ok=True)
                save_png(image, paths[i])
    pictures = [images[i] if i in images else load_image(paths[i]) for i in range(len(records))]
    return RetainSet([r.prompt for r in records], pictures)
