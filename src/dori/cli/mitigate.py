"""``dori mitigate METHOD`` (any registered mitigation) and its aliases ``localize`` (NeMo), ``prune`` (Wanda),
``ablate`` (whole-layer ablation) and ``finetune`` (adversarial fine-tuning).

A method's settings are the fields of its config, given as options after the method's name
(``dori mitigate nemo --num-seeds 4 --min-theta 1.5``; nested fields with a dot, ``--inner.steps 10``;
booleans as ``--refine`` / ``--no-refine``; a list field by repeating the option), or in a
``--config`` file under ``settings``. ``dori mitigate --list`` names the methods, ``dori mitigate
METHOD --options`` lists a method's settings.
"""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path
from typing import Annotated

import typer

from .options import (
    INPUT_PANEL,
    Bars,
    ConfigFile,
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
    Verbose,
    console,
    given,
    handle_errors,
    resolve,
    setup,
    text,
)

MitigatePrompts = Annotated[str, typer.Option("--prompts", "-p", help="The (memorized) prompts to fit on.",
                                              rich_help_panel=INPUT_PANEL)]
Bake = Annotated[Path | None, typer.Option(help="Also save the mitigated pipeline to this folder (methods that edit "
                                                "weights: wanda, ablation, adversarial-ft).")]
Scope = Annotated[str, typer.Option(help="'per-prompt' (a selection per prompt) or 'set' (one for the whole set).")]
PROMPT_FIELDS = {"prompts": "prompts", "references": ("references", text), "limit": "limit"}


# -- method options from the command line ---------------------------------------------------------
def _field_type(cls: type, path: str):
    from ..config_files import field_types

    kind = None
    for part in path.split("."):
        if not dataclasses.is_dataclass(cls):
            return None
        kind = field_types(cls).get(part)
        if kind is None:
            return None
        cls = kind
    return kind


def _is(kind, wanted) -> bool:
    return kind is wanted or wanted in typing.get_args(kind)


def _testbed_setting(preset: str | None, prompts: str | None) -> bool:
    """Whether a method's documented testbed setting applies: ``--preset testbed``, or no preset and the
    testbed's prompts (which only the testbed accepts)."""
    return preset == "testbed" or (preset is None and str(prompts).startswith("testbed"))


def _testbed_base(ctx: typer.Context, config_cls: type, preset: str | None, prompts: str | None,
                  model: str) -> dict | None:
    """Base settings of a method with a documented testbed setting where it applies (None elsewhere):
    ``Config.testbed()``, and on a testbed with template captions (a ``dori testbed build --recipe v2``
    folder) ``Config.testbed_v2()`` where the method has one, attacking every caption of each template
    (:data:`~dori.finetune.config.TEMPLATE_TESTBED_PROMPTS`) unless ``--prompts`` is given."""
    from ..config_files import to_dict

    if not hasattr(config_cls, "testbed") or not _testbed_setting(preset, prompts):
        return None
    from ..models import is_template_testbed

    if hasattr(config_cls, "testbed_v2") and is_template_testbed(model):
        from ..finetune.config import TEMPLATE_TESTBED_PROMPTS

        base: dict = {"settings": to_dict(config_cls.testbed_v2())}
        if not given(ctx, "prompts"):
            base["prompts"] = TEMPLATE_TESTBED_PROMPTS
        return base
    return {"settings": to_dict(config_cls.testbed())}


