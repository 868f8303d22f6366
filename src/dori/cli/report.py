"""``dori report`` and ``dori demo``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from .options import (
    INPUT_PANEL,
    Bars,
    ConfigFile,
    Descriptor,
    Device,
    Dtype,
    Limit,
    Model,
    ModelConfig,
    Out,
    Overwrite,
    Preset,
    References,
    Scheduler,
    ShowConfig,
    SSCDPreprocess,
    Verbose,
    console,
    handle_errors,
    resolve,
    setup,
    text,
)


@handle_errors
def report(
    runs: Annotated[list[Path], typer.Argument(help="Run folders (a demo, attack, analysis ... run).")],
    out: Annotated[Path | None, typer.Option("--out", "-o", help="HTML file (default <first run>/report.html).")] = None,
    title: Annotated[str | None, typer.Option(help="Page title.")] = None,
    verbose: Verbose = False,
) -> None:
    """One self-contained HTML page (tables, image grids, figures, manifests) for one or more runs."""
    setup(verbose)
    from ..report import write_report

    path = write_report(list(runs), out, title=title)
    console().print(f"report: [bold]{path}[/]")


@handle_errors
def demo(
    ctx: typer.Context,
    quick: Annotated[bool, typer.Option("--quick", help="Fewer seeds, prompts and steps everywhere (the testbed; a few minutes).")] = False,
    prompts: Annotated[str | None, typer.Option("--prompts", "-p", help="Memorized prompts on your model (default webster-sd1-vm).", rich_help_panel=INPUT_PANEL)] = None,
    references: References = None,
    non_memorized: Annotated[str, typer.Option(help="Non-memorized prompts on your model (the control rows).", rich_help_panel=INPUT_PANEL)] = "laion-nonmem",
    non_memorized_references: Annotated[Path | None, typer.Option(help="Their training images; without them the non-memorized rows are left out.", rich_help_panel=INPUT_PANEL)] = None,
    descriptor: Descriptor = "auto",
    sscd_preprocess: SSCDPreprocess = "nemo",
    limit: Limit = None,
    seeds: Annotated[int, typer.Option("--seeds", help="Images per prompt and per trigger on your model.")] = 10,
    starts: Annotated[int, typer.Option(help="Random starts of the trigger scatter on your model (the paper: 100).")] = 10,
    finetune: Annotated[bool, typer.Option("--finetune/--no-finetune", help="Adversarial fine-tuning rows (Table 2; the testbed).")] = True,
    analyses: Annotated[bool, typer.Option("--analyses/--no-analyses", help="The three locality analyses.")] = True,
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
    """The paper in one command: Table 1 (memorized, non-memorized, NeMo, Wanda, each + Dori), Table 2 on the
    testbed (adversarial fine-tuning, ESD, Concept Ablation, SISS, Wanda at 10%, each + Dori), the
    inference-time mitigations (Wen, Ren, random tokens) against the non-adaptive and the adaptive attack,
    detection under attack, the leaderboard, utility, the locality analyses, summary.json, plots and
    report.html. On your model: --model, --references, --descriptor (and --preset paper-sd1)."""
    setup(verbose)
    from ..config_files import merge, to_dict
    from ..demo import DemoConfig, run_demo
    from ..descriptors import DescriptorConfig
    from ..models import is_template_testbed, is_testbed_model
    from .tables import rows_table

    if is_testbed_model(model):
        config = DemoConfig.quick() if quick else DemoConfig()
        base = to_dict(config.on_template_testbed(quick) if is_template_testbed(model) else config)
    else:
        base = to_dict(DemoConfig.paper(prompts or "webster-sd1-vm", text(references), non_memorized=non_memorized,
                                        non_memorized_references=text(non_memorized_references), limit=limit,
                                        num_seeds=seeds, starts=starts, analyses=analyses,
                                        descriptor=DescriptorConfig(descriptor, sscd_preprocess)))
        if preset:
            from ..presets import demo_settings

            base = merge(base, demo_settings(preset))
    settings = resolve(ctx, DemoConfig, "demo", {"finetune": "finetune", "analyses": "analyses"}, base=base)
    with Bars() as bars:
        path, rows = run_demo(settings.load(), settings.config, out, overwrite=overwrite, progress=bars)
    import json

    threshold = json.loads((path / "manifest.json").read_text()).get("threshold")
    out_console = console()
    out_console.print(rows_table(rows, settings.config.title, threshold))
    out_console.print(f"summary: [bold]{path / 'summary.json'}[/]")
    for name, what in (("mr_vs_steps.png", "MR vs Dori steps"), ("report.html", "report")):
        if (path / name).exists():
            out_console.print(f"{what}: [bold]{path / name}[/]")
