"""``dori analyze scatter|activations|weights``: the paper's three locality analyses (typer sub-app).

Registered in :mod:`dori.cli` with ``app.add_typer(cli_analyze.app, name="analyze")``; the shared CLI
helpers (option types, error handling, progress bars, logging set-up) come from :mod:`dori.cli_common`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from .cli_common import Device, Model, Overwrite, Verbose, _Bars, _console, _setup, handle_errors

app = typer.Typer(help="Is memorization local? The paper's locality analyses: trigger scatter, activation "
                       "discrepancy, weight agreement.", no_args_is_help=True)

# -- options (the shared ones come from dori.cli_common) ------------------------------------------
TriggerModel = Annotated[str | None, typer.Option("--model", "-m", help="Model (default: the one the triggers were found on).")]
Out = Annotated[Path | None, typer.Option("--out", "-o", help="Run folder (default runs/analyze-<what>-<model>-<time>).")]
Triggers = Annotated[Path, typer.Option("--triggers", "-t", help="A `dori analyze scatter` or `dori attack` run folder.")]
PromptId = Annotated[str | None, typer.Option("--prompt-id", help="Which image's triggers (default: the run's first).")]
AllTriggers = Annotated[bool, typer.Option("--all-triggers", help="Also use triggers that did not replicate (default: only successful ones, as the paper).")]
MaxTriggers = Annotated[int, typer.Option(help="At most N triggers in Y_adv (the paper: 100).")]
Memorized = Annotated[str, typer.Option("--memorized", help="Prompt set for Y_mem (different memorized prompts).")]
MaxMemorized = Annotated[int, typer.Option(help="At most N prompts in Y_mem (the paper: 100).")]


def _load(model: str | None, triggers: Path | None, device: str):
    from .analysis.triggers import run_model
    from .models import load_pipeline

    if model is None:
        model = (run_model(triggers) if triggers is not None else None) or "testbed"
    return load_pipeline(model, device=device)


def _print_paths(path: Path, figure: str) -> None:
    console = _console()
    console.print(f"run folder: [bold]{path}[/] (table.parquet, summary.json)")
    console.print(f"figure: [bold]{path / (figure + '.png')}[/] and .pdf")


@app.command("scatter")
@handle_errors
def scatter(
    prompts: Annotated[str, typer.Option("--prompts", "-p", help="Prompt set of the image (needs references); the attack uses its first prompt.")] = "testbed:memorized",
    prompt_id: Annotated[str | None, typer.Option("--prompt-id", help="The image's prompt id (must be the set's first).")] = None,
    model: Model = "testbed",
    starts: Annotated[int, typer.Option(help="Random N(0, I) starts, one Dori run each (the paper: 100).")] = 100,
    steps: Annotated[int, typer.Option("--steps", help="Adam steps per start (the paper: 50).")] = 50,
    lr: Annotated[float, typer.Option(help="Adam learning rate (the paper: 0.1).")] = 0.1,
    pairs: Annotated[int, typer.Option(help="(noise, t) pairs per step (the paper: 8).")] = 8,
    seeds: Annotated[int, typer.Option("--seeds", help="Images per trigger for the success check.")] = 10,
    eval_steps: Annotated[int, typer.Option(help="Denoising steps of the success check's images.")] = 25,
    batch_size: Annotated[int, typer.Option(help="Triggers optimised together.")] = 8,
    reference_prompts: Annotated[str | None, typer.Option(help="Non-memorized prompts to compare distances with (default: testbed:seen-once, or laion-nonmem).")] = None,
    reference_count: Annotated[int, typer.Option(help="How many of them (evenly spaced).")] = 100,
    tsne_seed: Annotated[int, typer.Option(help="t-SNE random_state.")] = 0,
    perplexity: Annotated[float, typer.Option(help="t-SNE perplexity (clipped to (points - 1) / 3).")] = 30.0,
    mitigation: Annotated[list[Path] | None, typer.Option("--mitigation", help="Attack a mitigated model (a saved mitigation); repeatable.")] = None,
    device: Device = "cpu",
    out: Out = None,
    overwrite: Overwrite = False,
    verbose: Verbose = False,
) -> None:
    """A: Dori triggers of one image from random starts; t-SNE and pairwise distances vs non-memorized prompts."""
    _setup(verbose)
    from .analysis.scatter import ScatterConfig, run_scatter
    from .attack.loop import AttackConfig
    from .generation import GenerationConfig
    from .models import load_pipeline

    config = ScatterConfig(prompts=prompts, prompt_id=prompt_id, starts=starts, num_seeds=seeds, batch_size=batch_size,
                           attack=AttackConfig(steps=steps, lr=lr, pairs=pairs, record_at=(0,)),
                           generation=GenerationConfig(num_inference_steps=eval_steps),
                           mitigations=tuple(str(p) for p in mitigation or ()), reference_prompts=reference_prompts,
                           reference_count=reference_count, tsne_seed=tsne_seed, perplexity=perplexity)
    config.validate()
    pipe = load_pipeline(model, device=device)
    with _Bars() as bars:
        path, summary = run_scatter(pipe, config, out, overwrite=overwrite, progress=bars.update)
    from rich.table import Table

    table = Table(title=f"trigger scatter: {summary['prompt_id']} ({summary['n_succeeded']}/{summary['n_starts']} "
                        "random starts replicate)")
    for col in ("pairwise L2 among", "members", "pairs", "mean", "median"):
        table.add_column(col, justify="left" if col == "pairwise L2 among" else "right")
    for name, s in summary["distances"].items():
        if s["n_pairs"]:
            table.add_row(name, str(s["n_members"]), str(s["n_pairs"]), f"{s['mean']:.2f}", f"{s['median']:.2f}")
    console = _console()
    console.print(table)
    console.print(f"triggers / non-memorized prompts: mean ratio {summary['ratio_mean']:.2f}, median ratio "
                  f"{summary['ratio_median']:.2f}; note: {summary['note']}")
    _print_paths(path, "scatter")


@app.command("activations")
@handle_errors
def activations(
    triggers: Triggers,
    prompt_id: PromptId = None,
    all_triggers: AllTriggers = False,
    max_triggers: MaxTriggers = 100,
    memorized: Memorized = "testbed:memorized",
    max_memorized: MaxMemorized = 100,
    seed: Annotated[int, typer.Option("--seed", help="The one initial noise for every embedding.")] = 0,
    steps: Annotated[int, typer.Option("--steps", help="Schedule length; its first denoising step is used.")] = 50,
    model: TriggerModel = None,
    device: Device = "cpu",
    out: Out = None,
    overwrite: Overwrite = False,
    verbose: Verbose = False,
) -> None:
    """B: activation discrepancy per layer, one image's triggers (Y_adv) vs different memorized prompts (Y_mem)."""
    _setup(verbose)
    from .analysis.activations import ActivationsConfig, run_activations

    config = ActivationsConfig(triggers=str(triggers), prompt_id=prompt_id, successful_only=not all_triggers,
                               max_triggers=max_triggers, memorized=memorized, max_memorized=max_memorized, seed=seed,
                               num_inference_steps=steps)
    config.validate()
    pipe = _load(model, triggers, device)
    with _Bars() as bars:
        path, summary = run_activations(pipe, config, out, overwrite=overwrite, progress=bars.update)
    from rich.table import Table

    from .analysis.common import short_name

    table = Table(title=f"activation discrepancy: {summary['n_adv']} triggers of {summary['prompt_id']} (Y_adv) vs "
                        f"{summary['n_mem']} memorized prompts (Y_mem)")
    starts = summary["control_starts"]
    for col in ("method", "layer", "Y_mem", "Y_adv", "Y_adv / Y_mem") + (("Y_0 (starts)", "Y_adv / Y_0") if starts else ()):
        table.add_column(col, justify="left" if col in ("method", "layer") else "right")
    for method, m in summary["methods"].items():
        for i, layer in enumerate(m["layers"]):
            cells = [f"{m['Y_mem'][i]:.3g}", f"{m['Y_adv'][i]:.3g}", f"{m['ratio_adv_over_mem'][i]:.2f}"]
            if starts:
                cells += [f"{m['Y_0'][i]:.3g}", f"{m['ratio_adv_over_starts'][i]:.2f}"]
            table.add_row(method, short_name(layer), *cells)
    console = _console()
    console.print(table)
    console.print(f"note: {summary['note']}")
    _print_paths(path, "activations")


