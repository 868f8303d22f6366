"""``dori demo``: the paper's story on the embedded testbed, written to one run folder.

Rows of ``summary.json`` (a list of ``{"name", "n", "sscd_mean", "sscd_std", "mr", ...}``):

* ``memorized``: the memorized captions, similarity to their own training photo (SSCD_orig);
* ``seen-once``: captions seen once, similarity to their own training crop (the paper's
  "non-memorized" row);
* ``shape`` (trained drawings) and ``held-out`` (never trained): there is no training image they
  could copy, so their similarity is to the *closest memorized photo*;
* ``nemo`` / ``wanda``: the memorized captions with NeMo's neurons deactivated / Wanda's weights
  pruned (localised on the memorized captions by the methods' own procedures);
* ``non-memorized``: the seen-once rows again under the paper's name; ``non-memorized+dori``: Dori
  aimed at seen-once and held-out images on the unmitigated model (the false-positive control);
  ``nemo+dori`` / ``wanda+dori``: Dori against the mitigated model, from the memorized prompt's
  embedding, 50 steps. Their similarity and MR are over ``attack_seeds`` generations per trigger;
  ``mr_by_step`` holds the MR after 0, 1, 10, 25 and 50 steps (``mr_vs_steps.png``).

Every row has ``paper_mr`` where the paper (v3, SD v1.4) reports one.

Every row has ``mr_gallery`` (share of generations replicating any memorized photo). The model rows
(``memorized``, ``nemo``, ``wanda``) also carry ``utility``: the share of shape captions drawn in the
right colours (:mod:`dori.testbed.utility`) and, for mitigations, the SSCD_gen of held-out and shape
captions (similarity to the unmitigated image of the same seed; 1 = unchanged).
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from .attack.loop import AttackConfig
from .evaluate import EvaluateConfig, EvaluationResult, run_evaluate
from .generation import GenerationConfig
from .memorization import summary_row
from .mitigations.nemo import NeMoConfig
from .mitigations.wanda import WandaConfig
from .runs import RunFolder, default_run_dir

logger = logging.getLogger(__name__)

StageCallback = Callable[[str, int], Callable[[int, int], None] | None]


@dataclass(frozen=True)
class DemoGroup:
    name: str
    prompts: str
    num_seeds: int
    limit: int | None
    score: str


@dataclass(frozen=True)
class DemoConfig:
    model: str = "testbed"
    seed: int = 0
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    groups: tuple[DemoGroup, ...] = (
        DemoGroup("memorized", "testbed:memorized", 10, None, "sscd_orig"),
        DemoGroup("seen-once", "testbed:seen-once", 2, 40, "sscd_orig"),
        DemoGroup("shape", "testbed:shape", 1, 40, "gallery_max"),
        DemoGroup("held-out", "testbed:held-out", 2, None, "gallery_max"),
    )
    mitigations: bool = True
    nemo: NeMoConfig = field(default_factory=NeMoConfig)
    wanda: WandaConfig = field(default_factory=lambda: WandaConfig(num_inference_steps=25))
    attack: bool = True
    attack_config: AttackConfig = field(default_factory=AttackConfig)
    attack_seeds: int = 10
    control_targets: tuple[tuple[str, int], ...] = (("testbed:seen-once", 4), ("testbed:held-out", 4))

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def quick(cls) -> DemoConfig:
        """The same story with fewer seeds, prompts and attack steps (about a minute on 2 cores; for tests)."""
        return cls(
            groups=(DemoGroup("memorized", "testbed:memorized", 4, None, "sscd_orig"),
                    DemoGroup("seen-once", "testbed:seen-once", 1, 12, "sscd_orig"),
                    DemoGroup("shape", "testbed:shape", 1, 12, "gallery_max"),
                    DemoGroup("held-out", "testbed:held-out", 1, 12, "gallery_max")),
            nemo=NeMoConfig(num_seeds=4),
            attack_config=AttackConfig(steps=10, record_at=(0, 1, 10)),
            attack_seeds=4,
            control_targets=(("testbed:seen-once", 2), ("testbed:held-out", 2)),
        )


def _load_images(result: EvaluationResult):
    import torch

    from .descriptors import to_tensor
    from .prompts import load_image

    return torch.cat([to_tensor(load_image(result.path / r["image"])) for r in result.records])


def shape_accuracy(results: list[EvaluationResult]) -> float:
    """Share of the shape captions among these runs' records drawn in the right colours."""
    from .testbed.utility import shape_caption_accuracy

    scores, weights = [], []
    for result in results:
        acc = shape_caption_accuracy(_load_images(result), [r["prompt"] for r in result.records])
        n = sum(1 for r in result.records if r["prompt"].endswith(" background"))
        if not math.isnan(acc):
            scores.append(acc * n)
            weights.append(n)
    return float(sum(scores) / sum(weights)) if weights else math.nan


#: MR of the paper's Table 1 (v3, SD v1.4, verbatim-memorized prompts).
PAPER_TABLE1_MR = {"memorized": 0.98, "non-memorized": 0.00, "non-memorized+dori": 0.00, "nemo": 0.20,
                   "nemo+dori": 0.99, "wanda": 0.00, "wanda+dori": 0.72}


