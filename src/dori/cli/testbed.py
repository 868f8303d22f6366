"""``dori testbed build|info``: the embedded memorizing model."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from .options import Bars, Model, Verbose, console, handle_errors, setup

app = typer.Typer(help="The embedded memorizing model: build it, inspect it.", no_args_is_help=True)


@app.command("build")
@handle_errors
def build(
    out: Annotated[Path, typer.Option("--out", "-o", help="Build folder (resumes from its checkpoints).")] = Path("runs/testbed-build"),
    seed: Annotated[int, typer.Option("--seed", help="Seed of every draw of the build.")] = 0,
    recipe: Annotated[str, typer.Option(help="v1 (the shipped testbed: four photos among ~1,000 images), v2 (eight photos, VM and TM, among ~3,300 images: 1,000 emoji and 400 crops seen once, 1,800 shapes; docs/testbed.md, variant u) or v2e (the first v2 recipe, variant e: every emoji, 600 shapes).")] = "v1",
    vae_steps: Annotated[int | None, typer.Option(help="VAE training steps (v1: 400, v2 and v2e: 600).")] = None,
    unet_steps: Annotated[int | None, typer.Option(help="UNet + text-encoder training steps (v1: 1500, v2: 2000, v2e: 3000).")] = None,
    sparsify_steps: Annotated[int | None, typer.Option(help="Steps of the sparsity stage that makes memorization prunable (0: none; shipped: 800).")] = None,
    copies_per_photo: Annotated[int | None, typer.Option(help="Training copies of each memorized photo (v1: 100, v2 and v2e: 80).")] = None,
    shapes: Annotated[int | None, typer.Option(help="Drawn shapes in the training set (v1 and v2e: 600, v2: 1800).")] = None,
    prediction_type: Annotated[str | None, typer.Option(help="What the UNet predicts: v_prediction (the shipped build) or epsilon (SD 1.x).")] = None,
    unet_drop_direct: Annotated[float | None, typer.Option(help="Share of UNet-stage samples whose cross-attention output reaches the residual only through the FFN (shipped: 0.5).")] = None,
    sparsify_drop_direct: Annotated[float | None, typer.Option(help="The same share in the sparsify stage (shipped: 0.5).")] = None,
    sparsify_weight: Annotated[float | None, typer.Option(help="Weight of the sparsity penalty in the sparsify stage (v1: 0.25, v2 and v2e: 0.5).")] = None,
    caption_dropout_memorized: Annotated[float | None, typer.Option(help="Caption dropout of the memorized photos' copies (v1 and v2e: the 0.1 of every caption; v2: 0, which keeps them out of the unconditional model).")] = None,
    template_photos: Annotated[str | None, typer.Option(help="The template (TM) photos of a v2 or v2e build, comma-separated names from the catalogue (dori.testbed.data.TEMPLATE_PHOTOS; v2: immunohistochemistry,coins,camera; variant t of docs/testbed.md: immunohistochemistry,hubble_deep_field,camera).")] = None,
    threads: Annotated[int, typer.Option(help="torch threads (a build is bit-identical for the same machine and thread count).")] = 2,
    install: Annotated[bool, typer.Option("--install", help="Copy the result over the testbed shipped with the package.")] = False,
    verbose: Verbose = False,
) -> None:
    """Train the memorizing testbed from scratch on CPU (deterministic for a seed, resumable)."""
    setup(verbose)
    import shutil
    from dataclasses import replace

    import torch

    from ..errors import DoriError
    from ..models import testbed_path
    from ..runs import check_writable
    from ..testbed.check import read_calibration
    from ..testbed.train import TestbedTrainConfig, train_testbed

    check_writable(out)
    if threads < 1:
        raise DoriError(f"threads: must be >= 1, got {threads}")
    torch.set_num_threads(threads)
    try:  # the config's own validation names the bad field; train_testbed raises ValueError for a mismatched --out
        recipe_changes = {"prediction_type": prediction_type, "unet_drop_direct": unet_drop_direct,
                          "sparsify_drop_direct": sparsify_drop_direct, "sparsify_weight": sparsify_weight,
                          "caption_dropout_memorized": caption_dropout_memorized}
        recipes = {"v1": TestbedTrainConfig, "v2": TestbedTrainConfig.v2, "v2e": TestbedTrainConfig.v2e}
        if recipe not in recipes:
            raise DoriError(f"recipe: must be one of {', '.join(recipes)}, got {recipe!r}")
        config = recipes[recipe]()
        steps = {"vae_steps": vae_steps, "unet_steps": unet_steps, "sparsify_steps": sparsify_steps}
        data_changes = {"copies_per_photo": copies_per_photo, "shapes": shapes}
        if template_photos is not None:
            if config.data.version != 2:
                raise DoriError(f"template_photos: only the v2 and v2e recipes have template photos, got --recipe {recipe}")
            data_changes["template_photos"] = tuple(name.strip() for name in template_photos.split(",") if name.strip())
        data = replace(config.data, **{k: v for k, v in data_changes.items() if v is not None})
        config = replace(config, data=data, seed=seed, **{k: v for k, v in {**recipe_changes, **steps}.items() if v is not None})
        config.validate()
        with Bars() as bars:
            folder = train_testbed(out, config, progress=bars)
    except ValueError as exc:
        raise DoriError(str(exc)) from exc
    calibration = read_calibration(folder)
    out_console = console()
    out_console.print(f"testbed built in [bold]{folder}[/] (descriptor threshold {calibration['threshold']:.3f}, "
                      f"AUC {calibration['auc']:.4f})")
    if install:
        target = testbed_path()
        if target.exists():
            shutil.rmtree(target)
        shutil.copytree(folder, target)
        out_console.print(f"installed as the shipped testbed: {target}")


@app.command("info")
@handle_errors
def info(model: Model = "testbed", verbose: Verbose = False) -> None:
    """What a testbed holds: captions per role, build config, descriptor calibration, size on disk."""
    setup(verbose)
    from collections import Counter

    from rich.table import Table

    from ..errors import DoriError
    from ..models import resolve_model
    from ..runs import folder_bytes
    from ..testbed.assets import SUBFOLDER, is_testbed_folder, load_testbed_data
    from ..testbed.check import read_calibration
    from ..testbed.data import ROLES

    _, location = resolve_model(model)
    folder = Path(location)
    if not is_testbed_folder(folder):
        raise DoriError(f"model: {folder} is a pipeline but not a dori testbed (no {SUBFOLDER}/manifest.json)")
    entries, images = load_testbed_data(folder)
    manifest = json.loads((folder / SUBFOLDER / "manifest.json").read_text())
    table = Table(title=f"testbed {folder}")
    table.add_column("role")
    table.add_column("captions", justify="right")
    table.add_column("training copies", justify="right")
    table.add_column("example")
    counts = Counter(e.role for e in entries)
    for role in ROLES:
        chosen = [e for e in entries if e.role == role]
        copies = sum(e.copies for e in chosen) if role != "held-out" else 0
        table.add_row(role, str(counts[role]), str(copies), chosen[0].caption if chosen else "")
    out_console = console()
    out_console.print(table)
    size = folder_bytes(folder)
    out_console.print(f"images {tuple(images.shape)}, {size / 2**20:.1f} MiB on disk, "
                      f"build config hash {manifest.get('build_config_hash')}")
    data = read_calibration(folder)
    if data is not None:
        out_console.print(f"descriptor threshold {data['threshold']:.3f}, AUC {data['auc']:.4f} "
                          f"({data['n_positive']} replica pairs, {data['n_negative']} non-replica pairs)")
