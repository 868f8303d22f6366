"""Synthetic run folders for the report tests: real PNGs (PIL) and JSON files, no models."""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image, ImageDraw

XSS = "<script>alert(1)</script>"

TABLE1 = [
    {"name": "memorized", "n": 40, "sscd_mean": 0.9134, "sscd_std": 0.0521, "mr": 0.975, "paper_mr": 0.98,
     "mr_gallery": 0.975, "utility": {"shape_accuracy": 0.875}},
    {"name": "nemo", "n": 40, "sscd_mean": 0.3127, "sscd_std": 0.1049, "mr": 0.2, "paper_mr": 0.2,
     "mr_gallery": 0.85, "mr_by_kind": {"TM": 0.3, "VM": 0.1}, "mr_gallery_by_kind": {"TM": 0.95, "VM": 0.75},
     "utility": {"shape_accuracy": 0.85, "sscd_gen_mean": 0.9612}},
    {"name": "nemo+dori", "n": 40, "sscd_mean": 0.8866, "sscd_std": float("nan"), "mr": 0.95, "paper_mr": 0.99,
     "triggers": 4, "relative_perturbation": 0.123, "mr_by_step": {"0": 0.2, "50": 0.95}},
]
GRID_COLUMNS = ["reference", "unmitigated", "nemo"]


def write_png(path: Path, colour: tuple[int, int, int], size: int = 32) -> bytes:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.new("RGB", (size, size), colour)
    ImageDraw.Draw(image).ellipse((size // 4, size // 4, 3 * size // 4, 3 * size // 4), fill=(250, 220, 40))
    image.save(path)
    return path.read_bytes()


def write_manifest(folder: Path, command: str = "demo", config: dict | None = None, status: str = "done") -> None:
    folder.mkdir(parents=True, exist_ok=True)
    manifest = {"command": command, "argv": ["dori", command, "--quick"], "status": status,
                "config": config if config is not None else {"model": "testbed", "seed": 0},
                "config_hash": "0123456789abcdef", "versions": {"python": "3.11.9", "dori": "0.1.0"},
                "git_sha": "f688eab", "seeds": [0], "created": "2025-01-01T00:00:00+00:00", "threshold": 0.5}
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=1))


def make_demo_run(folder: Path) -> dict:
    """A demo-like run folder: manifest, Table-1 summary, a 2 x 3 image grid, one figure (png + pdf) and
    two sub-runs. Returns what the tests compare against."""
    write_manifest(folder, config={"model": "testbed", "note": "<b>bold</b>", "nested": {"steps": 50}})
    (folder / "summary.json").write_text(json.dumps(TABLE1, indent=1))
    pngs = {}
    rows = []
    for i, (prompt_id, prompt) in enumerate([("m-0", XSS), ("m-1", "a red circle on a blue background")]):
        cells = {}
        for j, column in enumerate(GRID_COLUMNS):
            relative = f"images/{prompt_id}-{column}.png"
            pngs[relative] = write_png(folder / relative, (40 * i + 60, 70 * j, 200 - 50 * j))
            cells[column] = {"image": relative, "score": None if column == "reference" else 0.5 + 0.1 * j}
        rows.append({"prompt_id": prompt_id, "prompt": prompt, "seed": i, "cells": cells})
    (folder / "grid.json").write_text(json.dumps({"columns": GRID_COLUMNS, "rows": rows}, indent=1))
    figure = write_png(folder / "mr_vs_steps.png", (250, 250, 250), size=120)
    (folder / "mr_vs_steps.pdf").write_bytes(b"%PDF-1.4\n%%EOF\n")
    write_manifest(folder / "memorized", command="evaluate")
    write_manifest(folder / "attack-nemo", command="attack", status="running")
    return {"grid_pngs": pngs, "figure": figure, "n_cells": len(rows) * len(GRID_COLUMNS), "n_figures": 1}
