"""Every verb through the CLI on a pipeline of Stable Diffusion v1.4's shape (860M-parameter UNet, CLIP
ViT-L/14, the real VAE's shape, PNDM; random weights), at 256x256 and a few steps: what ``.ci/run``
runs after the main suite (``pytest -m slow``), so that a change that breaks SD-sized models (memory,
layer names, shapes) fails CI. The figures it prints are in docs/sd-scale.md."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_every_verb_on_an_sd14_shaped_pipeline(tmp_path):
    from dori.models import cpu_runs_natively

    work = tmp_path / "sd-scale"
    # All UNet weights, in bfloat16 where the CPU computes it; elsewhere bfloat16 is emulated (its convolutions
    # several hundred times slower), so in float32 (a peak of 15.5 GiB: docs/sd-scale.md).
    finetune = ["--finetune-dtype", "bfloat16" if cpu_runs_natively("bfloat16") else "float32"]
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "sd_scale.py"), "--work", str(work),
                             "--skip-timing", *finetune], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    figures = json.loads((work / "figures.json").read_text())
    assert figures["shape"]["parameters"] == {"unet": 859_520_964, "text_encoder": 123_060_480, "vae": 83_653_863}
    verbs = {row["verb"].split(" (")[0] for row in figures["verbs"]}
    assert {"evaluate", "mitigate nemo", "mitigate wanda", "mitigate wen", "attack", "finetune", "analyze scatter",
            "analyze activations", "analyze weights", "report"} <= verbs
    assert all(row["exit"] == 0 for row in figures["verbs"])
    assert (work / "runs" / "finetune" / "adversarial-ft.safetensors").is_file()
    # the pipeline folder holds the trained UNet: the 10 GB checkpoint (UNet and Adam's moments) is gone
    assert (work / "runs" / "finetune" / "finetune" / "pipeline" / "unet").is_dir()
    assert not (work / "runs" / "finetune" / "finetune" / "checkpoints").exists()
