"""The ``dori`` command line (typer + rich). Heavy imports live inside the commands so ``--help`` is instant."""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Annotated

import typer

from . import cli_analyze
from .cli_common import (
    BatchSize,
    Device,
    Guidance,
    Model,
    Out,
    Overwrite,
    Seed,
    Seeds,
    Steps,
    Verbose,
    _Bars,
    _console,
    _setup,
    handle_errors,
)

app = typer.Typer(help="Find, attack and remove memorized training images in text-to-image diffusion models.",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
testbed_app = typer.Typer(help="The embedded memorizing model: build it, inspect it.", no_args_is_help=True)
app.add_typer(testbed_app, name="testbed")
app.add_typer(cli_analyze.app, name="analyze")

def _fmt(value: float, digits: int = 2) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def _layer_table(title: str, column: str, values: dict[str, str]):
    """A two-column table: layer name and one right-aligned value per layer."""
    from rich.table import Table

    table = Table(title=title)
    table.add_column("layer")
    table.add_column(column, justify="right")
    for name, value in values.items():
        table.add_row(name, value)
    return table


def _rows_table(rows: list[dict], title: str, threshold: float | None = None):
    from rich.table import Table

    table = Table(title=title, caption=f"replication: similarity > {threshold:.3f}" if threshold is not None else None)
    utility = any("utility" in row for row in rows)
    columns = ["row", "n", "similarity mean ± std", "MR", "MR (any memorized photo)"]
    columns += ["shapes in right colours", "SSCD_gen other captions", "FID (VAE features)", "retain loss"] if utility else []
    paper = any("paper_mr" in row for row in rows)
    columns += ["paper MR (SD v1.4)"] if paper else []
    for col in columns:
        table.add_column(col, justify="right" if col != "row" else "left")
    for row in rows:
        cells = [row["name"], str(row["n"]), f"{_fmt(row['sscd_mean'])} ± {_fmt(row['sscd_std'])}",
                 _fmt(row["mr"]), _fmt(row.get("mr_gallery"))]
        if utility:
            u = row.get("utility", {})
            cells += [_fmt(u.get("shape_accuracy")), _fmt(u.get("sscd_gen_mean")), _fmt(u.get("fid_vae")),
                      _fmt(u.get("retain_loss"), 4)]
        if paper:
            cells.append(_fmt(row.get("paper_mr")))
        table.add_row(*cells)
    return table


# -- testbed -------------------------------------------------------------------------------------
@testbed_app.command("build")
@handle_errors
def testbed_build(
    out: Annotated[Path, typer.Option("--out", "-o", help="Build folder (resumes from its checkpoints).")] = Path("runs/testbed-build"),
    seed: Seed = 0,
    vae_steps: Annotated[int, typer.Option(help="VAE training steps.")] = 400,
    unet_steps: Annotated[int, typer.Option(help="UNet + text-encoder training steps.")] = 1500,
    sparsify_steps: Annotated[int, typer.Option(help="Steps of the sparsity stage that makes memorization prunable (0: none).")] = 800,
    prediction_type: Annotated[str | None, typer.Option(help="What the UNet predicts: v_prediction (the shipped build) or epsilon (SD 1.x).")] = None,
    unet_drop_direct: Annotated[float | None, typer.Option(help="Share of UNet-stage samples whose cross-attention output reaches the residual only through the FFN (shipped: 0.5).")] = None,
    sparsify_drop_direct: Annotated[float | None, typer.Option(help="The same share in the sparsify stage (shipped: 0.5).")] = None,
    sparsify_weight: Annotated[float | None, typer.Option(help="Weight of the sparsity penalty in the sparsify stage (shipped: 0.25).")] = None,
    threads: Annotated[int, typer.Option(help="torch threads (the shipped build used 2).")] = 2,
    install: Annotated[bool, typer.Option("--install", help="Copy the result over the testbed shipped with the package.")] = False,
    verbose: Verbose = False,
) -> None:
    """Train the memorizing testbed from scratch on CPU (deterministic for a seed, resumable)."""
    _setup(verbose)
    import shutil

    import torch

    from .errors import DoriError
    from .models import testbed_path
    from .testbed.check import calibrate_folder
    from .testbed.train import TestbedTrainConfig, train_testbed

    if threads < 1:
        raise DoriError(f"threads: must be >= 1, got {threads}")
    torch.set_num_threads(threads)
    try:  # the config's own validation names the bad field; train_testbed raises ValueError for a mismatched --out
        recipe = {"prediction_type": prediction_type, "unet_drop_direct": unet_drop_direct,
                  "sparsify_drop_direct": sparsify_drop_direct, "sparsify_weight": sparsify_weight}
        config = TestbedTrainConfig(seed=seed, vae_steps=vae_steps, unet_steps=unet_steps, sparsify_steps=sparsify_steps,
                                    **{k: v for k, v in recipe.items() if v is not None})
        config.validate()
        with _Bars() as bars:
            folder = train_testbed(out, config, progress=lambda s, k, n, loss: bars.update(s, k, n, f"loss {loss:.4f}"))
    except ValueError as exc:
        raise DoriError(str(exc)) from exc
    calibration = calibrate_folder(folder)
    console = _console()
    console.print(f"testbed built in [bold]{folder}[/] (descriptor threshold {calibration['threshold']:.3f}, "
                  f"AUC {calibration['auc']:.4f})")
    if install:
        target = testbed_path()
        if target.exists():
            shutil.rmtree(target)
        shutil.copytree(folder, target)
        console.print(f"installed as the shipped testbed: {target}")


@testbed_app.command("info")
@handle_errors
def testbed_info(model: Model = "testbed", verbose: Verbose = False) -> None:
    """What a testbed holds: captions per role, build config, descriptor calibration, size on disk."""
    _setup(verbose)
    import json
    from collections import Counter

    from rich.table import Table

    from .errors import DoriError
    from .models import resolve_model
    from .testbed.assets import SUBFOLDER, is_testbed_folder, load_testbed_data

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
    for role in ("memorized", "seen-once", "shape", "held-out"):
        chosen = [e for e in entries if e.role == role]
        copies = sum(e.copies for e in chosen) if role != "held-out" else 0
        table.add_row(role, str(counts[role]), str(copies), chosen[0].caption if chosen else "")
    console = _console()
    console.print(table)
    size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    console.print(f"images {tuple(images.shape)}, {size / 2**20:.1f} MiB on disk, "
                  f"build config hash {manifest.get('build_config_hash')}")
    calib = folder / SUBFOLDER / "descriptor.json"
    if calib.exists():
        data = json.loads(calib.read_text())
        console.print(f"descriptor threshold {data['threshold']:.3f}, AUC {data['auc']:.4f} "
                      f"({data['n_positive']} replica pairs, {data['n_negative']} non-replica pairs)")


# -- evaluate -------------------------------------------------------------------------------------
@app.command("evaluate")
@handle_errors
def evaluate(
    prompts: Annotated[str, typer.Option("--prompts", "-p", help="Bundled set, testbed[:role], or a CSV/JSONL/TXT file.")] = "testbed:memorized",
    model: Model = "testbed",
    references: Annotated[Path | None, typer.Option(help="Folder of reference images named <prompt id>.png.")] = None,
    seeds: Seeds = 10,
    seed: Seed = 0,
    steps: Steps = 25,
    guidance: Guidance = 7.5,
    batch_size: BatchSize = 16,
    descriptor: Annotated[str, typer.Option(help="'auto'/'testbed', or an SSCD TorchScript file.")] = "auto",
    sscd_preprocess: Annotated[str, typer.Option(help="SSCD convention: nemo (320x320, ImageNet) or dcr (256, crop 224, 0.5).")] = "nemo",
    threshold: Annotated[float | None, typer.Option(help="Replication threshold (default: the descriptor's; 0.7 for SSCD).")] = None,
    limit: Annotated[int | None, typer.Option(help="Only the first N prompts.")] = None,
    baseline: Annotated[Path | None, typer.Option(help="A finished evaluate run of the same prompts/seeds: adds SSCD_gen.")] = None,
    mitigation: Annotated[list[Path] | None, typer.Option("--mitigation", help="A saved mitigation (.safetensors with its .json); repeatable.")] = None,
    device: Device = "cpu",
    dtype: Annotated[str, typer.Option(help="float32, float16 or bfloat16.")] = "float32",
    out: Out = None,
    overwrite: Overwrite = False,
    verbose: Verbose = False,
) -> None:
    """Generate images per prompt and score them for replication (SSCD_orig, MR, noise norm)."""
    _setup(verbose)
    from .evaluate import EvaluateConfig, run_evaluate
    from .generation import GenerationConfig

    config = EvaluateConfig(
        model=model, prompts=prompts, references=str(references) if references else None, num_seeds=seeds,
        seed=seed, generation=GenerationConfig(num_inference_steps=steps, guidance_scale=guidance, batch_size=batch_size),
        descriptor=descriptor, sscd_preprocess=sscd_preprocess, threshold=threshold, limit=limit, device=device,
        dtype=dtype, baseline=str(baseline) if baseline else None,
        mitigations=tuple(str(p) for p in mitigation or ()),
    )
    config.validate()
    with _Bars() as bars:
        result = run_evaluate(config, out, overwrite=overwrite, progress=bars.callback("generate + score"))
    from accelerate import PartialState

    if PartialState(cpu=device.startswith("cpu")).is_main_process:
        console = _console()
        console.print(_rows_table(result.summary["rows"], f"evaluate {prompts} on {model}", result.summary["threshold"]))
        console.print(f"run folder: [bold]{result.path}[/]")


# -- mitigations ------------------------------------------------------------------------------------
Scope = Annotated[str, typer.Option(help="'per-prompt' (a selection per prompt) or 'set' (one for the whole set).")]
Limit = Annotated[int | None, typer.Option(help="Only the first N prompts.")]


@app.command("localize")
@handle_errors
def localize(
    prompts: Annotated[str, typer.Option("--prompts", "-p", help="Memorized prompts to localise neurons for.")] = "testbed:memorized",
    model: Model = "testbed",
    statistics: Annotated[str | None, typer.Option(help="Non-memorized prompts for the activation statistics and SSIM threshold (default: testbed seen-once + shape captions, or laion-nonmem).")] = None,
    scope: Scope = "per-prompt",
    seeds: Annotated[int, typer.Option("--seeds", help="Seeds of the memorization test.")] = 10,
    ssim_threshold: Annotated[float | None, typer.Option(help="Fixed SSIM threshold (default: calibrated per model; 0.428 for SD 1.4).")] = None,
    min_theta: Annotated[float, typer.Option(help="Lowest z-score threshold of the initial selection.")] = 1.0,
    layers: Annotated[list[str] | None, typer.Option("--layers", help="Value-layer globs (default: down and mid blocks' attn2.to_v).")] = None,
    search_batch: Annotated[int, typer.Option(help="Initial-selection levels scored per UNet call (the UNet batch is this times the memorized-looking seeds; lower it if memory is short, 1: one level per call).")] = 8,
    limit: Limit = None,
    device: Device = "cpu",
    out: Out = None,
    overwrite: Overwrite = False,
    verbose: Verbose = False,
) -> None:
    """NeMo: find memorization neurons in the cross-attention value layers; writes nemo.safetensors."""
    _setup(verbose)
    from .mitigate import run_localize
    from .mitigations.nemo import NeMoConfig
    from .models import load_pipeline

    kwargs = {"layers": tuple(layers)} if layers else {}
    config = NeMoConfig(num_seeds=seeds, ssim_threshold=ssim_threshold, min_theta=min_theta, search_batch=search_batch, **kwargs)
    config.validate()
    pipe = load_pipeline(model, device=device)
    with _Bars() as bars:
        path, nemo = run_localize(pipe, prompts, config, out, scope=scope, statistics=statistics, limit=limit,
                                  overwrite=overwrite, progress=bars.callback("localize"))
    from rich.table import Table

    table = Table(title=f"NeMo neurons per layer (SSIM threshold {nemo.threshold:.3f})")
    table.add_column("prompt")
    table.add_column("memorized")
    for name in nemo.layer_names:
        table.add_column(name.replace(".transformer_blocks.0.attn2.to_v", ""), justify="right")
    table.add_column("total", justify="right")
    for r in nemo.results:
        counts = [len(r.refined.get(n, [])) for n in nemo.layer_names]
        table.add_row(r.prompt[:40], "yes" if r.memorized else "no", *map(str, counts), str(sum(counts)))
    console = _console()
    console.print(table)
    console.print(f"mitigation: [bold]{path}[/] (use with dori evaluate --mitigation)")


@app.command("prune")
@handle_errors
def prune(
    prompts: Annotated[str, typer.Option("--prompts", "-p", help="Memorized (target) prompts.")] = "testbed:memorized",
    model: Model = "testbed",
    sparsity: Annotated[float, typer.Option(help="Share r of each weight row to consider (0.01; the paper's stronger ablation 0.1).")] = 0.01,
    timesteps: Annotated[int, typer.Option(help="Union over the first N denoising steps.")] = 10,
    steps: Steps = 50,
    scope: Scope = "set",
    bake: Annotated[Path | None, typer.Option(help="Also save the pruned pipeline to this folder.")] = None,
    limit: Limit = None,
    device: Device = "cpu",
    out: Out = None,
    overwrite: Overwrite = False,
    verbose: Verbose = False,
) -> None:
    """Wanda: zero the FFN weights that score high for memorized vs empty prompts; writes wanda.safetensors."""
    _setup(verbose)
    from .mitigate import run_prune
    from .mitigations.wanda import WandaConfig
    from .models import load_pipeline

    config = WandaConfig(sparsity=sparsity, timesteps=timesteps, num_inference_steps=steps)
    config.validate()
    pipe = load_pipeline(model, device=device)
    with _Bars() as bars:
        path, wanda = run_prune(pipe, prompts, config, out, scope=scope, limit=limit, overwrite=overwrite, bake=bake,
                                progress=bars.callback("calibrate"))
    console = _console()
    console.print(_layer_table(f"Wanda sparsity per layer (r = {sparsity})", "zeroed weights",
                               {name: f"{100 * value:.2f}%" for name, value in wanda.sparsity_per_layer().items()}))
    console.print(f"mitigation: [bold]{path}[/]" + (f"; pruned pipeline: [bold]{bake}[/]" if bake else ""))


@app.command("ablate")
@handle_errors
def ablate(
    layer: Annotated[list[str] | None, typer.Option("--layer", "-l", help="Glob of UNet linears to ablate; repeatable (default '*ff.net.2', Wanda's layers; '*attn2.to_v' for NeMo's).")] = None,
    factor: Annotated[float, typer.Option(help="Scale of their weights (0 zeroes them).")] = 0.0,
    model: Model = "testbed",
    out: Annotated[Path, typer.Option("--out", "-o", help="Mitigation file to write (.safetensors plus a .json sidecar).")] = Path("ablation.safetensors"),
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing file.")] = False,
    verbose: Verbose = False,
) -> None:
    """Whole-layer ablation: what is left when every weight a pruning method could touch is gone (a diagnostic for dori evaluate --mitigation)."""
    _setup(verbose)
    from .errors import DoriError
    from .mitigations.ablation import LayerAblation
    from .models import load_pipeline

    ablation = LayerAblation(tuple(layer or ("*ff.net.2",)), factor)
    path = out.with_suffix(".safetensors")
    if path.exists() and not overwrite:
        raise DoriError(f"out: {path} exists; pass --overwrite to replace it")
    layers = ablation.matched(load_pipeline(model))
    ablation.save(path)
    console = _console()
    console.print(_layer_table(f"Layers scaled by {factor:g} on {model}", "weights",
                               {name: f"{module.weight.numel():,}" for name, module in layers.items()}))
    console.print(f"mitigation: [bold]{path}[/] (use with dori evaluate --mitigation)")


# -- attack -------------------------------------------------------------------------------------------
@app.command("attack")
@handle_errors
def attack(
    prompts: Annotated[str, typer.Option("--prompts", "-p", help="Prompts whose training images to re-trigger (need references).")] = "testbed:memorized",
    model: Model = "testbed",
    mitigation: Annotated[list[Path] | None, typer.Option("--mitigation", help="A saved mitigation to attack; repeatable.")] = None,
    init: Annotated[str, typer.Option(help="Start from the 'prompt' embedding, 'random' N(0, I), or an 'other' prompt's.")] = "prompt",
    other_prompt: Annotated[str, typer.Option(help="The prompt for --init other.")] = "a red circle on a blue background",
    steps: Annotated[int, typer.Option("--steps", help="Adam steps (the paper: 50).")] = 50,
    lr: Annotated[float, typer.Option(help="Adam learning rate (the paper: 0.1).")] = 0.1,
    pairs: Annotated[int, typer.Option(help="(noise, t) pairs per step (the paper: 8).")] = 8,
    restarts: Annotated[int, typer.Option(help="Triggers per prompt.")] = 1,
    seeds: Annotated[int, typer.Option("--seeds", help="Images per trigger for the success check.")] = 10,
    early_stop: Annotated[bool, typer.Option(help="Stop a trigger once a 5-step sample from it replicates (not in the paper).")] = False,
    check_confirm: Annotated[int, typer.Option(help="With --early-stop: consecutive passing checks (5 steps apart) before stopping.")] = 2,
    constraint: Annotated[str, typer.Option(help="none, l2 (relative radius) or linf.")] = "none",
    radius: Annotated[float | None, typer.Option(help="Radius of the --constraint ball.")] = None,
    batch_size: Annotated[int, typer.Option(help="Triggers optimised together.")] = 8,
    limit: Limit = None,
    device: Device = "cpu",
    out: Out = None,
    overwrite: Overwrite = False,
    verbose: Verbose = False,
) -> None:
    """Dori: optimise the text embedding until the (mitigated) model replicates the training image."""
    _setup(verbose)
    from .attack.loop import AttackConfig
    from .attack.run import AttackRunConfig, run_attack
    from .models import load_pipeline

    config = AttackRunConfig(prompts=prompts, limit=limit, init=init, other_prompt=other_prompt, restarts=restarts,
                             num_seeds=seeds, batch_size=batch_size, constraint=constraint, radius=radius,
                             attack=AttackConfig(steps=steps, lr=lr, pairs=pairs, early_stop=early_stop, check_confirm=check_confirm,
                                                 record_at=tuple(s for s in (0, 1, 10, 25, 50) if s <= steps)),
                             mitigations=tuple(str(p) for p in mitigation or ()))
    config.validate()
    pipe = load_pipeline(model, device=device)
    with _Bars() as bars:
        path, records = run_attack(pipe, config, out, overwrite=overwrite, progress=bars.callback("attack"))
    from rich.table import Table

    table = Table(title=f"Dori on {model}" + (f" + {', '.join(p.name for p in mitigation)}" if mitigation else ""))
    for col in ("trigger", "status", "MR by step", "relative perturbation", "UNet evaluations"):
        table.add_column(col)
    for r in records:
        curve = " ".join(f"{k}:{v:.2f}" for k, v in r["mr_by_step"].items())
        table.add_row(r["key"], r["status"], curve, f"{r['relative_perturbation']:.2f}", str(r["unet_evaluations"]))
    console = _console()
    console.print(table)
    console.print(f"run folder: [bold]{path}[/] (triggers.safetensors)")


# -- finetune ---------------------------------------------------------------------------------------
@app.command("finetune")
@handle_errors
def finetune(
    prompts: Annotated[str, typer.Option("--prompts", "-p", help="Memorized prompts to erase (need their training images).")] = "testbed:memorized",
    model: Model = "testbed",
    references: Annotated[Path | None, typer.Option(help="Folder of training images named <prompt id>.png.")] = None,
    retain: Annotated[str, typer.Option(help="Retain pairs: testbed:retain, or a prompt file whose ids name images in --retain-images.")] = "testbed:retain",
    retain_images: Annotated[Path | None, typer.Option(help="Folder of the retain images, <id>.png.")] = None,
    recipe: Annotated[str, typer.Option(help="Defaults: 'testbed' (documented testbed setting) or 'paper' (AdamW lr 1e-5, Dori 50 steps from the prompt).")] = "auto",
    epochs: Annotated[int | None, typer.Option(help="Epochs (the paper: 5).")] = None,
    steps_per_epoch: Annotated[int | None, typer.Option(help="Steps per epoch (default: one pass over the memorized images).")] = None,
    lr: Annotated[float | None, typer.Option(help="AdamW learning rate.")] = None,
    init: Annotated[list[str] | None, typer.Option("--init", help="Trigger inits each step: prompt and/or random; repeatable.")] = None,
    inner_steps: Annotated[int | None, typer.Option(help="Dori steps per fine-tuning step.")] = None,
    warm_start: Annotated[bool | None, typer.Option("--warm-start/--no-warm-start", help="Start each step's Dori from the last step's triggers.")] = None,
    lora_rank: Annotated[int, typer.Option(help="0: all UNet weights (the paper); > 0: a LoRA of this rank instead.")] = 0,
    surrogate: Annotated[str, typer.Option(help="'nemo' (pruned generations) or a folder of <prompt id>.png surrogate images.")] = "nemo",
    surrogate_mitigation: Annotated[Path | None, typer.Option(help="A saved NeMo mitigation to make the surrogates with first.")] = None,
    mixed_precision: Annotated[str, typer.Option(help="no, fp16 or bf16 (accelerate).")] = "no",
    checkpoint_every: Annotated[int, typer.Option(help="Save an accelerate checkpoint every N steps.")] = 10,
    limit: Annotated[int | None, typer.Option("--limit", help="Only the first N prompts.")] = None,
    seed: Seed = 0,
    device: Device = "cpu",
    out: Out = None,
    overwrite: Overwrite = False,
    verbose: Verbose = False,
) -> None:
    """Adversarial fine-tuning: train the UNet so Dori triggers map to surrogate images (resumable; saves a pipeline)."""
    _setup(verbose)
    from .attack.loop import AttackConfig
    from .errors import DoriError
    from .finetune import FinetuneConfig, adversarial_finetune
    from .models import load_pipeline, resolve_model

    if recipe == "auto":
        recipe = "testbed" if prompts.startswith("testbed") else "paper"
    if recipe not in ("testbed", "paper"):
        raise DoriError(f"recipe: must be auto, testbed or paper, got {recipe!r}")
    base = FinetuneConfig.testbed() if recipe == "testbed" else FinetuneConfig()
    changes = {"prompts": prompts, "references": str(references) if references else None, "retain": retain,
               "retain_images": str(retain_images) if retain_images else None, "lora_rank": lora_rank,
               "surrogate": surrogate, "mixed_precision": mixed_precision, "checkpoint_every": checkpoint_every,
               "limit": limit, "seed": seed,
               "surrogate_mitigation": str(surrogate_mitigation) if surrogate_mitigation else None}
    for name, value in (("epochs", epochs), ("steps_per_epoch", steps_per_epoch), ("lr", lr),
                        ("warm_start", warm_start)):
        if value is not None:
            changes[name] = value
    if init:
        changes["inits"] = tuple(init)
    if inner_steps is not None:
        changes["inner"] = AttackConfig(steps=inner_steps, record_at=())
    config = base.replace(**changes)
    config.validate()
    resolve_model(model)
    pipe = load_pipeline(model, device=device)
    with _Bars() as bars:
        result = adversarial_finetune(pipe, config, out, overwrite=overwrite, progress=bars.callback("fine-tune"))
    from rich.table import Table

    table = Table(title=f"adversarial fine-tuning of {model}")
    for col in ("epoch", "seconds", "UNet evaluations", "L_Adv", "L_DM"):
        table.add_column(col, justify="right")
    for e in result.summary["epochs"]:
        table.add_row(str(e["epoch"]), f"{e['seconds']:.0f}", str(e["unet_evaluations"]), f"{e['l_adv']:.4f}",
                      f"{e['l_dm']:.4f}")
    console = _console()
    console.print(table)
    console.print(f"fine-tuned pipeline: [bold]{result.pipeline}[/] (use it as --model)")


# -- report -----------------------------------------------------------------------------------------
@app.command("report")
@handle_errors
def report(
    runs: Annotated[list[Path], typer.Argument(help="Run folders (a demo, attack, analysis ... run).")],
    out: Annotated[Path | None, typer.Option("--out", "-o", help="HTML file (default <first run>/report.html).")] = None,
    title: Annotated[str | None, typer.Option(help="Page title.")] = None,
    verbose: Verbose = False,
) -> None:
    """One self-contained HTML page (tables, image grids, figures, manifests) for one or more runs."""
    _setup(verbose)
    from .report import write_report

    path = write_report(list(runs), out, title=title)
    _console().print(f"report: [bold]{path}[/]")


# -- demo -------------------------------------------------------------------------------------------
@app.command("demo")
@handle_errors
def demo(
    out: Out = None,
    overwrite: Overwrite = False,
    quick: Annotated[bool, typer.Option("--quick", help="Fewer seeds, prompts and steps everywhere (a few minutes).")] = False,
    finetune: Annotated[bool, typer.Option("--finetune/--no-finetune", help="Adversarial fine-tuning rows (Table 2).")] = True,
    analyses: Annotated[bool, typer.Option("--analyses/--no-analyses", help="The three locality analyses.")] = True,
    verbose: Verbose = False,
) -> None:
    """The main job: the paper's Tables 1 and 2 on the testbed (memorization, NeMo, Wanda, Dori, adversarial
    fine-tuning), utility, the locality analyses, summary.json, plots and report.html."""
    _setup(verbose)
    from dataclasses import replace

    from .demo import DemoConfig, run_demo

    config = replace(DemoConfig.quick() if quick else DemoConfig(), finetune=finetune, analyses=analyses)
    with _Bars() as bars:
        path, rows = run_demo(config, out=out, overwrite=overwrite, on_stage=lambda name, total: bars.callback(name))
    console = _console()
    import json

    threshold = json.loads((path / "manifest.json").read_text()).get("threshold")
    console.print(_rows_table(rows, "dori demo: memorization on the testbed", threshold))
    console.print(f"summary: [bold]{path / 'summary.json'}[/]")
    if (path / "mr_vs_steps.png").exists():
        console.print(f"MR vs Dori steps: [bold]{path / 'mr_vs_steps.png'}[/]")
    if (path / "report.html").exists():
        console.print(f"report: [bold]{path / 'report.html'}[/]")


def main() -> None:
    app()


if __name__ == "__main__":
    sys.exit(main())
