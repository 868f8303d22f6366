"""``dori analyze scatter|activations|weights``: the paper's three locality analyses (a typer sub-app)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from .options import (
    INPUT_PANEL,
    MODEL_PANEL,
    Bars,
    ConfigFile,
    Descriptor,
    Device,
    Dtype,
    Mitigation,
    Model,
    ModelConfig,
    Overwrite,
    Preset,
    References,
    Scheduler,
    ShowConfig,
    SSCDPreprocess,
    Threshold,
    Verbose,
    console,
    handle_errors,
    paths,
    resolve,
    setup,
    text,
)

app = typer.Typer(help="Is memorization local? The paper's locality analyses: trigger scatter, activation "
                       "discrepancy, weight agreement.", no_args_is_help=True)

# -- options of the analyses (the shared ones are in dori.cli.options) ------------------------------
TriggerModel = Annotated[str | None, typer.Option("--model", "-m", help="Model (default: the one the triggers were found on).", rich_help_panel=MODEL_PANEL)]
Out = Annotated[Path | None, typer.Option("--out", "-o", help="Run folder (default runs/analyze-<what>-<model>-<time>).", rich_help_panel="Run")]
Triggers = Annotated[Path | None, typer.Option("--triggers", "-t", help="A `dori analyze scatter` or `dori attack` run folder.", rich_help_panel=INPUT_PANEL)]
PromptId = Annotated[str | None, typer.Option("--prompt-id", help="Which image's triggers (default: the run's first).")]
AllTriggers = Annotated[bool, typer.Option("--all-triggers", help="Also use triggers that did not replicate (default: only successful ones, as the paper).")]
MaxTriggers = Annotated[int, typer.Option(help="At most N triggers in Y_adv (the paper: 100).")]
Memorized = Annotated[str, typer.Option("--memorized", help="Prompt set for Y_mem (different memorized prompts).", rich_help_panel=INPUT_PANEL)]
MaxMemorized = Annotated[int, typer.Option(help="At most N prompts in Y_mem (the paper: 100).")]


def _settings(ctx: typer.Context, cls, command: str, fields: dict):
    """The analysis' settings; its model defaults to the one the triggers were found on."""
    from ..analysis.triggers import run_model

    settings = resolve(ctx, cls, command, fields)
    if settings.model is None:
        triggers = getattr(settings.config, "triggers", None)
        settings.model = (run_model(triggers) if triggers else None) or "testbed"
    return settings


def _print_paths(path: Path, figure: str) -> None:
    out = console()
    out.print(f"run folder: [bold]{path}[/] (table.parquet, summary.json)")
    out.print(f"figure: [bold]{path / (figure + '.png')}[/] and .pdf")


SCATTER = {"prompts": "prompts", "references": ("references", text), "prompt_id": "prompt_id", "starts": "starts",
           "steps": "attack.steps", "lr": "attack.lr", "pairs": "attack.pairs", "seeds": "num_seeds",
           "eval_steps": "generation.num_inference_steps", "batch_size": "batch_size",
           "reference_prompts": "reference_prompts", "reference_count": "reference_count", "tsne_seed": "tsne_seed",
           "perplexity": "perplexity", "mitigation": ("mitigations", paths), "descriptor": "descriptor.spec",
           "sscd_preprocess": "descriptor.preprocess", "threshold": "descriptor.threshold"}
TRIGGERS = {"triggers": ("triggers", text), "prompt_id": "prompt_id", "all_triggers": ("successful_only", lambda v: not v),
            "max_triggers": "max_triggers", "memorized": "memorized", "max_memorized": "max_memorized"}


@app.command("scatter")
@handle_errors
def scatter(
    ctx: typer.Context,
    prompts: Annotated[str, typer.Option("--prompts", "-p", help="Prompt set of the image (needs references); the attack uses its first prompt.", rich_help_panel=INPUT_PANEL)] = "testbed:memorized",
    references: References = None,
    prompt_id: Annotated[str | None, typer.Option("--prompt-id", help="The image's prompt id (default: the set's first).")] = None,
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
    mitigation: Mitigation = None,
    descriptor: Descriptor = "auto",
    sscd_preprocess: SSCDPreprocess = "nemo",
    threshold: Threshold = None,
    model: Model = "testbed",
    model_config: ModelConfig = None,
    device: Device = "cpu",
    dtype: Dtype = "float32",
    scheduler: Scheduler = None,
    preset: Preset = None,
    out: Out = None,
    overwrite: Overwrite = False,
    config_file: ConfigFile = None,
    show_config: ShowConfig = False,
    verbose: Verbose = False,
) -> None:
    """A: Dori triggers of one image from random starts; t-SNE and pairwise distances vs non-memorized prompts."""
    setup(verbose)
    from rich.table import Table

    from ..analysis.scatter import ScatterConfig, run_scatter

    settings = resolve(ctx, ScatterConfig, "analyze-scatter", SCATTER)
    pipe = settings.load()
    with Bars() as bars:
        path, summary = run_scatter(pipe, settings.config, out, overwrite=overwrite, progress=bars)
    table = Table(title=f"trigger scatter: {summary['prompt_id']} ({summary['n_succeeded']}/{summary['n_starts']} "
                        "random starts replicate)")
    for col in ("pairwise L2 among", "members", "pairs", "mean", "median"):
        table.add_column(col, justify="left" if col == "pairwise L2 among" else "right")
    for name, s in summary["distances"].items():
        if s["n_pairs"]:
            table.add_row(name, str(s["n_members"]), str(s["n_pairs"]), f"{s['mean']:.2f}", f"{s['median']:.2f}")
    out_console = console()
    out_console.print(table)
    out_console.print(f"triggers / non-memorized prompts: mean ratio {summary['ratio_mean']:.2f}, median ratio "
                      f"{summary['ratio_median']:.2f}; note: {summary['note']}")
    _print_paths(path, "scatter")


