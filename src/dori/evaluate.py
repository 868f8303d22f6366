"""``dori evaluate``: generate N images per prompt and score them for replication, in a resumable run folder.

Work items are ``(prompt id, seed)`` pairs; with several processes (``accelerate launch -m dori
evaluate ...``) process k takes items k, k + P, k + 2P, ... and appends to its own records file;
process 0 merges them at the end. Records depend only on the item, never on the batch or the
number of processes.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from .errors import DoriError
from .generation import GenerationConfig, generate
from .memorization import per_prompt_table, score_images, sscd_gen, summary_row
from .prompts import PromptSet, load_prompt_set
from .runs import RunFolder, config_hash, default_run_dir

logger = logging.getLogger(__name__)

Progress = Callable[[int, int], None]
"""``progress(done, total)`` in work items."""

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class EvaluateConfig:
    """Everything that decides the records of an evaluation (hashed into the run's manifest)."""

    model: str = "testbed"
    prompts: str = "testbed:memorized"
    references: str | None = None
    num_seeds: int = 10
    seed: int = 0
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    descriptor: str = "auto"
    sscd_preprocess: str = "nemo"
    threshold: float | None = None
    limit: int | None = None
    device: str = "cpu"
    dtype: str = "float32"
    save_images: bool = True
    baseline: str | None = None
    """A finished evaluate run of the same prompts and seeds: SSCD_gen compares each image with its image there."""
    mitigations: tuple[str, ...] = ()
    """Saved mitigations (``.safetensors`` + ``.json``) applied while generating; SSCD_gen is then taken
    against the unmitigated image of the same (prompt, seed) unless ``baseline`` is given."""

    def validate(self) -> None:
        if self.num_seeds < 1:
            raise DoriError(f"num_seeds: must be >= 1, got {self.num_seeds}")
        if self.threshold is not None and not (-1.0 <= self.threshold <= 1.0):
            raise DoriError(f"threshold: must be in [-1, 1], got {self.threshold}")
        if self.dtype not in DTYPES:
            raise DoriError(f"dtype: must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.limit is not None and self.limit < 1:
            raise DoriError(f"limit: must be >= 1, got {self.limit}")
        self.generation.validate()
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


def _distributed(device: str):
    """accelerate's process state; on CPU several processes talk over gloo (``MULTI_CPU``)."""
    from accelerate import PartialState

    return PartialState(cpu=str(device).startswith("cpu"))


def image_path(run: RunFolder, prompt_id: str, seed: int) -> Path:
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in prompt_id)
    return run.images / f"{safe}__s{seed}.png"


def save_png(image: torch.Tensor, path: Path) -> None:
    from PIL import Image

    array = (image.permute(1, 2, 0).clamp(0, 1).numpy() * 255).round().astype(np.uint8)
    tmp = path.with_suffix(".tmp.png")
    Image.fromarray(array).save(tmp)
    tmp.replace(path)


def _baseline_images(folder: str | Path) -> dict[str, Path]:
    import pandas as pd

    table = pd.read_parquet(Path(folder) / "records.parquet", columns=["key", "image"])
    return {k: Path(folder) / img for k, img in zip(table["key"], table["image"], strict=True) if img}


def _generate_mitigated(pipe, chunk, mitigations, config: EvaluateConfig):
    """Generate ``chunk`` with the mitigations applied; per-prompt mitigations are applied prompt by prompt."""
    from .mitigations import mitigated

    if not mitigations:
        return generate(pipe, [s for _, s in chunk], [r.prompt for r, _ in chunk], config=config.generation)
    per_prompt = any(m.scope == "per-prompt" for m in mitigations)
    groups = {}
    for i, (r, _) in enumerate(chunk):
        groups.setdefault(r.prompt if per_prompt else None, []).append(i)
    images = [None] * len(chunk)
    norms = [None] * len(chunk)
    for prompt, idx in groups.items():
        with mitigated(pipe, *mitigations, prompt=prompt):
            out = generate(pipe, [chunk[i][1] for i in idx], [chunk[i][0].prompt for i in idx], config=config.generation)
        for j, i in enumerate(idx):
            images[i] = out.images[j]
            norms[i] = out.noise_norm[j] if out.noise_norm is not None else None
    from .generation import Generations

    return Generations(torch.stack(images), torch.stack(norms) if norms[0] is not None else None)


def run_evaluate(config: EvaluateConfig, out: str | Path | None = None, *, overwrite: bool = False,
                 pipe=None, progress: Progress | None = None, descriptor=None,
                 command: str = "evaluate", mitigations: list | None = None) -> EvaluationResult:
    """Run (or resume) an evaluation; returns the run folder, all records and the summary."""
    from .descriptors import make_descriptor
    from .models import load_pipeline, model_name

    config.validate()
    state = _distributed(config.device)
    rank, world = state.process_index, state.num_processes
    device = str(state.device) if world > 1 and config.device.startswith("cuda") else config.device
    if pipe is None:
        pipe = load_pipeline(config.model, device=device, dtype=DTYPES[config.dtype])
    folder = getattr(pipe, "dori_model", {}).get("location")
    prompt_set: PromptSet = load_prompt_set(config.prompts, references=config.references, model_folder=folder)
    prompt_set = prompt_set.subset(config.limit)
    if descriptor is None:
        descriptor = make_descriptor(config.descriptor, pipe, config.sscd_preprocess, device, config.threshold)
    elif config.threshold is not None:
        descriptor.threshold = config.threshold
    threshold = descriptor.threshold

    baseline = _baseline_images(config.baseline) if config.baseline else None
    items = [(r, s) for r in prompt_set.records for s in config.seeds()]
    if baseline is not None:
        missing = [f"{r.id}#{s}" for r, s in items if f"{r.id}#{s}" not in baseline]
        if missing:
            raise DoriError(f"baseline: {config.baseline} has no image for {missing[0]} ({len(missing)} missing)")
    if mitigations is None:
        from .mitigations import load_mitigation

        mitigations = [load_mitigation(path) for path in config.mitigations]
    resolved = {**config.to_dict(), "descriptor_resolved": descriptor.describe(),
                "mitigations_resolved": [{"name": m.name, "scope": m.scope, "hash": config_hash(m.describe())}
                                         for m in mitigations]}
    out = Path(out) if out is not None else default_run_dir(command, model_name(config.model))
    if world > 1 and rank != 0:
        state.wait_for_everyone()
    run = RunFolder(out, command, resolved, overwrite=overwrite, rank=rank, world_size=world, seeds=config.seeds())
    if world > 1 and rank == 0:
        state.wait_for_everyone()

    mine = items[rank::world]
    done = run.done_keys()
    todo = [(r, s) for r, s in mine if f"{r.id}#{s}" not in done]
    total, finished = len(mine), len(mine) - len(todo)
    if finished:
        logger.info("resuming %s: %d of %d work items already done", run.path, finished, total)
    if progress:
        progress(finished, total)
    batch = config.generation.batch_size
    for start in range(0, len(todo), batch):
        chunk = todo[start : start + batch]
        gens = _generate_mitigated(pipe, chunk, mitigations, config)
        scores = score_images(descriptor, gens.images, [prompt_set.references.get(r.id) for r, _ in chunk],
                              prompt_set.gallery)
        gen_scores = None
        if mitigations and baseline is None:
            plain = generate(pipe, [s for _, s in chunk], [r.prompt for r, _ in chunk], config=config.generation)
            gen_scores = sscd_gen(descriptor, gens.images, plain.images)
        if baseline is not None:
            from .descriptors import to_tensor
            from .prompts import load_image

            base = torch.cat([to_tensor(load_image(baseline[f"{r.id}#{s}"])) for r, s in chunk])
            gen_scores = sscd_gen(descriptor, gens.images, base)
        records = []
        for i, (r, s) in enumerate(chunk):
            path = image_path(run, r.id, s)
            if config.save_images:
                save_png(gens.images[i], path)
            norm = gens.noise_norm[i] if gens.noise_norm is not None else None
            orig = float(scores.sscd_orig[i])
            records.append({
                "key": f"{r.id}#{s}", "prompt_id": r.id, "prompt": r.prompt, "group": r.group, "seed": s,
                "sscd_orig": orig, "replicated": bool(orig > threshold) if not math.isnan(orig) else None,
                "gallery_max": float(scores.gallery_max[i]), "gallery_match": scores.gallery_match[i],
                "noise_norm_first": float(norm[0]) if norm is not None else None,
                "noise_norm_mean": float(norm.mean()) if norm is not None else None,
                "image": str(path.relative_to(run.path)) if config.save_images else None,
            })
            if gen_scores is not None:
                records[-1]["sscd_gen"] = float(gen_scores[i])
        run.append(records)
        finished += len(chunk)
        if progress:
            progress(finished, total)

    if world > 1:
        state.wait_for_everyone()
    records = sorted(run.records(), key=lambda r: r["key"])
    summary = {"threshold": threshold, "descriptor": descriptor.describe(), "prompts": config.prompts,
               "rows": [summary_row(prompt_set.name, records, threshold)]}
    groups = sorted({r["group"] for r in records if r["group"] is not None})
    summary["rows"] += [summary_row(g, [r for r in records if r["group"] == g], threshold) for g in groups]
    if rank == 0:
        per_prompt_table(records, threshold).to_parquet(run.path / "prompts.parquet", index=False)
        run.finalize(summary)
    return EvaluationResult(run.path, records, summary)

