"""``dori evaluate``: generate N images per prompt and score them for replication, in a resumable run folder.

Work items are ``(prompt id, seed)`` pairs; with several processes (``accelerate launch -m dori
evaluate ...``) process k takes items k, k + P, k + 2P, ... and appends to its own records file;
process 0 merges them at the end. Records depend only on the item, never on the batch or the
number of processes.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .config_files import to_dict
from .descriptors import DescriptorConfig
from .errors import DoriError
from .generation import GenerationConfig, Generations, generate
from .images import load_image, save_png, to_tensor
from .memorization import per_prompt_table, score_images, sscd_gen, summary_row
from .models import model_name, model_record
from .progress import Progress, for_stage
from .prompts import PromptRecord, prompts_for
from .runs import MANIFEST, Processes, RunFolder, config_hash, default_run_dir, safe_filename

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class EvaluateConfig:
    """Everything that decides the records of an evaluation (hashed into the run's manifest)."""

    prompts: str = "testbed:memorized"
    references: str | None = None
    num_seeds: int = 10
    seed: int = 0
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    descriptor: DescriptorConfig = field(default_factory=DescriptorConfig)
    limit: int | None = None
    save_images: bool = True
    baseline: str | None = None
    """A finished evaluate run of the same prompts and seeds: SSCD_gen compares each image with its image there."""
    mitigations: tuple[str, ...] = ()
    mitigation_union: bool = False
    """Apply a per-prompt mitigation's selections of every prompt together (needed for prompts it was not
    fitted on, e.g. utility prompts); otherwise each prompt gets its own and an unknown prompt is refused."""
    """Saved mitigations (``.safetensors`` + ``.json``) applied while generating; SSCD_gen is then taken
    against the unmitigated image of the same (prompt, seed) unless ``baseline`` is given."""

    def validate(self) -> None:
        if self.num_seeds < 1:
            raise DoriError(f"num_seeds: must be >= 1, got {self.num_seeds}")
        if self.limit is not None and self.limit < 1:
            raise DoriError(f"limit: must be >= 1, got {self.limit}")
        self.generation.validate()
        self.descriptor.validate()
        if self.baseline is not None and not (Path(self.baseline) / "records.parquet").is_file():
            raise DoriError(f"baseline: {self.baseline} is not a finished evaluate run (no records.parquet)")

    def seeds(self) -> list[int]:
        return [self.seed + k for k in range(self.num_seeds)]

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class EvaluationResult:
    path: Path
    records: list[dict]
    summary: dict


def image_path(run: RunFolder, prompt_id: str, seed: int) -> Path:
    return run.images / f"{safe_filename(prompt_id)}__s{seed}.png"


def _baseline_images(folder: str | Path) -> dict[str, Path]:
    import pandas as pd

    manifest = Path(folder) / MANIFEST
    command = None
    if manifest.is_file():
        try:
            command = json.loads(manifest.read_text(encoding="utf-8")).get("command")
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
            command = "unreadable"
    if command != "evaluate":
        raise DoriError(f"baseline: {folder} is not an evaluate run (its manifest says {command!r})")
    try:
        table = pd.read_parquet(Path(folder) / "records.parquet", columns=["key", "image"])
    except Exception as exc:  # pyarrow raises its own errors for damaged or foreign files
        reason = " ".join(str(exc).split())[:120]
        raise DoriError(f"baseline: {folder}/records.parquet is not readable ({type(exc).__name__}: {reason})") from None
    return {k: Path(folder) / img for k, img in zip(table["key"], table["image"], strict=True) if img}


def _generate_mitigated(pipe, chunk, mitigations, generation: GenerationConfig, union: bool = False) -> Generations:
    """Generate ``chunk`` with the mitigations applied; per-prompt mitigations are applied prompt by prompt."""
    from .mitigations import mitigated

    if not mitigations:
        return generate(pipe, [s for _, s in chunk], [r.prompt for r, _ in chunk], config=generation)
    per_prompt = not union and any(m.scope == "per-prompt" for m in mitigations)
    groups = {}
    for i, (r, _) in enumerate(chunk):
        groups.setdefault(r.prompt if per_prompt else None, []).append(i)
    images = [None] * len(chunk)
    norms = [None] * len(chunk)
    for prompt, idx in groups.items():
        with mitigated(pipe, *mitigations, prompt=prompt):
            out = generate(pipe, [chunk[i][1] for i in idx], [chunk[i][0].prompt for i in idx], config=generation)
        for j, i in enumerate(idx):
            images[i] = out.images[j]
            norms[i] = out.noise_norm[j] if out.noise_norm is not None else None
    return Generations(torch.stack(images), torch.stack(norms) if norms[0] is not None else None)


class _Scorer:
    """Scores one chunk of (prompt, seed) items: SSCD_orig, the gallery match and, where there is a
    comparison image, SSCD_gen."""

    def __init__(self, pipe, config: EvaluateConfig, prompt_set, descriptor, mitigations):
        self.pipe, self.config, self.prompt_set = pipe, config, prompt_set
        self.descriptor, self.mitigations = descriptor, mitigations
        self.baseline = _baseline_images(config.baseline) if config.baseline else None

    def check_baseline(self, items) -> None:
        if self.baseline is None:
            return
        missing = [f"{r.id}#{s}" for r, s in items if f"{r.id}#{s}" not in self.baseline]
        if missing:
            raise DoriError(f"baseline: {self.config.baseline} has no image for {missing[0]} ({len(missing)} missing)")

    def records(self, run: RunFolder, chunk: list[tuple[PromptRecord, int]]) -> list[dict]:
        config, threshold = self.config, self.descriptor.threshold
        gens = _generate_mitigated(self.pipe, chunk, self.mitigations, config.generation, config.mitigation_union)
        scores = score_images(self.descriptor, gens.images, [self.prompt_set.references.get(r.id) for r, _ in chunk],
                              self.prompt_set.gallery)
        gen_scores = None
        if self.baseline is not None:
            base = torch.cat([to_tensor(load_image(self.baseline[f"{r.id}#{s}"])) for r, s in chunk])
            gen_scores = sscd_gen(self.descriptor, gens.images, base)
        elif self.mitigations:
            plain = generate(self.pipe, [s for _, s in chunk], [r.prompt for r, _ in chunk], config=config.generation)
            gen_scores = sscd_gen(self.descriptor, gens.images, plain.images)
        records = []
        for i, (r, s) in enumerate(chunk):
            path = image_path(run, r.id, s)
            if config.save_images:
                save_png(gens.images[i], path)
            norm = gens.noise_norm[i] if gens.noise_norm is not None else None
            orig = float(scores.sscd_orig[i])
            records.append({
                "key": f"{r.id}#{s}", "prompt_id": r.id, "prompt": r.prompt, "group": r.group, "seed": s,
                "truncated": r.truncated,
                "sscd_orig": orig, "replicated": bool(orig > threshold) if not math.isnan(orig) else None,
                "gallery_max": float(scores.gallery_max[i]), "gallery_match": scores.gallery_match[i],
                "noise_norm_first": float(norm[0]) if norm is not None else None,
                "noise_norm_mean": float(norm.mean()) if norm is not None else None,
                "image": str(path.relative_to(run.path)) if config.save_images else None,
            })
            if gen_scores is not None:
                records[-1]["sscd_gen"] = float(gen_scores[i])
        return records


def run_evaluate(pipe, config: EvaluateConfig, out: str | Path | None = None, *, overwrite: bool = False,
                 progress: Progress | None = None, command: str = "evaluate") -> EvaluationResult:
    """Run (or resume) an evaluation of ``pipe``; returns the run folder, all records and the summary."""
    from .mitigations.base import load_for

    config.validate()
    processes = Processes(pipe)
    rank, world = processes.rank, processes.world
    prompt_set = prompts_for(pipe, config.prompts, references=config.references, limit=config.limit)
    descriptor = config.descriptor.build(pipe)
    mitigations = [load_for(pipe, path, [r.prompt for r in prompt_set.records], union=config.mitigation_union)
                   for path in config.mitigations]
    scorer = _Scorer(pipe, config, prompt_set, descriptor, mitigations)
    items = [(r, s) for r in prompt_set.records for s in config.seeds()]
    scorer.check_baseline(items)
    resolved = {"descriptor": descriptor.describe(),
                "mitigations": [{"name": m.name, "scope": m.scope, "hash": config_hash(m.describe())} for m in mitigations]}
    if not prompt_set.references and not prompt_set.gallery:
        logger.warning("no training images for %s: SSCD scores and MR are not computed (give --references DIR)",
                       config.prompts)
    out = Path(out) if out is not None else default_run_dir(command, model_name(pipe))
    run = processes.open(out, command, to_dict(config), model=model_record(pipe), resolved=resolved,
                         overwrite=overwrite, seeds=config.seeds())
    with run.guard():
        mine = items[rank::world]
        done = run.done_keys()
        todo = [(r, s) for r, s in mine if f"{r.id}#{s}" not in done]
        total, finished = len(mine), len(mine) - len(todo)
        if finished:
            logger.info("resuming %s: %d of %d work items already done", run.path, finished, total)
        report = for_stage(progress, command)
        if report:
            report(finished, total)
        for start in range(0, len(todo), config.generation.batch_size):
            chunk = todo[start : start + config.generation.batch_size]
            run.append(scorer.records(run, chunk))
            finished += len(chunk)
            if report:
                report(finished, total)
        processes.barrier()
        records = sorted(run.records(), key=lambda r: r["key"])
        kinds = {r.id: r.kind for r in prompt_set.records if r.kind}
        summary = _summary(prompt_set.name, config.prompts, records, descriptor, kinds)
        if rank == 0:
            per_prompt_table(records, descriptor.threshold).to_parquet(run.path / "prompts.parquet", index=False)
            run.finalize(summary)
    return EvaluationResult(run.path, records, summary)


def _summary(name: str, spec: str, records: list[dict], descriptor, kinds: dict[str, str] | None = None) -> dict:
    threshold = descriptor.threshold
    summary = {"threshold": threshold, "descriptor": descriptor.describe(), "prompts": spec,
               "truncated_prompts": len({r["prompt_id"] for r in records if r.get("truncated")}),
               "rows": [summary_row(name, records, threshold, kinds=kinds)]}
    groups = sorted({r["group"] for r in records if r["group"] is not None})
    summary["rows"] += [summary_row(g, [r for r in records if r["group"] == g], threshold) for g in groups]
    return summary
