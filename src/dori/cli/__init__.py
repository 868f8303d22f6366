"""The ``dori`` command line (typer + rich): one module per verb group, the shared options in
:mod:`dori.cli.options`. Heavy imports live inside the commands, so ``dori --help`` is instant."""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from . import analyze, attack, evaluate, leaderboard, mitigate, references, report, testbed

EXTRA = {"allow_extra_args": True, "ignore_unknown_options": True}

app = typer.Typer(help="Find, attack and remove memorized training images in text-to-image diffusion models.",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)


@app.callback()
def _processes(processes: Annotated[int, typer.Option(
        "--processes", min=1, help="Run the verb in N processes that share its work (accelerate launch; on CPU "
        "each gets 1/N of the cores). Give it before the verb: dori --processes 2 demo.")] = 1) -> None:
    from .launch import relaunch

    if processes > 1 and _ARGV is None:
        raise typer.BadParameter("needs the dori command line (dori.cli.main), which it starts again",
                                 param_hint="--processes")
    relaunch(processes, _ARGV or [])


app.command("demo", rich_help_panel="Run the paper")(report.demo)
app.command("evaluate", rich_help_panel="Measure")(evaluate.evaluate)
app.command("attack", rich_help_panel="Attack")(attack.attack)
app.command("mitigate", rich_help_panel="Mitigate", context_settings=EXTRA)(mitigate.mitigate)
app.command("localize", rich_help_panel="Mitigate")(mitigate.localize)
app.command("prune", rich_help_panel="Mitigate")(mitigate.prune)
app.command("ablate", rich_help_panel="Mitigate")(mitigate.ablate)
app.command("finetune", rich_help_panel="Mitigate")(mitigate.finetune)
app.add_typer(analyze.app, name="analyze", rich_help_panel="Measure")
app.command("report", rich_help_panel="Run the paper")(report.report)
app.command("leaderboard", rich_help_panel="Run the paper")(leaderboard.leaderboard)
app.command("references", rich_help_panel="Measure")(references.references)
app.add_typer(testbed.app, name="testbed", rich_help_panel="The embedded testbed")


_ARGV: list[str] | None = None
"""The command line of :func:`main` (``--processes`` starts the same command in several processes)."""


def main() -> None:
    global _ARGV
    _ARGV = sys.argv[1:]
    app()


if __name__ == "__main__":
    sys.exit(main())
