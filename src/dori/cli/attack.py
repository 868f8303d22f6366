"""``dori attack``."""

from __future__ import annotations

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
    Mitigation,
    MitigationUnion,
    Model,
    ModelConfig,
    Out,
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

FIELDS = {"prompts": "prompts", "references": ("references", text), "limit": "limit", "recipe": "recipe",
          "mitigation": ("mitigations", paths), "mitigation_union": "mitigation_union", "adaptive": "adaptive", "init": "init", "other_prompt": "other_prompt",
          "steps": "attack.steps", "lr": "attack.lr", "pairs": "attack.pairs", "restarts": "restarts",
          "seeds": "num_seeds", "seed": "seed", "early_stop": "attack.early_stop",
          "check_confirm": "attack.check_confirm", "check_tail": "attack.check_tail", "constraint": "constraint", "radius": "radius",
          "batch_size": "batch_size", "eval_steps": "generation.num_inference_steps",
          "guidance": "generation.guidance_scale", "descriptor": "descriptor.spec",
          "sscd_preprocess": "descriptor.preprocess", "threshold": "descriptor.threshold"}


@handle_errors
def attack(
    ctx: typer.Context,
    prompts: Annotated[str, typer.Option("--prompts", "-p", help="Prompts whose training images to re-trigger (need references).", rich_help_panel=INPUT_PANEL)] = "testbed:memorized",
    references: References = None,
    mitigation: Mitigation = None,
    mitigation_union: MitigationUnion = False,
    adaptive: Annotated[bool, typer.Option(help="Optimise through inference-time mitigations (wen, ren, random-tokens); --no-adaptive: optimise without them, apply them only to the check's images.")] = True,
    recipe: Annotated[str, typer.Option(help="A registered attack recipe (dori_kowalczuk2025: the paper's; dori_low_noise_norm: also keeps Wen's noise norm low).")] = "dori_kowalczuk2025",
    init: Annotated[str, typer.Option(help="Start from the 'prompt' embedding, 'random' N(0, I), or an 'other' prompt's.")] = "prompt",
    other_prompt: Annotated[str | None, typer.Option(help="The prompt for --init other (default: a shape caption on the testbed, a non-memorized LAION prompt elsewhere).")] = None,
    steps: Annotated[int, typer.Option("--steps", help="Adam steps (the paper: 50).")] = 50,
    lr: Annotated[float, typer.Option(help="Adam learning rate (the paper: 0.1).")] = 0.1,
    pairs: Annotated[int, typer.Option(help="(noise, t) pairs per step (the paper: 8).")] = 8,
    restarts: Annotated[int, typer.Option(help="Triggers per prompt.")] = 1,
    seeds: Annotated[int, typer.Option("--seeds", help="Images per trigger for the success check.")] = 10,
    seed: Annotated[int, typer.Option("--seed", help="First seed of the success check and of every draw.")] = 0,
    eval_steps: Annotated[int, typer.Option(help="Denoising steps of the success check's images.")] = 25,
    guidance: Annotated[float, typer.Option("--guidance", help="Guidance scale of the success check's images.")] = 7.5,
    early_stop: Annotated[bool, typer.Option(help="Stop a trigger once a 5-step sample from it replicates (not in the paper).")] = False,
    check_confirm: Annotated[int, typer.Option(help="With --early-stop: consecutive passing checks (4 steps apart) before stopping.")] = 1,
    check_tail: Annotated[int, typer.Option(help="With --early-stop: steps a trigger keeps optimising after its checks passed.")] = 6,
    constraint: Annotated[str, typer.Option(help="none, l2 (relative radius) or linf.")] = "none",
    radius: Annotated[float | None, typer.Option(help="Radius of the --constraint ball.")] = None,
    batch_size: Annotated[int, typer.Option(help="Triggers optimised together.")] = 8,
    descriptor: Descriptor = "auto",
    sscd_preprocess: SSCDPreprocess = "nemo",
    threshold: Threshold = None,
    limit: Limit = None,
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
    """Dori: optimise the text embedding until the (mitigated) model replicates the training image."""
    setup(verbose)
    from ..attack.run import AttackRunConfig, run_attack
    from .tables import attack_table

    settings = resolve(ctx, AttackRunConfig, "attack", FIELDS)
    pipe = settings.load()
    with Bars() as bars:
        path, records = run_attack(pipe, settings.config, out, overwrite=overwrite, progress=bars)
    names = ", ".join(p.rsplit("/", 1)[-1] for p in settings.config.mitigations)
    out_console = console()
    out_console.print(attack_table(f"{settings.config.recipe} on {settings.model}" + (f" + {names}" if names else ""),
                                   records))
    out_console.print(f"run folder: [bold]{path}[/] (triggers.safetensors)")