@app.command("weights")
@handle_errors
def weights(
    triggers: Triggers,
    prompt_id: PromptId = None,
    all_triggers: AllTriggers = False,
    max_triggers: MaxTriggers = 100,
    memorized: Memorized = "testbed:memorized",
    max_memorized: MaxMemorized = 100,
    method: Annotated[list[str] | None, typer.Option("--method", help="nemo and/or wanda (default both); repeatable.")] = None,
    nemo_seeds: Annotated[int, typer.Option(help="Seeds of NeMo's memorization test.")] = 10,
    statistics: Annotated[str | None, typer.Option(help="NeMo's non-memorized prompts (default as dori localize).")] = None,
    sparsity: Annotated[float, typer.Option(help="Wanda's share r of each weight row.")] = 0.01,
    timesteps: Annotated[int, typer.Option(help="Wanda's union over the first N denoising steps.")] = 10,
    wanda_steps: Annotated[int, typer.Option(help="Wanda's sampling steps.")] = 50,
    model: TriggerModel = None,
    device: Device = "cpu",
    out: Out = None,
    overwrite: Overwrite = False,
    verbose: Verbose = False,
) -> None:
    """C: weight agreement (IoU) of NeMo's and Wanda's own localisation, run once per embedding."""
    _setup(verbose)
    from .analysis.weights import METHODS, WeightsConfig, run_weights
    from .mitigations.nemo import NeMoConfig
    from .mitigations.wanda import WandaConfig

    config = WeightsConfig(triggers=str(triggers), prompt_id=prompt_id, successful_only=not all_triggers,
                           max_triggers=max_triggers, memorized=memorized, max_memorized=max_memorized,
                           methods=tuple(method) if method else METHODS, nemo=NeMoConfig(num_seeds=nemo_seeds),
                           wanda=WandaConfig(sparsity=sparsity, timesteps=timesteps, num_inference_steps=wanda_steps),
                           statistics=statistics)
    config.validate()
    pipe = _load(model, triggers, device)
    with _Bars() as bars:
        path, summary = run_weights(pipe, config, out, overwrite=overwrite, progress=bars.update)
    from rich.table import Table

    from .analysis.common import short_name

    table = Table(title=f"weight agreement (mean pairwise IoU): {summary['n_adv']} triggers of {summary['prompt_id']}, "
                        f"{summary['n_mem']} memorized prompts; ∅ = nothing selected (IoU 1 by definition)")
    for col in ("method", "layer", "Y_mem", "Y_adv", "Y_adv vs original"):
        table.add_column(col, justify="left" if col in ("method", "layer") else "right")
    for name, m in summary["methods"].items():
        for layer in m["Y_adv"]["iou_by_layer"]:
            cells = []
            for comparison in ("Y_mem", "Y_adv", "Y_adv vs original"):
                c = m[comparison]
                mark = " ∅" if layer in c["layers_with_nothing_selected"] else ""
                cells.append(f"{c['iou_by_layer'][layer]:.2f}{mark}")
            table.add_row(name, short_name(layer), *cells)
    console = _console()
    console.print(table)
    console.print(f"note: {summary['note']}")
    _print_paths(path, "weights")
