"""``dori attack``: find Dori triggers for a prompt set, resumable, triggers saved as safetensors.

Run folder: the usual manifest and records (one per trigger: status, MR after 0/1/10/25/50 steps,
relative perturbation, UNet evaluations), ``triggers/<key>.safetensors`` written as each batch
finishes (``trigger`` and ``initial``, ``(tokens, dim)``), merged into ``triggers.safetensors`` at the
end (:func:`load_triggers`).
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from ..config_files import to_dict
from ..descriptors import DescriptorConfig
from ..errors import DoriError
from ..generation import GenerationConfig
from ..images import save_png
from ..memorization import mean_std, memorization_rate
from ..models import encode_images, model_name, model_record
from ..progress import Progress, for_stage
from ..prompts import PromptSet, prompts_for, require_references
from ..runs import Processes, RunFolder, default_run_dir, safe_filename
from .loop import AttackConfig, AttackItem
from .parts import (
    CONSTRAINTS,
    FromPrompt,
    OtherPrompt,
    RandomNormal,
    ThroughAdjustments,
    WithMitigations,
    make_constraint,
)
from .recipes import DEFAULT_RECIPE, RECIPES, build_attack

logger = logging.getLogger(__name__)

INITS = ("prompt", "random", "other")


@dataclass(frozen=True)
class AttackRunConfig:
    """``dori attack``: which prompts (and their training images), which recipe, how many triggers.

    ``references``: a folder of ``<prompt id>.png`` training images (the testbed's sets carry theirs);
    ``descriptor``: the copy descriptor of the success check; ``mitigations``: saved mitigations applied
    while attacking; ``ids``: only these prompt ids of the set (after ``limit``; empty: all).
    """

    prompts: str = "testbed:memorized"
    references: str | None = None
    limit: int | None = None
    ids: tuple[str, ...] = ()
    recipe: str = DEFAULT_RECIPE
    init: str = "prompt"
    other_prompt: str | None = None
    """The start of ``init="other"``; None: a shape caption on the testbed, the first prompt of
    ``laion-nonmem`` elsewhere."""
    restarts: int = 1
    num_seeds: int = 10
    seed: int = 0
    batch_size: int = 8
    attack: AttackConfig = field(default_factory=AttackConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    descriptor: DescriptorConfig = field(default_factory=DescriptorConfig)
    constraint: str = "none"
    radius: float | None = None
    mitigations: tuple[str, ...] = ()
    mitigation_union: bool = False
    """Apply a per-prompt mitigation's selections of every prompt together; otherwise each target prompt
    gets its own and a prompt it was not fitted on is refused."""
    adaptive: bool = True
    """For ``inference`` mitigations (Wen, Ren, random tokens): optimise through them (their hooks act in
    the loss, and an adjustment of the embedding such as Wen's is passed with the straight-through
    gradient); False: optimise on the model without them and apply them only to the success check's
    images (the non-adaptive attack). Mitigations of the other kinds are always in the loss."""

    def validate(self) -> None:
        if self.init not in INITS:
            raise DoriError(f"init: must be one of {', '.join(INITS)}, got {self.init!r}")
        if self.restarts < 1 or self.num_seeds < 1 or self.batch_size < 1:
            raise DoriError("restarts, num_seeds, batch_size: must be >= 1")
        if self.constraint not in CONSTRAINTS:
            raise DoriError(f"constraint: must be one of {', '.join(CONSTRAINTS)}, got {self.constraint!r}")
        if self.recipe not in RECIPES:
            RECIPES.get(self.recipe)  # raises, naming the registered recipes
        self.attack.validate()
        self.generation.validate()
        self.descriptor.validate()

    def to_dict(self) -> dict:
        return asdict(self)

    def initializer(self, pipe=None):
        if self.init == "random":
            return RandomNormal(self.seed)
        if self.init == "other":
            return OtherPrompt(self.other_prompt or default_other_prompt(pipe))
        return FromPrompt()

    def seeds(self) -> list[int]:
        return list(range(self.seed, self.seed + self.num_seeds))


TESTBED_OTHER_PROMPT = "a red circle on a blue background"


def default_other_prompt(pipe) -> str:
    """A non-memorized prompt to start ``init="other"`` from: a shape caption on the testbed, the first
    of the bundled non-memorized LAION prompts elsewhere."""
    from ..models import testbed_folder
    from ..prompts import load_prompt_set

    if pipe is not None and testbed_folder(pipe) is not None:
        return TESTBED_OTHER_PROMPT
    return load_prompt_set("laion-nonmem").records[0].prompt


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


def _prompt_set(pipe, config: AttackRunConfig) -> PromptSet:
    prompt_set = prompts_for(pipe, config.prompts, references=config.references, limit=config.limit)
    if config.ids:
        known = {r.id for r in prompt_set.records}
        unknown = [i for i in config.ids if i not in known]
        if unknown:
            raise DoriError(f"ids: {unknown[0]!r} is not a prompt id of {config.prompts!r}")
        prompt_set.records = [r for r in prompt_set.records if r.id in set(config.ids)]
    return prompt_set


def run_attack(pipe, config: AttackRunConfig, out: str | Path | None = None, *, overwrite: bool = False,
               progress: Progress | None = None, command: str = "attack") -> tuple[Path, list[dict]]:
    """Attack every (prompt, restart) of the set; returns the run folder and the records (sorted by key)."""
    from ..mitigations import mitigated
    from ..mitigations.base import load_for

    config.validate()
    prompt_set = _prompt_set(pipe, config)
    references = require_references(prompt_set, "the attack")
    descriptor = config.descriptor.build(pipe)
    mitigations = [load_for(pipe, p, [r.prompt for r in prompt_set.records], union=config.mitigation_union)
                   for p in config.mitigations]
    out = Path(out) if out is not None else default_run_dir(command, model_name(pipe))
    processes = Processes(pipe)
    resolved = {"descriptor": descriptor.describe(), "recipe": RECIPES.origin(config.recipe)}
    if config.init == "other":
        resolved["other_prompt"] = config.other_prompt or default_other_prompt(pipe)
    run = processes.open(out, command, to_dict(config), model=model_record(pipe), resolved=resolved,
                         overwrite=overwrite, seeds=config.seeds())
    with run.guard():
        (run.path / "triggers").mkdir(exist_ok=True)
        targets = encode_images(pipe, references)
        items = [AttackItem(r.id, r.prompt, i, k) for i, r in enumerate(prompt_set.records)
                 for k in range(config.restarts)]
        items = items[processes.rank :: processes.world]  # this process's share (all of them with one)
        done = run.done_keys()
        todo = [it for it in items if it.key not in done]
        attack = build_attack(config.recipe, pipe, descriptor, references, initializer=config.initializer(pipe),
                              seeds=config.seeds(), generation=config.generation, config=config.attack,
                              constraint=make_constraint(config.constraint, config.radius))
        inference = [m for m in mitigations if m.kind == "inference"]
        in_loss = mitigations if config.adaptive else [m for m in mitigations if m.kind != "inference"]
        adjusting = [m for m in inference if hasattr(m, "adjuster")]
        if config.adaptive and adjusting:
            attack.objective = ThroughAdjustments(attack.objective, pipe, adjusting)
        per_prompt = not config.mitigation_union and any(m.scope == "per-prompt" for m in mitigations)
        groups: dict[str | None, list[AttackItem]] = {}
        for it in todo:
            groups.setdefault(it.prompt if per_prompt else None, []).append(it)
        report = for_stage(progress, command)
        finished = len(items) - len(todo)
        if report:
            report(finished, len(items))
        for prompt, group in groups.items():
            for start in range(0, len(group), config.batch_size):
                batch = group[start : start + config.batch_size]
                with mitigated(pipe, *in_loss, prompt=prompt), \
                        checks_mitigated(attack, [] if config.adaptive else inference, prompt):
                    results = attack.run(batch, targets)
                _save_results(run, results, config.seeds(), {r.id for r in prompt_set.records if r.truncated})
                finished += len(batch)
                if report:
                    report(finished, len(items))
        processes.barrier()
        records = sorted(run.records(), key=lambda r: r["key"])
        if processes.main:
            merged = {r["key"]: load_file(str(run.path / "triggers" / f"{safe_filename(r['key'])}.safetensors"))["trigger"]
                      for r in records}
            save_file(merged, str(run.path / "triggers.safetensors"))
            run.finalize(summarize_attack(records))
        processes.barrier()
    return run.path, records


@contextmanager
def checks_mitigated(attack, mitigations: list, prompt: str | None):
    """While active, ``attack``'s success and early checks generate with ``mitigations`` applied (the
    non-adaptive attack: the loss does not see them)."""
    if not mitigations:
        yield attack
        return
    success, early = attack.success, attack.early_check
    attack.success = WithMitigations(success, attack.pipe, mitigations, prompt)
    if early is not None:
        attack.early_check = WithMitigations(early, attack.pipe, mitigations, prompt)
    try:
        yield attack
    finally:
        attack.success, attack.early_check = success, early


def _save_results(run: RunFolder, results, seeds: list[int], truncated: set[str] = frozenset()) -> None:
    """Each trigger's images and tensors first, then its record (so a record always has its files);
    ``truncated``: ids of prompts the tokenizer cuts."""
    for result in results:
        name = safe_filename(result.key)
        if result.images is not None:
            for seed, image in zip(seeds, result.images, strict=True):
                save_png(image, run.path / f"images/{name}__s{seed}.png")
        save_file({"trigger": result.trigger.contiguous(), "initial": result.initial.contiguous()},
                  str(run.path / "triggers" / f"{name}.safetensors"), metadata={"key": result.key})
    run.append([{**r.record(), "truncated": r.prompt_id in truncated,
                 "images": [f"images/{safe_filename(r.key)}__s{seed}.png" for seed in seeds]
                 if r.images is not None else []} for r in results])


def summarize_attack(records: list[dict]) -> dict:
    """MR (share of generations above the threshold) and mean similarity overall and after each recorded step."""
    steps = sorted({int(s) for r in records for s in (r["mr_by_step"] or {})})
    mr_curve = {s: float(np.mean([r["mr_by_step"][str(s)] for r in records])) for s in steps}
    sscd = [r["sscd_mean"] for r in records]
    mean, std = mean_std(sscd)
    return {"n_triggers": len(records), "mr": float(np.mean([r["mr"] for r in records])) if records else float("nan"),
            "sscd_mean": mean, "sscd_std": std, "mr_by_step": mr_curve,
            "succeeded": sum(r["status"] == "succeeded" for r in records),
            "unet_evaluations_mean": float(np.mean([r["unet_evaluations"] for r in records])) if records else float("nan"),
            "relative_perturbation_mean": float(np.mean([r["relative_perturbation"] for r in records])) if records else float("nan"),
            "mr_over_triggers": memorization_rate([r["mr"] for r in records], 0.5)}