def attack_row(name: str, records: list[dict], threshold: float) -> dict:
    """A Table-1 row over every generation of every trigger."""
    from .memorization import mean_std, memorization_rate

    scores = [s for r in records for s in r["scores"]]
    mean, std = mean_std(scores)
    steps = sorted({int(k) for r in records for k in r["mr_by_step"]})
    return {"name": name, "n": len(scores), "sscd_mean": mean, "sscd_std": std,
            "mr": memorization_rate(scores, threshold), "score": "sscd_orig", "triggers": len(records),
            "mr_by_step": {s: float(np.mean([r["mr_by_step"][str(s)] for r in records])) for s in steps},
            "relative_perturbation": float(np.mean([r["relative_perturbation"] for r in records]))}


def _attack_rows(pipe, root: Path, config: DemoConfig, nemo_path, wanda_path, threshold, stage) -> list[dict]:
    from .attack.run import AttackRunConfig, run_attack

    def attack(name: str, prompts: str, limit: int | None, mitigations: tuple[str, ...]) -> list[dict]:
        run_config = AttackRunConfig(prompts=prompts, limit=limit, num_seeds=config.attack_seeds, seed=config.seed,
                                     attack=config.attack_config, generation=config.generation, mitigations=mitigations)
        return run_attack(pipe, run_config, root / f"attack-{name}", progress=stage(f"attack ({name})"))[1]

    control = [r for i, (prompts, limit) in enumerate(config.control_targets)
               for r in attack(f"control-{i}", prompts, limit, ())]
    return [
        attack_row("non-memorized+dori", control, threshold),
        attack_row("nemo+dori", attack("nemo", "testbed:memorized", None, (str(nemo_path),)), threshold),
        attack_row("wanda+dori", attack("wanda", "testbed:memorized", None, (str(wanda_path),)), threshold),
    ]


def run_demo(config: DemoConfig | None = None, out: str | Path | None = None, *, overwrite: bool = False,
             on_stage: StageCallback | None = None) -> tuple[Path, list[dict]]:
    """Run (or resume) the demo; ``on_stage(name, total)`` may return a ``progress(done, total)`` callback."""
    from .mitigate import run_localize, run_prune
    from .models import load_pipeline

    config = config or DemoConfig()
    out = Path(out) if out is not None else default_run_dir("demo", "testbed")
    run = RunFolder(out, "demo", config.to_dict(), overwrite=overwrite, seeds=[config.seed])
    pipe = load_pipeline(config.model)

    def stage(name: str):
        return on_stage(name, 0) if on_stage else None

    def evaluate(name: str, group: DemoGroup, mitigations: tuple[str, ...] = ()) -> EvaluationResult:
        evaluation = EvaluateConfig(model=config.model, prompts=group.prompts, num_seeds=group.num_seeds,
                                    seed=config.seed, generation=config.generation, limit=group.limit,
                                    mitigations=mitigations)
        return run_evaluate(evaluation, run.path / name, pipe=pipe, progress=stage(name))

    rows, results = [], {}
    for group in config.groups:
        results[group.name] = evaluate(group.name, group)
        threshold = results[group.name].summary["threshold"]
        rows.append(summary_row(group.name, results[group.name].records, threshold, field=group.score))
    utility_groups = [g for g in config.groups if g.name in ("shape", "held-out")]
    rows[0]["utility"] = {"shape_accuracy": shape_accuracy([results[g.name] for g in utility_groups])}

    if config.mitigations:
        nemo_path, _ = run_localize(pipe, "testbed:memorized", config.nemo, run.path / "localize-nemo",
                                    progress=stage("localize (NeMo)"))
        wanda_path, _ = run_prune(pipe, "testbed:memorized", config.wanda, run.path / "prune-wanda",
                                  progress=stage("prune (Wanda)"))
        memorized = config.groups[0]
        for name, path in (("nemo", nemo_path), ("wanda", wanda_path)):
            mitigation = (str(path),)
            result = evaluate(name, memorized, mitigation)
            row = summary_row(name, result.records, threshold, field="sscd_orig")
            others = [evaluate(f"{name}-{g.name}", g, mitigation) for g in utility_groups]
            gen = [r["sscd_gen"] for o in others for r in o.records]
            row["utility"] = {"shape_accuracy": shape_accuracy(others),
                              "sscd_gen_mean": float(np.mean(gen)), "sscd_gen_min": float(np.min(gen))}
            row["mitigation"] = str(path)
            rows.append(row)

    if config.mitigations and config.attack:
        rows.extend(_attack_rows(pipe, run.path, config, nemo_path, wanda_path, threshold, stage))
        seen = next((r for r in rows if r["name"] == "seen-once"), None)
        if seen is not None:
            rows.insert(rows.index(seen) + 1, {**seen, "name": "non-memorized"})
        from .plots import PAPER_MR_VS_STEPS, plot_mr_vs_steps

        curves = {r["name"]: r["mr_by_step"] for r in rows if "mr_by_step" in r}
        fig = plot_mr_vs_steps(curves, PAPER_MR_VS_STEPS)
        fig.savefig(run.path / "mr_vs_steps.png")
        fig.savefig(run.path / "mr_vs_steps.pdf")
    for row in rows:
        if row["name"] in PAPER_TABLE1_MR:
            row["paper_mr"] = PAPER_TABLE1_MR[row["name"]]
    (run.path / "summary.json").write_text(json.dumps(rows, indent=1))
    run.write_manifest({"status": "done", "threshold": threshold})
    logger.info("demo written to %s", run.path)
    return run.path, rows