def method_options(method: str, config_cls: type, args: list[str]) -> dict:
    """``--field value`` / ``--flag`` / ``--no-flag`` arguments as a (nested) settings mapping."""
    from ..config_files import field_types, set_path
    from ..errors import DoriError

    out: dict = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or arg == "--":
            raise DoriError(f"{method}: unexpected argument {arg!r}; settings are given as --name value")
        name, equals, inline = arg[2:].partition("=")
        path = name.replace("-", "_")
        kind = _field_type(config_cls, path)
        if dataclasses.is_dataclass(kind) and "spec" in {f.name for f in dataclasses.fields(kind)}:
            path, kind = f"{path}.spec", _field_type(config_cls, f"{path}.spec")  # --descriptor FILE
        if kind is None and path.startswith("no_") and _is(_field_type(config_cls, path[3:]), bool):
            set_path(out, path[3:], False)
            i += 1
            continue
        if kind is None:
            options = ", ".join("--" + f.replace("_", "-") for f in field_types(config_cls))
            raise DoriError(f"{method}: no setting --{name} (settings: {options}; `dori mitigate {method} --options` "
                            "describes them)")
        if _is(kind, bool) and not equals:
            set_path(out, path, True)
            i += 1
            continue
        if not equals:
            if i + 1 >= len(args):
                raise DoriError(f"{method}: --{name} needs a value")
            inline, i = args[i + 1], i + 1
        value = None if inline.lower() in ("none", "null") and type(None) in typing.get_args(kind) else inline
        if typing.get_origin(kind) is tuple or tuple in [typing.get_origin(a) for a in typing.get_args(kind)]:
            current = out
            for part in path.split(".")[:-1]:
                current = current.setdefault(part, {})
            current.setdefault(path.split(".")[-1], []).extend(value.split(",") if value else [])
        else:
            set_path(out, path, value)
        i += 1
    return out


def _describe_options(method: str, config_cls: type) -> None:
    from rich.table import Table

    table = Table(title=f"settings of {method} ({config_cls.__module__}.{config_cls.__name__})")
    for col in ("option", "type", "default"):
        table.add_column(col)
    defaults = config_cls()
    for f in dataclasses.fields(config_cls):
        kind = typing.get_type_hints(config_cls)[f.name]
        value = getattr(defaults, f.name)
        shown = "(nested: --" + f.name.replace("_", "-") + ".<field>)" if dataclasses.is_dataclass(value) else repr(value)
        table.add_row("--" + f.name.replace("_", "-"), getattr(kind, "__name__", str(kind)).replace("typing.", ""), shown)
    console().print(table)


def _timestep_range(text: str) -> list[str]:
    """``--adv-timesteps LOW,HIGH`` as the two items the config's tuple field takes (checked there)."""
    from ..errors import DoriError

    parts = [p.strip() for p in text.split(",")]
    if len(parts) != 2 or not all(p.lstrip("-").isdigit() for p in parts):
        raise DoriError(f"adv_timesteps: give two integers LOW,HIGH (the range [low, high), e.g. 500,1000), got {text!r}")
    return parts


def _list_methods() -> None:
    from rich.table import Table

    from ..mitigations import MITIGATIONS

    table = Table(title="registered mitigations")
    for col in ("method", "kind", "what it is"):
        table.add_column(col)
    for name in MITIGATIONS.names():
        cls = MITIGATIONS.get(name)
        table.add_row(name, getattr(cls, "kind", "?"), (cls.__doc__ or "").strip().splitlines()[0])
    console().print(table)


# -- the verb and its aliases -----------------------------------------------------------------------
def _fit(ctx: typer.Context, method: str, fields: dict, base: dict, bake: Path | None, out: Path | None,
         overwrite: bool, overrides: dict | None = None) -> None:
    from ..errors import DoriError
    from ..mitigations import MitigateConfig, run_mitigate

    settings = resolve(ctx, MitigateConfig, "mitigate", fields, base={"method": method, **base},
                       overrides={"method": method, **(overrides or {})}, method=method)
    cls = settings.config.method_class()
    if bake is not None and not getattr(cls, "bakeable", False):
        raise DoriError(f"bake: {method} changes the model through hooks and cannot be saved into a pipeline folder")
    if bake is not None:
        from ..runs import check_writable

        check_writable(bake, option="bake")
    pipe = settings.load()
    with Bars() as bars:
        result = run_mitigate(pipe, settings.config, out, overwrite=overwrite, progress=bars)
    if bake is not None:
        result.mitigation.bake(pipe, bake)
    _print(result, pipe, settings.model, bake)


