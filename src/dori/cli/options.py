"""What every ``dori`` command shares: option types, settings from ``--config`` and the command line,
loading the model, logging set-up, error handling, progress bars.

Heavy imports (torch, diffusers) happen inside the commands, so ``dori --help`` is instant.
"""

from __future__ import annotations

import functools
import logging
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import typer

MODEL_PANEL = "Model"
INPUT_PANEL = "Inputs"
RUN_PANEL = "Run"

# -- options defined once ---------------------------------------------------------------------
Model = Annotated[str, typer.Option("--model", "-m", help="'testbed', a pipeline folder, or a hub id.",
                                    rich_help_panel=MODEL_PANEL)]
Device = Annotated[str, typer.Option("--device", help="torch device, e.g. cpu or cuda.", rich_help_panel=MODEL_PANEL)]
Dtype = Annotated[str, typer.Option("--dtype", help="float32, float16 or bfloat16.", rich_help_panel=MODEL_PANEL)]
ModelConfig = Annotated[Path | None, typer.Option("--model-config", help="For a single-file checkpoint (--model x.safetensors): "
                                                  "a pipeline folder of the same architecture for its configs.",
                                                  rich_help_panel=MODEL_PANEL)]
Scheduler = Annotated[str | None, typer.Option("--scheduler", help="Another sampler than the model's own: ddim, pndm, "
                                               "euler, dpm, ... or a diffusers class name.", rich_help_panel=MODEL_PANEL)]
Preset = Annotated[str | None, typer.Option("--preset", help="Settings of a setting for every verb: paper-sd1, paper-sd2, "
                                            "testbed (or a YAML file); --config and the command line still win.",
                                            rich_help_panel=RUN_PANEL)]
Prompts = Annotated[str, typer.Option("--prompts", "-p", help="Bundled set, testbed[:role], or a CSV/JSONL/TXT file; several joined by + are one set.",
                                      rich_help_panel=INPUT_PANEL)]
References = Annotated[Path | None, typer.Option(help="Folder of training images named <prompt id>.png (the testbed's "
                                                      "sets carry theirs).", rich_help_panel=INPUT_PANEL)]
Descriptor = Annotated[str, typer.Option("--descriptor", help="'auto' (the testbed's), or an SSCD TorchScript file.",
                                         rich_help_panel=INPUT_PANEL)]
SSCDPreprocess = Annotated[str, typer.Option(help="SSCD convention: nemo (320x320, ImageNet) or dcr (256, crop 224, 0.5).",
                                             rich_help_panel=INPUT_PANEL)]
Threshold = Annotated[float | None, typer.Option(help="Replication threshold (default: the descriptor's; 0.7 for SSCD).",
                                                 rich_help_panel=INPUT_PANEL)]
Mitigation = Annotated[list[Path] | None, typer.Option("--mitigation", help="A saved mitigation (.safetensors with its "
                                                       ".json); repeatable.", rich_help_panel=INPUT_PANEL)]
MitigationUnion = Annotated[bool, typer.Option("--mitigation-union", help="Apply a per-prompt mitigation's "
                                             "selections of every prompt together (for prompts it was not "
                                             "fitted on).", rich_help_panel=INPUT_PANEL)]
Limit = Annotated[int | None, typer.Option(help="Only the first N prompts.", rich_help_panel=INPUT_PANEL)]
Out = Annotated[Path | None, typer.Option("--out", "-o", help="Run folder (default runs/<command>-<model>-<time>).",
                                          rich_help_panel=RUN_PANEL)]
Overwrite = Annotated[bool, typer.Option("--overwrite", help="Replace a run folder made with another config.",
                                         rich_help_panel=RUN_PANEL)]
ConfigFile = Annotated[Path | None, typer.Option("--config", "-c", help="Settings from a YAML/JSON file or a run's "
                                                 "manifest.json (the command line wins).", rich_help_panel=RUN_PANEL)]
ShowConfig = Annotated[bool, typer.Option("--show-config", help="Print the resolved settings as YAML and exit "
                                          "(a file for --config).", rich_help_panel=RUN_PANEL)]
Verbose = Annotated[bool, typer.Option("--verbose", "-v", help="Show library log messages.", rich_help_panel=RUN_PANEL)]
Seeds = Annotated[int, typer.Option("--seeds", help="Images per prompt (seeds seed .. seed+N-1).")]
Seed = Annotated[int, typer.Option("--seed", help="First seed.")]
Steps = Annotated[int, typer.Option("--steps", help="Denoising steps (num_inference_steps).")]
Guidance = Annotated[float, typer.Option("--guidance", help="Classifier-free guidance scale.")]
BatchSize = Annotated[int, typer.Option("--batch-size", help="Images per pipeline call.")]

#: Options of the model and the run that are never part of a verb's settings.
COMMON = ("model", "model_config", "device", "dtype", "scheduler", "preset", "out", "overwrite", "config_file", "show_config", "verbose")


def console(stderr: bool = False):
    from rich.console import Console

    out = Console(stderr=stderr)
    if not out.is_terminal:  # piped or captured: do not squeeze tables into 80 columns
        out = Console(stderr=stderr, width=160)
    return out


def setup(verbose: bool) -> None:
    from rich.logging import RichHandler

    from .launch import is_main

    if not is_main():  # several launched processes: the main one prints the results, the others only errors
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 (for the life of the process)

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(message)s",
                        handlers=[RichHandler(console=console(stderr=True), show_path=False)], force=True)
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*torchvision.*")


