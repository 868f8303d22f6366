"""``dori references``: fetch a prompt set's training images from the URLs it lists."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from .options import INPUT_PANEL, Bars, Limit, Verbose, console, handle_errors, setup


@handle_errors
def references(
    out: Annotated[Path, typer.Option("--out", "-o", help="The references folder (<prompt id>.<ext>, references.csv); a rerun resumes.")],
    prompts: Annotated[str, typer.Option("--prompts", "-p", help="A prompt set with image URLs (webster-sd1, webster-sd1-vm, webster-sd2, laion-nonmem, or a CSV/JSONL with a url column).", rich_help_panel=INPUT_PANEL)] = "webster-sd1-vm",
    limit: Limit = None,
    workers: Annotated[int, typer.Option(help="Downloads at once.")] = 8,
    retries: Annotated[int, typer.Option(help="Further tries of a transient failure (timeout, 5xx), with back-off.")] = 3,
    timeout: Annotated[float, typer.Option(help="Seconds per request.")] = 20.0,
    refresh: Annotated[bool, typer.Option("--refresh", help="Fetch kept images again; report those whose bytes changed.")] = False,
    verbose: Verbose = False,
) -> None:
    """Fetch the training images of a prompt set into a references folder (concurrent, retried, resumable,
    every file checked), with a table of dead and changed links."""
    setup(verbose)
    from rich.table import Table

    from ..references import GOOD, TABLE, FetchConfig, fetch_references

    config = FetchConfig(prompts=prompts, limit=limit, workers=workers, retries=retries, timeout=timeout,
                         refresh=refresh)
    with Bars() as bars:
        result = fetch_references(config, out, progress=bars)
    counts = result.counts()
    table = Table(title=f"references of {prompts}")
    table.add_column("status")
    table.add_column("images", justify="right")
    for status, n in sorted(counts.items(), key=lambda kv: (kv[0] not in GOOD, kv[0])):
        table.add_row(status, str(n))
    out_console = console()
    out_console.print(table)
    usable = sum(counts.get(s, 0) for s in GOOD)
    out_console.print(f"{usable} of {len(result.rows)} images usable in [bold]{result.folder}[/] "
                      f"(every link and its status: {result.folder / TABLE})")
