"""``dori attack``: find Dori triggers for a prompt set, resumable, triggers saved as safetensors.

Run folder: the usual manifest and records (one per trigger: status, MR after 0/1/10/25/50 steps,
relative perturbation, UNet evaluations), ``triggers/<key>.safetensors`` written as each batch
finishes (``trigger`` and ``initial``, ``(tokens, dim)``), merged into ``triggers.safetensors`` at the
end (:func:`load_triggers`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from ..errors import DoriError
from ..generation import GenerationConfig
from ..memorization import mean_std, memorization_rate
from ..runs import RunFolder, default_run_dir
from .loop import AttackConfig, AttackItem
from .parts import FromPrompt, OtherPrompt, RandomNormal, encode_images
from .recipes import dori_kowalczuk2025

logger = logging.getLogger(__name__)

INITS = ("prompt", "random", "other")


@dataclass(frozen=True)
class AttackRunConfig:
    prompts: str = "testbed:memorized"
    limit: int | None = None
    init: str = "prompt"
    other_prompt: str = "a red circle on a blue background"
    restarts: int = 1
    num_seeds: int = 10
    seed: int = 0
    batch_size: int = 8
    attack: AttackConfig = field(default_factory=AttackConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    constraint: str = "none"
    radius: float | None = None
    mitigations: tuple[str, ...] = ()
    ids: tuple[str, ...] = ()
    """Only these prompt ids of the set (after ``limit``); empty: all."""

    def validate(self) -> None:
        if self.init not in INITS:
            raise DoriError(f"init: must be one of {', '.join(INITS)}, got {self.init!r}")
        if self.restarts < 1 or self.num_seeds < 1 or self.batch_size < 1:
            raise DoriError("restarts, num_seeds, batch_size: must be >= 1")
        self.attack.validate()
        self.generation.validate()

    def to_dict(self) -> dict:
        return asdict(self)

    def initializer(self):
        if self.init == "random":
            return RandomNormal(self.seed)
        if self.init == "other":
            return OtherPrompt(self.other_prompt)
        return FromPrompt()


def _safe(key: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in key)


def load_triggers(run: str | Path) -> dict[str, torch.Tensor]:
    """``{key: trigger (tokens, dim)}`` of a finished (or partly finished) attack run."""
    run = Path(run)
    merged = run / "triggers.safetensors"
    if merged.is_file():
        return load_file(str(merged))
    from safetensors import safe_open

    out = {}
    for path in sorted((run / "triggers").glob("*.safetensors")):
        with safe_open(str(path), "pt") as f:
            out[f.metadata()["key"]] = f.get_tensor("trigger")
    return out


def run_attack(pipe, config: AttackRunConfig, out: str | Path | None = None, *, descriptor=None, overwrite: bool = False,
               mitigations: list | None = None, progress: Callable[[int, int], None] | None = None,
               command: str = "attack") -> tuple[Path, list[dict]]:
    """Attack every (prompt, restart) of the set; returns the run folder and the records."""
    from ..descriptors import make_descriptor, to_tensor
    from ..evaluate import save_png
    from ..mitigations import load_mitigation, mitigated
    from ..models import model_name
    from ..prompts import load_prompt_set

    config.validate()
    folder = pipe.dori_model["location"]
    prompt_set = load_prompt_set(config.prompts, model_folder=folder).subset(config.limit)
    if config.ids:
        known = {r.id for r in prompt_set.records}
        unknown = [i for i in config.ids if i not in known]
        if unknown:
            raise DoriError(f"ids: {unknown[0]!r} is not a prompt id of {config.prompts!r}")
        prompt_set.records = [r for r in prompt_set.records if r.id in set(config.ids)]
    missing = [r.id for r in prompt_set.records if r.id not in prompt_set.references]
    if missing:
        raise DoriError(f"prompts: the attack needs the training image of every prompt; none for {missing[0]!r} "
                        "(give --references DIR)")
    descriptor = descriptor or make_descriptor("auto", pipe)
    if mitigations is None:
        mitigations = [load_mitigation(p) for p in config.mitigations]
    out = Path(out) if out is not None else default_run_dir(command, model_name(folder))
    run = RunFolder(out, command, {**config.to_dict(), "model": folder, "descriptor": descriptor.describe()},
                    overwrite=overwrite, seeds=list(range(config.seed, config.seed + config.num_seeds)))
    (run.path / "triggers").mkdir(exist_ok=True)

    references = [prompt_set.references[r.id] for r in prompt_set.records]
    targets = encode_images(pipe, to_tensor(np.stack([_fit(ref) for ref in references])))
    items = [AttackItem(r.id, r.prompt, i, k) for i, r in enumerate(prompt_set.records) for k in range(config.restarts)]
    done = run.done_keys()
    todo = [it for it in items if it.key not in done]
    seeds = list(range(config.seed, config.seed + config.num_seeds))
    attack = dori_kowalczuk2025(pipe, descriptor, references, initializer=config.initializer(), seeds=seeds,
                                generation=config.generation, config=config.attack, constraint=config.constraint,
                                radius=config.radius)
    per_prompt = any(m.scope == "per-prompt" for m in mitigations)
    groups: dict[str | None, list[AttackItem]] = {}
    for it in todo:
        groups.setdefault(it.prompt if per_prompt else None, []).append(it)
    finished = len(items) - len(todo)
    if progress:
        progress(finished, len(items))
    for prompt, group in groups.items():
        for start in range(0, len(group), config.batch_size):
            batch = group[start : start + config.batch_size]
            with mitigated(pipe, *mitigations, prompt=prompt):
                results = attack.run(batch, targets)
            for result in results:
                if result.images is not None:
                    for seed, image in zip(seeds, result.images, strict=True):
                        save_png(image, run.path / f"images/{_safe(result.key)}__s{seed}.png")
                save_file({"trigger": result.trigger.contiguous(), "initial": result.initial.contiguous()},
                          str(run.path / "triggers" / f"{_safe(result.key)}.safetensors"), metadata={"key": result.key})
            run.append([{**r.record(), "images": [f"images/{_safe(r.key)}__s{seed}.png" for seed in seeds]
                         if r.images is not None else []} for r in results])
            finished += len(batch)
            if progress:
                progress(finished, len(items))
    records = sorted(run.records(), key=lambda r: r["key"])
    merged = {}
    for r in records:
        merged[r["key"]] = load_file(str(run.path / "triggers" / f"{_safe(r['key'])}.safetensors"))["trigger"]
    save_file(merged, str(run.path / "triggers.safetensors"))
    run.finalize(summarize_attack(records))
    return run.path, records


def _fit(image: np.ndarray) -> np.ndarray:
    return image if image.ndim == 3 else np.repeat(image[..., None], 3, axis=-1)


def summarize_attack(records: list[dict]) -> dict:
    """MR (share of generations above the threshold) and mean similarity overall and after each recorded step."""
    steps = sorted({int(s) for r in records for s in r["mr_by_step"]})
    mr_curve = {s: float(np.mean([r["mr_by_step"][str(s)] for r in records])) for s in steps}
    sscd = [r["sscd_mean"] for r in records]
    mean, std = mean_std(sscd)
    return {"n_triggers": len(records), "mr": float(np.mean([r["mr"] for r in records])) if records else float("nan"),
            "sscd_mean": mean, "sscd_std": std, "mr_by_step": mr_curve,
            "succeeded": sum(r["status"] == "succeeded" for r in records),
            "unet_evaluations_mean": float(np.mean([r["unet_evaluations"] for r in records])) if records else float("nan"),
            "relative_perturbation_mean": float(np.mean([r["relative_perturbation"] for r in records])) if records else float("nan"),
            "mr_over_triggers": memorization_rate([r["mr"] for r in records], 0.5)}
