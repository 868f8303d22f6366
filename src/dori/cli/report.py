"""``dori report`` and ``dori demo``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from .options import (
    Bars,
    ConfigFile,
    Device,
    Dtype,
    Model,
    Out,
    Overwrite,
    ShowConfig,
    Verbose,
    console,
    handle_errors,
    resolve,
    setup,
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
    quick: Annotated[bool, typer.Option("--quick", help="Fewer seeds, prompts and steps everywhere (a few minutes).")] = False,
    finetune: Annotated[bool, typer.Option("--finetune/--no-finetune", help="Adversarial fine-tuning rows (Table 2).")] = True,
    analyses: Annotated[bool, typer.Option("--analyses/--no-analyses", help="The three locality analyses.")] = True,
    model: Model = "testbed",
    device: Device = "cpu",
    dtype: Dtype = "float32",
    out: Out = None,
    overwrite: Overwrite = False,
    config_file: ConfigFile = None,
    show_config: ShowConfig = False,
    verbose: Verbose = False,
) -> None:
    """The main job: the paper's Tables 1 and 2 on the testbed (memorization, NeMo, Wanda, Dori, adversarial
    fine-tuning), utility, the locality analyses, summary.json, plots and report.html."""
    setup(verbose)
    from ..config_files import to_dict
    from ..demo import DemoConfig, run_demo
    from .tables import rows_table

    base = to_dict(DemoConfig.quick()) if quick else None
    settings = resolve(ctx, DemoConfig, "demo", {"finetune": "finetune", "analyses": "analyses"}, base=base)
    with Bars() as bars:
        path, rows = run_demo(settings.load(), settings.config, out, overwrite=overwrite, progress=bars)
    import json

    threshold = json.loads((path / "manifest.json").read_text()).get("threshold")
    out_console = console()
    out_console.print(rows_table(rows, "dori demo: memorization on the testbed", threshold))
    out_console.print(f"summary: [bold]{path / 'summary.json'}[/]")
    for name, what in (("mr_vs_steps.png", "MR vs Dori steps"), ("report.html", "report")):
        if (path / name).exists():
            out_console.print(f"{what}: [bold]{path / name}[/]")
