"""``dori localize`` (NeMo) and ``dori prune`` (Wanda) as resumable runs that end in a saved mitigation."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

from .errors import DoriError
from .mitigations.nemo import NeMo, NeMoConfig, PromptLocalization
from .mitigations.wanda import Wanda, WandaConfig
from .models import model_name
from .prompts import load_prompt_set
from .runs import RunFolder, default_run_dir

logger = logging.getLogger(__name__)

TESTBED_STATISTICS = ("testbed:seen-once", "testbed:shape")


def statistics_prompts(spec: str | None, model_folder: str | None) -> list[str]:
    """Non-memorized prompts for NeMo's statistics: the testbed's seen-once and shape captions on the
    testbed, ``laion-nonmem`` elsewhere, or a set the user names."""
    from .testbed.assets import is_testbed_folder

    if spec is None:
        specs = TESTBED_STATISTICS if model_folder and is_testbed_folder(model_folder) else ("laion-nonmem",)
    else:
        specs = (spec,)
    prompts = [r.prompt for s in specs for r in load_prompt_set(s, model_folder=model_folder).records]
    if len(prompts) < 2:
        raise DoriError("statistics_prompts: need at least 2 non-memorized prompts")
    return prompts


def run_localize(pipe, prompts: str, config: NeMoConfig, out: str | Path | None = None, *, scope: str = "per-prompt",
                 statistics: str | None = None, limit: int | None = None, overwrite: bool = False,
                 progress: Callable[[int, int], None] | None = None) -> tuple[Path, NeMo]:
    """Localise NeMo neurons for every prompt of a set; returns the saved ``nemo.safetensors`` and the mitigation."""
    config.validate()
    folder = pipe.dori_model["location"]
    records = load_prompt_set(prompts, model_folder=folder).subset(limit).records
    stats_prompts = statistics_prompts(statistics, folder)
    out = Path(out) if out is not None else default_run_dir("localize", model_name(folder))
    run = RunFolder(out, "localize", {"model": folder, "prompts": prompts, "limit": limit, "scope": scope,
                                      "statistics": statistics, "nemo": config.to_dict()}, overwrite=overwrite)
    done = {r["prompt"]: PromptLocalization(**{k: v for k, v in r.items() if k in PromptLocalization.__dataclass_fields__})
            for r in run.records()}
    count = {"n": len(done)}

    def on_result(result: PromptLocalization) -> None:
        run.append([{"key": result.prompt, **asdict(result)}])
        count["n"] += 1
        if progress:
            progress(count["n"], len(records))

    if progress:
        progress(len(done), len(records))
    nemo = NeMo.localize(pipe, [r.prompt for r in records], config, statistics_prompts=stats_prompts, scope=scope,
                         done=done, on_result=on_result)
    path = nemo.save(run.path / "nemo.safetensors")
    run.finalize({"mitigation": str(path), "ssim_threshold": nemo.threshold,
                  "neurons_per_layer": nemo.neurons_per_layer()})
    return path, nemo


def run_prune(pipe, prompts: str, config: WandaConfig, out: str | Path | None = None, *, scope: str = "set",
              limit: int | None = None, overwrite: bool = False, bake: str | Path | None = None,
              progress: Callable[[int, int], None] | None = None) -> tuple[Path, Wanda]:
    """Calibrate Wanda on a prompt set; returns the saved ``wanda.safetensors`` (and bakes a pruned pipeline)."""
    config.validate()
    folder = pipe.dori_model["location"]
    records = load_prompt_set(prompts, model_folder=folder).subset(limit).records
    out = Path(out) if out is not None else default_run_dir("prune", model_name(folder))
    run = RunFolder(out, "prune", {"model": folder, "prompts": prompts, "limit": limit, "scope": scope,
                                   "wanda": config.to_dict()}, overwrite=overwrite)
    wanda = Wanda.calibrate(pipe, [r.prompt for r in records], config, scope=scope, progress=progress)
    path = wanda.save(run.path / "wanda.safetensors")
    run.append([{"key": name, "layer": name, "sparsity": value} for name, value in wanda.sparsity_per_layer().items()])
    if bake is not None:
        wanda.bake(pipe, bake)
    run.finalize({"mitigation": str(path), "sparsity_per_layer": wanda.sparsity_per_layer(),
                  "baked": str(bake) if bake else None})
    return path, wanda
