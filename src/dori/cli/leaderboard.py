"""``dori leaderboard``: every mitigation against Dori in one table, or several tables merged into one."""

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
def leaderboard(
    ctx: typer.Context,
    merge: Annotated[list[Path] | None, typer.Option("--merge", help="Leaderboard files or run folders to merge into one table (repeatable); nothing is run.")] = None,
    quick: Annotated[bool, typer.Option("--quick", help="Fewer seeds, prompts and steps (the testbed; a first look).")] = False,
    prompts: Annotated[str | None, typer.Option("--prompts", "-p", help="Memorized prompts on your model (default webster-sd1-vm).", rich_help_panel=INPUT_PANEL)] = None,
    references: References = None,
    non_memorized: Annotated[str, typer.Option(help="Non-memorized prompts on your model (the detectors' negatives).", rich_help_panel=INPUT_PANEL)] = "laion-nonmem",
    descriptor: Descriptor = "auto",
    sscd_preprocess: SSCDPreprocess = "nemo",
    limit: Limit = None,
    seeds: Annotated[int, typer.Option("--seeds", help="Images per prompt and per trigger on your model.")] = 10,
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
    """Every mitigation against Dori: MR, MR + Dori (non-adaptive and adaptive), the noise-norm detector's AUC on
    the triggers, utility and cost, as leaderboard.json / leaderboard.parquet and a report page. On the testbed
    the fitted models are cached; on your model: --model, --references, --descriptor. --merge joins the files
    of several models and machines into one table."""
    setup(verbose)
    from .tables import leaderboard_table

    if merge:
        from ..robustness import merge_leaderboards, write_leaderboard

        frame = merge_leaderboards(list(merge))
        rows = frame.astype(object).where(frame.notna(), None).to_dict("records")
        if out is not None:
            out.mkdir(parents=True, exist_ok=True)
            write_leaderboard(out, rows, {"merged": [str(p) for p in merge]})
        console().print(leaderboard_table(rows, f"dori leaderboard: {len(merge)} files merged"))
        if out is not None:
            console().print(f"merged: [bold]{out / 'leaderboard.json'}[/] and leaderboard.parquet")
        return
    from ..config_files import merge as merge_settings
    from ..config_files import to_dict
    from ..demo import DemoConfig, run_demo
    from ..descriptors import DescriptorConfig
    from ..models import is_template_testbed, is_testbed_model
    from ..robustness import read_leaderboard

    if is_testbed_model(model):
        config = DemoConfig.leaderboard(quick=quick)
        base = to_dict(config.on_template_testbed(quick) if is_template_testbed(model) else config)
    else:
        base = to_dict(DemoConfig.paper(prompts or "webster-sd1-vm", text(references), non_memorized=non_memorized,
                                        limit=limit, num_seeds=seeds, analyses=False,
                                        descriptor=DescriptorConfig(descriptor, sscd_preprocess)))
        base["title"] = f"dori leaderboard: {prompts or 'webster-sd1-vm'}"
        if preset:
            from ..presets import demo_settings

            base = merge_settings(base, demo_settings(preset))
    settings = resolve(ctx, DemoConfig, "leaderboard", {}, base=base)
    with Bars() as bars:
        path, _ = run_demo(settings.load(), settings.config, out, overwrite=overwrite, progress=bars)
    out_console = console()
    out_console.print(leaderboard_table(read_leaderboard(path), settings.config.title))
    out_console.print(f"leaderboard: [bold]{path / 'leaderboard.json'}[/] and leaderboard.parquet; "
                      f"report: [bold]{path / 'report.html'}[/]")