def _print(result, pipe, model: str, bake: Path | None) -> None:
    from .tables import layer_table

    out, summary = console(), result.summary
    if "neurons_per_layer" in summary:
        from rich.table import Table

        nemo = result.mitigation
        table = Table(title=f"NeMo neurons per layer (SSIM threshold {summary['ssim_threshold']:.3f})")
        table.add_column("prompt")
        table.add_column("memorized")
        for name in nemo.layer_names:
            table.add_column(name.replace(".transformer_blocks.0.attn2.to_v", ""), justify="right")
        table.add_column("total", justify="right")
        for r in nemo.results:
            counts = [len(r.refined.get(n, [])) for n in nemo.layer_names]
            table.add_row(r.prompt[:40], "yes" if r.memorized else "no", *map(str, counts), str(sum(counts)))
        out.print(table)
    if "sparsity_per_layer" in summary:
        out.print(layer_table(f"Wanda sparsity per layer (r = {result.mitigation.config.sparsity})", "zeroed weights",
                              {n: f"{100 * v:.2f}%" for n, v in summary["sparsity_per_layer"].items()}))
    if "layers" in summary and "factor" in summary:
        layers = result.mitigation.matched(pipe)
        out.print(layer_table(f"Layers scaled by {summary['factor']:g} on {model}", "weights",
                              {name: f"{module.weight.numel():,}" for name, module in layers.items()}))
    if "parameters" in summary:
        out.print(f"{summary['method']}: {summary['tensors']} tensors ({summary['parameters']:,} weights) changed "
                  f"in {summary.get('steps')} steps")
    if summary.get("pipeline"):
        out.print(f"fine-tuned pipeline: [bold]{summary['pipeline']}[/] (use it as --model)")
    out.print(f"mitigation: [bold]{result.artefact}[/] (use with --mitigation)"
              + (f"; mitigated pipeline: [bold]{bake}[/]" if bake else ""))
    out.print(f"run folder: [bold]{result.path}[/]")


