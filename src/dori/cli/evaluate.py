"""``dori evaluate``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from .options import (
    Bars,
    BatchSize,
    ConfigFile,
    Descriptor,
    Device,
    Dtype,
    Guidance,
    Limit,
    Mitigation,
    MitigationUnion,
    Model,
    ModelConfig,
    Out,
    Overwrite,
    Preset,
    Prompts,
    References,
    Scheduler,
    Seed,
    Seeds,
    ShowConfig,
    SSCDPreprocess,
    Steps,
    Threshold,
    Verbose,
    console,
    handle_errors,
    paths,
    resolve,
    setup,
    text,
)

FIELDS = {"prompts": "prompts", "references": ("references", text), "seeds": "num_seeds", "seed": "seed",
          "steps": "generation.num_inference_steps", "guidance": "generation.guidance_scale",
          "batch_size": "generation.batch_size", "descriptor": "descriptor.spec",
          "sscd_preprocess": "descriptor.preprocess", "threshold": "descriptor.threshold", "limit": "limit",
          "baseline": ("baseline", text), "mitigation": ("mitigations", paths), "mitigation_union": "mitigation_union"}


@handle_errors
def evaluate(
    ctx: typer.Context,
    prompts: Prompts = "testbed:memorized",
    references: References = None,
    seeds: Seeds = 10,
    seed: Seed = 0,
    steps: Steps = 25,
    guidance: Guidance = 7.5,
    batch_size: BatchSize = 16,
    descriptor: Descriptor = "auto",
    sscd_preprocess: SSCDPreprocess = "nemo",
    threshold: Threshold = None,
    limit: Limit = None,
    baseline: Annotated[Path | None, typer.Option(help="A finished evaluate run of the same prompts/seeds: adds SSCD_gen.")] = None,
    mitigation: Mitigation = None,
    mitigation_union: MitigationUnion = False,
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
    """Generate images per prompt and score them for replication (SSCD_orig, MR, noise norm)."""
    setup(verbose)
    from ..evaluate import EvaluateConfig, run_evaluate
    from .tables import rows_table

    settings = resolve(ctx, EvaluateConfig, "evaluate", FIELDS)
    pipe = settings.load()
    with Bars() as bars:
        result = run_evaluate(pipe, settings.config, out, overwrite=overwrite, progress=bars)
    from accelerate import PartialState

    if PartialState(cpu=pipe.unet.device.type == "cpu").is_main_process:
        out_console = console()
        out_console.print(rows_table(result.summary["rows"], f"evaluate {settings.config.prompts} on {settings.model}",
                                     result.summary["threshold"]))
        out_console.print(f"run folder: [bold]{result.path}[/]")