def handle_errors(fn):
    """User errors (:class:`DoriError`) become one red line on stderr and exit code 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from ..errors import DoriError

        try:
            return fn(*args, **kwargs)
        except DoriError as exc:
            from rich.markup import escape

            console(stderr=True).print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            console(stderr=True).print("interrupted: run the same command again to resume")
            raise typer.Exit(130) from None
        except OSError as exc:  # the machine's answer (disk full, permission, missing file): the user's to fix
            import logging

            if logging.getLogger().isEnabledFor(logging.INFO):  # --verbose: the traceback too
                raise
            from rich.markup import escape

            where = f": {exc.filename}" if exc.filename else ""
            console(stderr=True).print(f"[bold red]error:[/] {escape((exc.strerror or str(exc)) + where)} "
                                       "(--verbose shows where)", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None

    return wrapper


class Bars:
    """One rich progress bar per stage; an instance is a :class:`dori.progress.Progress`."""

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
                                 console=console(stderr=True), transient=False)
        self.tasks: dict[str, int] = {}
        self.started = False

    def __enter__(self):  # the display starts with the first report: an early error prints no empty bar
        return self

    def __exit__(self, *exc):
        if self.started:
            return self.progress.__exit__(*exc)
        return None

    def __call__(self, stage: str, done: int, total: int, info: str = "") -> None:
        from .launch import is_main

        if not is_main():  # one set of bars: the main process's
            return
        if not self.started:
            self.progress.__enter__()
            self.started = True
        if stage not in self.tasks:
            self.tasks[stage] = self.progress.add_task(stage, total=total, info="")
        self.progress.update(self.tasks[stage], completed=done, total=total, info=info)


# -- settings: defaults < --config file < command line --------------------------------------------
@dataclass
class Settings:
    """A verb's resolved settings and where its model comes from."""

    config: Any
    model: str
    device: str
    dtype: str
    scheduler: str | None = None
    model_config: str | None = None

    def load(self):
        """The pipeline (on this process's device when ``accelerate launch`` runs several)."""
        from accelerate import PartialState

        from ..models import load_pipeline

        device = self.device
        state = PartialState(cpu=device.startswith("cpu"))
        if state.num_processes > 1 and device.startswith("cuda"):
            device = str(state.device)
        return load_pipeline(self.model, device=device, dtype=self.dtype, scheduler=self.scheduler,
                             model_config=self.model_config)


def given(ctx: typer.Context, name: str) -> bool:
    """Whether option ``name`` was set on the command line (or by its environment variable)."""
    source = ctx.get_parameter_source(name)  # typer may ship its own click: compare by name
    return getattr(source, "name", None) in ("COMMANDLINE", "ENVIRONMENT")


def resolve(ctx: typer.Context, cls: type, command: str, fields: dict[str, str | tuple[str, Callable]],
            base: dict | None = None, overrides: dict | None = None, method: str | None = None) -> Settings:
    """The verb's config of class ``cls``: its defaults, ``base`` laid over them, then the ``--preset``'s
    section for ``command`` (and ``method``), the ``--config`` file, ``overrides`` (settings parsed from
    the command line) and every option given on the command line. ``fields`` maps option names to
    dotted config paths (with a converter where the option's value needs one)."""
    from ..config_files import from_dict, merge, read_config_file, set_path, to_dict
    from ..runs import INVOCATION

    params = ctx.params
    INVOCATION.update(preset=params.get("preset"), config_file=text(params.get("config_file")))
    data, model = merge(to_dict(cls()), base or {}), {}
    if params.get("preset"):
        from ..presets import section

        part, model = section(params["preset"], command, method)
        data = merge(data, part)
    if params.get("config_file") is not None:
        from_file, from_file_model = read_config_file(params["config_file"], command)
        data, model = merge(data, from_file), {**model, **from_file_model}
    data = merge(data, overrides or {})
    for name, target in fields.items():
        if given(ctx, name):
            path, convert = target if isinstance(target, tuple) else (target, None)
            value = params[name]
            set_path(data, path, convert(value) if convert else value)
    config = from_dict(cls, data)
    pick = {key: params[key] if given(ctx, key) else model.get(key) or params.get(key)
            for key in ("device", "dtype", "scheduler", "model_config")}
    pick["model_config"] = str(pick["model_config"]) if pick["model_config"] else None
    location = params["model"] if given(ctx, "model") else model.get("location") or params["model"]
    if params.get("show_config"):
        show_config(config, {"model": location, **pick})
        raise typer.Exit(0)
    config.validate()
    if params.get("out") is not None:
        from ..runs import check_writable

        check_writable(params["out"])
    return Settings(config, location, pick["device"], pick["dtype"], pick["scheduler"], pick["model_config"])


def show_config(config, model: dict) -> None:
    import yaml

    from ..config_files import to_dict

    if hasattr(config, "resolved"):  # every setting of the method, not only those given
        config = config.resolved()
    shown = {k: v for k, v in model.items() if v is not None or k not in ("scheduler", "model_config")}
    typer.echo(yaml.safe_dump({**shown, **to_dict(config)}, sort_keys=False), nl=False)


def paths(values) -> tuple[str, ...]:
    """A repeatable path option as the config's tuple of strings."""
    return tuple(str(v) for v in values or ())


def text(value) -> str | None:
    return None if value is None else str(value)