@handle_errors
def mitigate(
    ctx: typer.Context,
    method: Annotated[str | None, typer.Argument(help="A registered mitigation (`--list` shows them).")] = None,
    prompts: MitigatePrompts = "testbed:memorized",
    references: References = None,
    limit: Limit = None,
    bake: Bake = None,
    list_methods: Annotated[bool, typer.Option("--list", help="List the registered mitigations and exit.")] = False,
    options: Annotated[bool, typer.Option("--options", help="List METHOD's settings and exit.")] = False,
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
    """Fit any registered mitigation on a prompt set and save it: METHOD's own settings follow as --name value."""
    setup(verbose)
    from ..errors import DoriError
    from ..mitigations import MITIGATIONS

    if list_methods:
        _list_methods()
        return
    if method is None:
        raise DoriError("method: name the mitigation to fit (`dori mitigate --list` shows them)")
    cls = MITIGATIONS.get(method)
    if options:
        _describe_options(method, cls.Config)
        return
    settings = {"settings": method_options(method, cls.Config, list(ctx.args))}
    # a method with a documented testbed setting (``Config.testbed()``) uses it on the testbed's prompts or
    # with --preset testbed, as `dori finetune` does; its official defaults everywhere else
    base = _testbed_base(ctx, cls.Config, preset, prompts, model) or {}
    _fit(ctx, method, PROMPT_FIELDS, base, bake, out, overwrite, overrides=settings)


@handle_errors
def localize(
    ctx: typer.Context,
    prompts: MitigatePrompts = "testbed:memorized",
    statistics: Annotated[str | None, typer.Option(help="Non-memorized prompts for the activation statistics and SSIM threshold (default: testbed seen-once + shape captions, or laion-nonmem).")] = None,
    scope: Scope = "per-prompt",
    seeds: Annotated[int, typer.Option("--seeds", help="Seeds of the memorization test.")] = 10,
    ssim_threshold: Annotated[float | None, typer.Option(help="Fixed SSIM threshold (default: calibrated per model).")] = None,
    min_theta: Annotated[float, typer.Option(help="Lowest z-score threshold of the initial selection.")] = 1.0,
    layers: Annotated[list[str] | None, typer.Option("--layers", help="Value-layer globs (default: down and mid blocks' attn2.to_v).")] = None,
    search_batch: Annotated[int, typer.Option(help="Initial-selection levels scored per UNet call (the UNet batch is this times the memorized-looking seeds; lower it if memory is short, 1: one level per call).")] = 8,
    limit: Limit = None,
    references: References = None,
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
    """NeMo: find memorization neurons in the cross-attention value layers (= dori mitigate nemo)."""
    setup(verbose)
    fields = {**PROMPT_FIELDS, "statistics": "settings.statistics", "scope": "settings.scope",
              "seeds": "settings.num_seeds", "ssim_threshold": "settings.ssim_threshold",
              "min_theta": "settings.min_theta", "layers": ("settings.layers", tuple),
              "search_batch": "settings.search_batch"}
    _fit(ctx, "nemo", fields, {}, None, out, overwrite)


@handle_errors
def prune(
    ctx: typer.Context,
    prompts: MitigatePrompts = "testbed:memorized",
    sparsity: Annotated[float, typer.Option(help="Share r of each weight row to consider (0.01; the paper's stronger ablation 0.1).")] = 0.01,
    timesteps: Annotated[int, typer.Option(help="Union over the first N denoising steps.")] = 10,
    steps: Annotated[int, typer.Option("--steps", help="Denoising steps of the sampling that records the activations.")] = 50,
    scope: Scope = "set",
    bake: Bake = None,
    limit: Limit = None,
    references: References = None,
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
    """Wanda: zero the FFN weights that score high for memorized vs empty prompts (= dori mitigate wanda)."""
    setup(verbose)
    fields = {**PROMPT_FIELDS, "sparsity": "settings.sparsity", "timesteps": "settings.timesteps",
              "steps": "settings.num_inference_steps", "scope": "settings.scope"}
    _fit(ctx, "wanda", fields, {}, bake, out, overwrite)


@handle_errors
def ablate(
    ctx: typer.Context,
    layer: Annotated[list[str] | None, typer.Option("--layer", "-l", help="Glob of UNet linears to ablate; repeatable (default '*ff.net.2', Wanda's layers; '*attn2.to_v' for NeMo's).")] = None,
    factor: Annotated[float, typer.Option(help="Scale of their weights (0 zeroes them).")] = 0.0,
    bake: Bake = None,
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
    """Whole-layer ablation, a diagnostic: what is left when every weight a pruning method could touch is gone
    (= dori mitigate ablation)."""
    setup(verbose)
    fields = {"layer": ("settings.layers", tuple), "factor": "settings.factor"}
    _fit(ctx, "ablation", fields, {"prompts": None}, bake, out, overwrite)


@handle_errors
def finetune(
    ctx: typer.Context,
    prompts: MitigatePrompts = "testbed:memorized",
    references: References = None,
    retain: Annotated[str | None, typer.Option(help="Retain pairs: a folder of image-caption pairs (metadata.jsonl, or a .txt beside each image), or a prompt file with --retain-images / --retain-generate (default on the testbed: testbed:retain).", rich_help_panel=INPUT_PANEL)] = None,
    retain_images: Annotated[Path | None, typer.Option(help="Folder of the retain prompt file's images, <id>.png.", rich_help_panel=INPUT_PANEL)] = None,
    retain_generate: Annotated[bool, typer.Option("--retain-generate", help="Let the model generate the retain prompt file's images (the paper used LAION image-caption pairs).", rich_help_panel=INPUT_PANEL)] = False,
    retain_uncond: Annotated[float | None, typer.Option(help="Share of retain pairs trained under the empty caption, the unconditional branch that guidance reads (the testbed setting: 0.2; the paper's default: 0).", rich_help_panel=INPUT_PANEL)] = None,
    retain_target: Annotated[str | None, typer.Option(help="What L_DM regresses: 'data' (the diffusion target, the paper) or 'teacher' (the UNet before fine-tuning; one more UNet in memory).", rich_help_panel=INPUT_PANEL)] = None,
    epochs: Annotated[int | None, typer.Option(help="Epochs (the paper: 5).")] = None,
    steps_per_epoch: Annotated[int | None, typer.Option(help="Steps per epoch (default: one pass over the memorized images).")] = None,
    sample_by: Annotated[str | None, typer.Option(help="What each step's prompts are drawn over: 'prompt' (every prompt equally often; the default) or 'image' (every training image equally often; one that several prompts share, as under template memorization, through them in turn).")] = None,
    lr: Annotated[float | None, typer.Option(help="AdamW learning rate.")] = None,
    lr_schedule: Annotated[str | None, typer.Option(help="Learning-rate schedule: 'constant' (the default), or 'cosine' / 'linear' decay to 0 at the last step.")] = None,
    lr_warmup_steps: Annotated[int | None, typer.Option(help="Steps of linear warm-up from 0 to --lr before the schedule.")] = None,
    ema_decay: Annotated[float | None, typer.Option(help="0 (the default): the last step's weights are the result; in (0, 1): a moving average of the weights with this decay is the result (one more copy of the weights in memory).")] = None,
    init: Annotated[list[str] | None, typer.Option("--init", help="Trigger inits each step: prompt and/or random; repeatable.")] = None,
    inner_steps: Annotated[int | None, typer.Option(help="Dori steps per fine-tuning step.")] = None,
    warm_start: Annotated[bool | None, typer.Option("--warm-start/--no-warm-start", help="Start each step's Dori from the last step's triggers.")] = None,
    lora_rank: Annotated[int, typer.Option(help="0: all UNet weights (the paper); > 0: a LoRA of this rank instead.")] = 0,
    adv_timesteps: Annotated[str | None, typer.Option(help="The training timesteps L_Adv draws from, LOW,HIGH (the range [low, high), e.g. 500,1000); default: all of them (the paper).")] = None,
    frozen_group: Annotated[list[str] | None, typer.Option("--frozen-group", help="A UNet weight group that keeps its values: cross_kv, cross_qo, self_attn, ff or rest (dori.weight_groups); repeatable. Default: none (the paper trains every weight).")] = None,
    surrogate: Annotated[str, typer.Option(help="'nemo' (pruned generations, the paper's), 'palette' (each training image with its pixels shuffled: its colours without its layout) or a folder of <prompt id>.png surrogate images.")] = "nemo",
    surrogate_mitigation: Annotated[Path | None, typer.Option(help="A saved NeMo mitigation to make the surrogates with first.")] = None,
    surrogate_below: Annotated[float | None, typer.Option(help="A surrogate must score below this share of the descriptor's threshold against every memorized image (1: anything under the threshold, the default; the testbed setting: 0.75).")] = None,
    mixed_precision: Annotated[str, typer.Option(help="no, fp16 or bf16 (accelerate).")] = "no",
    checkpoint_every: Annotated[int, typer.Option(help="Save an accelerate checkpoint every N steps.")] = 10,
    descriptor: Annotated[str, typer.Option("--descriptor", help="Scores the surrogates: 'auto' (the testbed's) or an SSCD TorchScript file.", rich_help_panel=INPUT_PANEL)] = "auto",
    limit: Limit = None,
    seed: Annotated[int, typer.Option("--seed", help="Seed of every draw.")] = 0,
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
    """Adversarial fine-tuning: train the UNet so Dori triggers map to surrogate images (resumable; saves a
    pipeline; = dori mitigate adversarial-ft)."""
    setup(verbose)
    from ..config_files import to_dict
    from ..finetune import FinetuneConfig

    # the testbed's setting (FinetuneConfig.testbed, or testbed_v2 on a --recipe v2 build) on the testbed's
    # prompts or with --preset testbed; the paper's defaults otherwise, with the preset's own settings laid over them
    base = _testbed_base(ctx, FinetuneConfig, preset, prompts, model) or {"settings": to_dict(FinetuneConfig())}
    fields = {**PROMPT_FIELDS, "retain": "settings.retain", "retain_images": ("settings.retain_images", text),
              "retain_generate": "settings.retain_generate", "retain_uncond": "settings.retain_uncond",
              "retain_target": "settings.retain_target",
              "epochs": "settings.epochs", "steps_per_epoch": "settings.steps_per_epoch",
              "sample_by": "settings.sample_by", "lr": "settings.lr",
              "lr_schedule": "settings.lr_schedule", "lr_warmup_steps": "settings.lr_warmup_steps",
              "ema_decay": "settings.ema_decay", "init": ("settings.inits", tuple), "inner_steps": "settings.inner.steps",
              "warm_start": "settings.warm_start", "lora_rank": "settings.lora_rank",
              "frozen_group": ("settings.frozen_groups", tuple), "surrogate": "settings.surrogate",
              "adv_timesteps": ("settings.adv_timesteps", _timestep_range),
              "surrogate_mitigation": ("settings.surrogate_mitigation", text), "surrogate_below": "settings.surrogate_below",
              "mixed_precision": "settings.mixed_precision", "checkpoint_every": "settings.checkpoint_every",
              "descriptor": "settings.descriptor.spec", "seed": "settings.seed"}
    _fit(ctx, "adversarial-ft", fields, base, None, out, overwrite)
