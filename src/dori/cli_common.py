"""What every ``dori`` command shares: option types, logging set-up, error handling, progress bars.

Kept apart from :mod:`dori.cli` so sub-apps (:mod:`dori.cli_analyze`) import it without a cycle.
"""

from __future__ import annotations

import functools
import logging
import os
from pathlib import Path
from typing import Annotated

import typer

# -- options defined once ---------------------------------------------------------------------
Model = Annotated[str, typer.Option("--model", "-m", help="'testbed', a pipeline folder, or a hub id.")]
Out = Annotated[Path | None, typer.Option("--out", "-o", help="Run folder (default runs/<command>-<model>-<time>).")]
Overwrite = Annotated[bool, typer.Option("--overwrite", help="Replace a run folder made with another config.")]
Seeds = Annotated[int, typer.Option("--seeds", help="Images per prompt (seeds seed .. seed+N-1).")]
Seed = Annotated[int, typer.Option("--seed", help="First seed.")]
Steps = Annotated[int, typer.Option("--steps", help="Denoising steps (num_inference_steps).")]
Guidance = Annotated[float, typer.Option("--guidance", help="Classifier-free guidance scale.")]
BatchSize = Annotated[int, typer.Option("--batch-size", help="Images per pipeline call.")]
Device = Annotated[str, typer.Option("--device", help="torch device, e.g. cpu or cuda.")]
Verbose = Annotated[bool, typer.Option("--verbose", "-v", help="Show library log messages.")]


def _console(stderr: bool = False):
    from rich.console import Console

    console = Console(stderr=stderr)
    if not console.is_terminal:  # piped or captured: do not squeeze tables into 80 columns
        console = Console(stderr=stderr, width=160)
    return console


def _setup(verbose: bool) -> None:
    from rich.logging import RichHandler

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(message)s",
                        handlers=[RichHandler(console=_console(stderr=True), show_path=False)], force=True)
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*torchvision.*")


def handle_errors(fn):
    """User errors (:class:`DoriError`) become one red line on stderr and exit code 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from .errors import DoriError

        try:
            return fn(*args, **kwargs)
        except DoriError as exc:
            from rich.markup import escape

            _console(stderr=True).print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            _console(stderr=True).print("interrupted: run the same command again to resume")
            raise typer.Exit(130) from None

    return wrapper


class _Bars:
    """One rich progress bar per stage."""

    def __init__(self):
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self.progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TimeElapsedColumn(), TimeRemainingColumn(), TextColumn("{task.fields[info]}"),
                                 console=_console(stderr=True), transient=False)
        self.tasks: dict[str, int] = {}

    def __enter__(self):
        self.progress.__enter__()
        return self

    def __exit__(self, *exc):
        return self.progress.__exit__(*exc)

    def update(self, stage: str, done: int, total: int, info: str = "") -> None:
        if stage not in self.tasks:
            self.tasks[stage] = self.progress.add_task(stage, total=total, info="")
        self.progress.update(self.tasks[stage], completed=done, total=total, info=info)

    def callback(self, stage: str):
        return lambda done, total: self.update(stage, done, total)
