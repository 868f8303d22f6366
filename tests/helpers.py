"""Small builders shared by tests: prompt files, reference folders, a TorchScript stand-in for SSCD."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from dori.sd_shapes import write_sscd_stand_in


def write_sscd(path: Path) -> Path:
    """A tiny TorchScript stand-in for SSCD (16 outputs)."""
    return write_sscd_stand_in(path)


def write_prompts_with_references(folder: Path, prompts: list[str]) -> tuple[Path, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    csv = folder / "prompts.csv"
    csv.write_text("id,prompt\n" + "".join(f"p{i},{p}\n" for i, p in enumerate(prompts)))
    refs = folder / "refs"
    refs.mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(len(prompts)):
        Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(refs / f"p{i}.png")
    return csv, refs