@app.command("activations")
@handle_errors
def activations(
    ctx: typer.Context,
    triggers: Triggers = None,
    prompt_id: PromptId = None,
    all_triggers: AllTriggers = False,
    max_triggers: MaxTriggers = 100,
    memorized: Memorized = "testbed:memorized",
    max_memorized: MaxMemorized = 100,
    seed: Annotated[int, typer.Option("--seed", help="The one initial noise for every embedding.")] = 0,
    steps: Annotated[int, typer.Option("--steps", help="Schedule length; its first denoising step is used.")] = 50,
    statistic: Annotated[str, typer.Option(help="scored (what NeMo and Wanda score per neuron / input channel) or raw (the whole activation maps, flattened).")] = "scored",
    model: TriggerModel = None,
    model_config: ModelConfig = None,
    device: Device = "cpu",
    dtype: Dtype = "float32",
    scheduler: Scheduler = None,
    preset: Preset = None,
    out: Out = None,
    overwrite: Overwrite = False,
    config_file: ConfigFile = None,
    show_config: ShowConfig = False,
    verbose: Verbose = False,
) -> None:
    """B: activation discrepancy per layer, one image's triggers (Y_adv) vs different memorized prompts (Y_mem)."""
    setup(verbose)
    from rich.table import Table

    from ..analysis.activations import ActivationsConfig, run_activations
    from ..analysis.common import short_name

    settings = _settings(ctx, ActivationsConfig, "analyze-activations",
                         {**TRIGGERS, "seed": "seed", "steps": "num_inference_steps", "statistic": "statistic"})
    pipe = settings.load()
    with Bars() as bars:
        path, summary = run_activations(pipe, settings.config, out, overwrite=overwrite, progress=bars)
    table = Table(title=f"activation discrepancy ({summary['statistic']} statistic): {summary['n_adv']} triggers of {summary['prompt_id']} (Y_adv) vs "
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
    out_console = console()
    out_console.print(table)
    if summary.get("attention"):
        out_console.print(_attention_table(summary["attention"]))
    out_console.print(f"note: {summary['note']}")
    _print_paths(path, "activations")


def _attention_table(attention: dict):
    """Where each set's cross-attention looks: share on the first token, effective number of tokens."""
    from rich.table import Table

    from ..analysis.common import short_name

    sets = attention["sets"]
    table = Table(title="cross-attention at the first step: share on the first token / effective tokens attended")
    table.add_column("layer")
    for name in sets:
        table.add_column(name, justify="right")
    for i, layer in enumerate(attention["layers"]):
        table.add_row(short_name(layer), *[f"{s['first_token'][i]:.3f} / {s['effective_tokens'][i]:.1f}"
                                           for s in sets.values()])
    return table


@app.command("weights")
@handle_errors
def weights(
    ctx: typer.Context,
    triggers: Triggers = None,
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
    model_config: ModelConfig = None,
    device: Device = "cpu",
    dtype: Dtype = "float32",
    scheduler: Scheduler = None,
    preset: Preset = None,
    out: Out = None,
    overwrite: Overwrite = False,
    config_file: ConfigFile = None,
    show_config: ShowConfig = False,
    verbose: Verbose = False,
) -> None:
    """C: weight agreement (IoU) of NeMo's and Wanda's own localisation, run once per embedding."""
    setup(verbose)
    from rich.table import Table

    from ..analysis.common import short_name
    from ..analysis.weights import WeightsConfig, run_weights

    fields = {**TRIGGERS, "method": ("methods", tuple), "nemo_seeds": "nemo.num_seeds", "statistics": "nemo.statistics",
              "sparsity": "wanda.sparsity", "timesteps": "wanda.timesteps", "wanda_steps": "wanda.num_inference_steps"}
    settings = _settings(ctx, WeightsConfig, "analyze-weights", fields)
    pipe = settings.load()
    with Bars() as bars:
        path, summary = run_weights(pipe, settings.config, out, overwrite=overwrite, progress=bars)
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
    out_console = console()
    out_console.print(table)
    out_console.print(f"note: {summary['note']}")
    _print_paths(path, "weights")
