"""Locality analysis A (the paper's section 2.2): where Dori triggers of one memorized image lie in embedding space.

N starts ``y0 ~ N(0, I)`` are optimised with Dori (the ``dori attack`` run in ``attack/``, resumable);
the starts and the triggers are embedded jointly with t-SNE, and the pairwise L2 distances among the
triggers are compared with those among non-memorized prompts' embeddings. The paper: triggers are
"widely scattered", each next to its own start, and further apart than non-memorized prompts.

Run folder: ``manifest.json``, ``attack/`` (the attack run), ``table.parquet`` (one row per start,
trigger and the prompt: t-SNE position, status, distances), ``distances.parquet`` (every pairwise
distance per group), ``summary.json``, ``scatter.png`` / ``scatter.pdf``.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from .. import paper
from ..attack.loop import AttackConfig
from ..descriptors import DescriptorConfig
from ..errors import DoriError
from ..generation import GenerationConfig
from ..progress import Progress
from .common import evenly_spaced, save_figure, scaled_note
from .metrics import PairStats, effective_perplexity, pairwise_l2, tsne_embed

logger = logging.getLogger(__name__)



@dataclass(frozen=True)
class ScatterConfig:
    """Analysis A's settings; defaults are the paper's counts (100 starts, 50 Dori steps).

    The attack's MR-by-step checks run only at step 0 (the random start's own MR, a baseline) and
    at the end (``record_at=(0,)``).
    ``reference_prompts`` (non-memorized, for the distance comparison) defaults to the testbed's
    seen-once captions on the testbed and ``laion-nonmem`` elsewhere; ``reference_count`` of them,
    evenly spaced through the set.
    """

    prompts: str = "testbed:memorized"
    references: str | None = None
    prompt_id: str | None = None
    starts: int = paper.STARTS
    seed: int = 0
    num_seeds: int = 10
    batch_size: int = 8
    attack: AttackConfig = field(default_factory=lambda: AttackConfig(record_at=(0,)))
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    descriptor: DescriptorConfig = field(default_factory=DescriptorConfig)
    mitigations: tuple[str, ...] = ()
    reference_prompts: str | None = None
    reference_count: int = 100
    tsne_seed: int = 0
    perplexity: float = 30.0

    def validate(self) -> None:
        if self.starts < 2:
            raise DoriError(f"starts: need at least 2 random starts to compare triggers, got {self.starts}")
        if self.reference_count < 2:
            raise DoriError(f"reference_count: need at least 2 non-memorized prompts, got {self.reference_count}")
        if self.perplexity <= 0:
            raise DoriError(f"perplexity: must be > 0, got {self.perplexity}")
        self.attack_run().validate()

    def to_dict(self) -> dict:
        return asdict(self)

    def attack_run(self, prompt_id: str | None = None):
        """The ``dori attack`` configuration of the N random-start runs (one image: ``prompt_id`` or the set's first)."""
        from ..attack.run import AttackRunConfig

        pick = dict(ids=(prompt_id,)) if prompt_id else dict(limit=1)
        return AttackRunConfig(prompts=self.prompts, references=self.references, **pick, init="random",
                               restarts=self.starts, num_seeds=self.num_seeds, seed=self.seed,
                               batch_size=self.batch_size, attack=self.attack, generation=self.generation,
                               descriptor=self.descriptor, mitigations=self.mitigations)


def default_reference_prompts(pipe) -> str:
    from ..models import testbed_folder

    return "testbed:seen-once" if testbed_folder(pipe) else "laion-nonmem"


def _pick_prompt(prompt_set, prompt_id: str | None):
    ids = [r.id for r in prompt_set.records]
    if prompt_id is None:
        return prompt_set.records[0]
    if prompt_id not in ids:
        raise DoriError(f"prompt_id: {prompt_id!r} is not in {prompt_set.name} (ids: {', '.join(ids[:8])}"
                        f"{', ...' if len(ids) > 8 else ''})")
    return prompt_set.records[ids.index(prompt_id)]


def _embeddings(pipe, config: ScatterConfig, record, records: list[dict], attack_path: Path, references: list[str]):
    """``(starts, triggers, the prompt's embedding, the non-memorized prompts' embeddings)``, all on the CPU."""
    from ..attack.parts import RandomNormal
    from ..attack.run import load_triggers
    from ..models import encode_prompts
    from .triggers import load_initial

    tensors = load_triggers(attack_path)
    triggers = torch.stack([tensors[r["key"]] for r in records]).float().cpu()
    starts = load_initial(attack_path, [r["key"] for r in records])
    if starts is None:  # the attack did not keep its starts: redraw them (the initialiser is seeded per restart)
        init = RandomNormal(config.seed)
        starts = torch.stack([init(pipe, record.prompt, r["restart"]) for r in records]).float().cpu()
    prompt_embed = encode_prompts(pipe, [record.prompt]).float().cpu()
    reference = torch.cat([encode_prompts(pipe, references[i : i + 64]).float().cpu()
                           for i in range(0, len(references), 64)])
    return starts, triggers, prompt_embed, reference


def _table(records: list[dict], record, xy: np.ndarray, starts, triggers, prompt_embed):
    """One row per start, per trigger and for the prompt: t-SNE position, status, norms, distances."""
    import pandas as pd

    n = len(records)
    moved = (triggers - starts).flatten(1).norm(dim=1).numpy()
    to_prompt = (triggers - prompt_embed).flatten(1).norm(dim=1).numpy()
    rows = []
    for i, r in enumerate(records):
        common = {"key": r["key"], "restart": int(r["restart"]), "status": r["status"], "mr": float(r["mr"]),
                  "sscd_mean": float(r["sscd_mean"])}
        rows.append({**common, "kind": "start", "tsne_x": xy[i, 0], "tsne_y": xy[i, 1],
                     "norm": float(starts[i].norm()), "distance_to_start": 0.0,
                     "distance_to_prompt": float((starts[i] - prompt_embed[0]).norm())})
        rows.append({**common, "kind": "trigger", "tsne_x": xy[n + i, 0], "tsne_y": xy[n + i, 1],
                     "norm": float(triggers[i].norm()), "distance_to_start": float(moved[i]),
                     "distance_to_prompt": float(to_prompt[i])})
    rows.append({"key": record.id, "restart": -1, "status": "prompt", "mr": float("nan"), "sscd_mean": float("nan"),
                 "kind": "prompt", "tsne_x": xy[-1, 0], "tsne_y": xy[-1, 1], "norm": float(prompt_embed.norm()),
                 "distance_to_start": float("nan"), "distance_to_prompt": 0.0})
    return pd.DataFrame.from_records(rows), moved, to_prompt


def run_scatter(pipe, config: ScatterConfig, out: str | Path | None = None, *, overwrite: bool = False,
                progress: Progress | None = None) -> tuple[Path, dict]:
    """Run analysis A; returns the run folder and the summary. A rerun resumes the attack where it stopped."""
    import pandas as pd

    from ..attack.run import run_attack
    from ..config_files import to_dict
    from ..models import model_name, model_record
    from ..prompts import prompts_for, require_references
    from ..runs import RunFolder, default_run_dir

    config.validate()
    # the attack's inputs (training images, descriptor) are read here, before the run folder exists
    prompt_set = prompts_for(pipe, config.prompts, references=config.references)
    record = _pick_prompt(prompt_set, config.prompt_id)
    require_references(replace(prompt_set, records=[record]), "the scatter analysis's attack")
    config.attack_run(record.id).descriptor.build(pipe)
    reference_spec = config.reference_prompts or default_reference_prompts(pipe)
    references = evenly_spaced([r.prompt for r in prompts_for(pipe, reference_spec).records], config.reference_count)
    if len(references) < 2:
        raise DoriError(f"reference_prompts: {reference_spec} has fewer than 2 prompts")
    out = Path(out) if out is not None else default_run_dir("analyze-scatter", model_name(pipe))
    run = RunFolder(out, "analyze-scatter", to_dict(config), model=model_record(pipe),
                    resolved={"reference_spec": reference_spec}, overwrite=overwrite, seeds=config.attack_run().seeds())
    with run.guard():
        attack_path, records = run_attack(pipe, config.attack_run(record.id), run.path / "attack",
                                          overwrite=overwrite, progress=progress)
        records = sorted((r for r in records if r["prompt_id"] == record.id), key=lambda r: r["restart"])
        starts, triggers, prompt_embed, reference = _embeddings(pipe, config, record, records, attack_path, references)
        succeeded = np.array([r["status"] == "succeeded" for r in records])
        if progress:
            progress("t-SNE", 0, 1)
        xy = tsne_embed(torch.cat([starts, triggers, prompt_embed]), seed=config.tsne_seed, perplexity=config.perplexity)
        if progress:
            progress("t-SNE", 1, 1)
        groups = {"triggers": triggers, "successful triggers": triggers[torch.from_numpy(succeeded)],
                  "starts": starts, "non-memorized prompts": reference}
        distances = {name: pairwise_l2(x) for name, x in groups.items()}
        stats = {name: PairStats.of(d, len(groups[name])) for name, d in distances.items()}
        table, moved, to_prompt = _table(records, record, xy, starts, triggers, prompt_embed)
        table.to_parquet(run.path / "table.parquet", index=False)
        frames = []
        for name, d in distances.items():
            i, j = np.triu_indices(len(groups[name]), 1)  # the order of pairwise_l2
            frames.append(pd.DataFrame({"group": name, "i": i, "j": j, "distance": d}))
        pd.concat(frames, ignore_index=True).to_parquet(run.path / "distances.parquet", index=False)
        summary = _summary(config, record, records, succeeded, stats, moved, to_prompt, len(xy), reference_spec,
                           len(references))
        from .plots import plot_scatter

        save_figure(plot_scatter(table, distances, summary), run.path, "scatter")
        run.finalize(summary)
    logger.info("scatter: %d starts, %d succeeded, trigger/non-memorized distance ratio %.2f",
                len(records), summary["n_succeeded"], summary["ratio_mean"])
    return run.path, summary


def _summary(config: ScatterConfig, record, records, succeeded, stats, moved, to_prompt, points: int,
             reference_spec: str, n_references: int) -> dict:
    ref, trig = stats["non-memorized prompts"], stats["triggers"]
    n = len(records)
    return {
        "analysis": "scatter (section 2.2)",
        "prompt_id": record.id, "prompt": record.prompt,
        "n_starts": n, "steps": config.attack.steps, "n_eval_seeds": config.num_seeds,
        "n_succeeded": int(succeeded.sum()), "success_share": float(succeeded.mean()),
        "reference_prompts": reference_spec, "n_reference_prompts": n_references,
        "distances": {name: s.to_dict() for name, s in stats.items()},
        "ratio_mean": trig.mean / ref.mean, "ratio_median": trig.median / ref.median,
        "ratio_mean_successful": (stats["successful triggers"].mean / ref.mean
                                  if stats["successful triggers"].n_pairs else float("nan")),
        "start_to_trigger_mean": float(moved.mean()), "trigger_to_prompt_mean": float(to_prompt.mean()),
        "start_pair_distance_mean": stats["starts"].mean,
        "tsne": {"seed": config.tsne_seed, "perplexity": effective_perplexity(points, config.perplexity),
                 "points": points},
        "paper": {"n_starts": paper.STARTS, "steps": paper.STEPS,
                  "finding": "triggers widely scattered, each next to its start; pairwise L2 among triggers "
                             "larger than among non-memorized prompts"},
        "note": scaled_note([("starts", n, paper.STARTS), ("Dori steps", config.attack.steps, paper.STEPS)])
                + f"; success = at least half of {config.num_seeds} generations above the descriptor threshold"
                + "; distance std is the spread over pairs (pairs share members), not a standard error",
    }
