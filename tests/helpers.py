"""Small builders shared by tests: prompt files, reference folders, a TorchScript stand-in for SSCD."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image


class TinySSCD(torch.nn.Module):
    """Same file format as SSCD (TorchScript, image -> descriptor); tiny random weights."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, stride=2)
        self.fc = torch.nn.Linear(8, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.conv(x)).mean(dim=(2, 3)))


def write_sscd(path: Path) -> Path:
    torch.manual_seed(0)
    torch.jit.script(TinySSCD()).save(str(path))
    return path


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
