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

from .analysis.activations import ActivationsConfig
from .analysis.scatter import ScatterConfig
from .analysis.weights import WeightsConfig
from .attack.loop import AttackConfig
from .evaluate import EvaluateConfig, EvaluationResult, run_evaluate
from .finetune import FinetuneConfig
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
    wanda: WandaConfig = field(default_factory=WandaConfig)
    wanda_scope: str = "per-prompt"
    """Wanda's weights selected per memorized caption; per set, as the authors' code does, cut less on
    every testbed build measured (README)."""
    attack: bool = True
    attack_config: AttackConfig = field(default_factory=AttackConfig)
    attack_seeds: int = 10
    control_targets: tuple[tuple[str, int], ...] = (("testbed:seen-once", 4), ("testbed:held-out", 4))
    finetune: bool = True
    finetune_config: FinetuneConfig = field(default_factory=FinetuneConfig.testbed)
    finetune_cache: bool = True
    """Keep the fine-tuned testbed under ``$DORI_CACHE/finetune`` and reuse it in later demos."""
    fresh_attack_seed: int = 1000
    """First seed of the fresh Dori attack on the fine-tuned model (new seeds, prompt and N(0, I) inits)."""
    utility_images: int = 60
    analyses: bool = True
    scatter: ScatterConfig = field(default_factory=lambda: ScatterConfig(starts=12, num_seeds=4, reference_count=40))
    activations: ActivationsConfig = field(default_factory=lambda: ActivationsConfig(max_triggers=12))
    weights: WeightsConfig = field(default_factory=lambda: WeightsConfig(max_triggers=6))
    report: bool = True
    grid_seeds: int = 2

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
            finetune_config=FinetuneConfig.testbed(epochs=1, steps_per_epoch=4, surrogate_seeds=2),
            finetune_cache=False,
            utility_images=16,
            scatter=ScatterConfig(starts=3, num_seeds=2, reference_count=12,
                                  attack=AttackConfig(steps=10, record_at=(0,))),
            activations=ActivationsConfig(max_triggers=3, num_inference_steps=10),
            weights=WeightsConfig(max_triggers=2, methods=("wanda",)),
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
#: MR of the paper's Table 2 (v3, SD v1.4): adversarial fine-tuning (5 epochs) + Dori.
PAPER_TABLE2_MR = {"adversarial-ft+dori": 0.02}


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
                                  scope=config.wanda_scope, progress=stage("prune (Wanda)"))
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

    if config.finetune:
        ft_rows, ft_pipe = _finetune_rows(pipe, run, config, threshold, stage)
        rows.extend(ft_rows)
        _model_utility(pipe, ft_pipe, rows, config, run.path)

    if any("mr_by_step" in r for r in rows):
        from .plots import PAPER_MR_VS_STEPS, plot_mr_vs_steps

        curves = {r["name"]: r["mr_by_step"] for r in rows if "mr_by_step" in r}
        fig = plot_mr_vs_steps(curves, PAPER_MR_VS_STEPS)
        fig.savefig(run.path / "mr_vs_steps.png")
        fig.savefig(run.path / "mr_vs_steps.pdf")
    for row in rows:
        paper = {**PAPER_TABLE1_MR, **PAPER_TABLE2_MR}
        if row["name"] in paper:
            row["paper_mr"] = paper[row["name"]]
    if config.analyses:
        _analyses(pipe, run.path, config, stage)
    write_grid(run.path, pipe, config)
    (run.path / "summary.json").write_text(json.dumps(rows, indent=1))
    run.write_manifest({"status": "done", "threshold": threshold})
    if config.report:
        from .report import write_report

        write_report([run.path], run.path / "report.html", title="dori demo: memorization on the testbed")
    logger.info("demo written to %s", run.path)
    return run.path, rows


def _finetune_rows(pipe, run: RunFolder, config: DemoConfig, threshold: float, stage) -> tuple[list[dict], object]:
    """Adversarial fine-tuning of a fresh copy of the model, then its rows: the memorized captions
    (``adversarial-ft``) and a fresh Dori attack (new seeds; prompt and N(0, I) inits; ``adversarial-ft+dori``)."""
    import shutil

    import torch

    from .attack.run import AttackRunConfig, run_attack
    from .finetune import adversarial_finetune
    from .mitigations.nemo import cache_dir, model_fingerprint
    from .models import load_pipeline
    from .runs import config_hash

    ft_config = config.finetune_config
    if config.finetune_cache:
        # keyed by the model's weights too, so that a rebuilt testbed is never served a stale fine-tuning
        linears = {n: m for n, m in pipe.unet.named_modules() if isinstance(m, torch.nn.Linear)}
        weights = model_fingerprint(pipe, linears)
        out = cache_dir() / "finetune" / f"{pipe.dori_model['name']}-{config_hash(ft_config.to_dict())}-{weights}"
    else:
        out = run.path / "finetune"
    ft_pipe = load_pipeline(config.model)
    result = adversarial_finetune(ft_pipe, ft_config, out, progress=stage("adversarial fine-tuning"))
    (run.path / "finetune.json").write_text(json.dumps({**result.summary, "run": str(result.path)}, indent=1))
    for name in ("losses.png", "losses.pdf"):
        if (result.path / name).exists():
            shutil.copy(result.path / name, run.path / f"finetune_{name}")
    memorized = config.groups[0]
    evaluation = EvaluateConfig(model=str(result.pipeline), prompts=memorized.prompts, num_seeds=memorized.num_seeds,
                                seed=config.seed, generation=config.generation, limit=memorized.limit)
    evaluated = run_evaluate(evaluation, run.path / "adversarial-ft", pipe=ft_pipe, progress=stage("adversarial-ft"))
    row = summary_row("adversarial-ft", evaluated.records, threshold, field="sscd_orig")
    row["model"] = str(result.pipeline)
    records = []
    for init in ("prompt", "random"):
        attack = AttackRunConfig(prompts="testbed:memorized", init=init, num_seeds=config.attack_seeds,
                                 seed=config.fresh_attack_seed, attack=AttackConfig(
                                     **{**config.attack_config.to_dict(), "seed": config.fresh_attack_seed}),
                                 generation=config.generation)
        records += run_attack(ft_pipe, attack, run.path / f"attack-adversarial-ft-{init}",
                              progress=stage(f"attack (adversarial-ft, {init} init)"))[1]
    return [row, attack_row("adversarial-ft+dori", records, threshold)], ft_pipe


def _model_utility(pipe, ft_pipe, rows: list[dict], config: DemoConfig, folder: Path) -> None:
    """``utility`` per model row: shape-colour accuracy, FID with the original VAE's latents as features,
    and the retain denoising loss (:func:`dori.utility.testbed_utility`). NeMo's per-prompt neurons are
    all blocked together here (the union), a conservative reading of its utility cost."""
    from .mitigations import load_mitigation, mitigated
    from .utility import testbed_utility

    by_name = {r["name"]: r for r in rows}
    cases = [("memorized", pipe, ())]
    for name in ("nemo", "wanda"):
        if name in by_name and "mitigation" in by_name[name]:
            cases.append((name, pipe, (load_mitigation(by_name[name]["mitigation"]),)))
    if ft_pipe is not None:
        cases.append(("adversarial-ft", ft_pipe, ()))
    table = {}
    for name, model, mitigations in cases:
        with mitigated(model, *mitigations):
            values = testbed_utility(model, original_vae=pipe.vae, num_images=config.utility_images, seed=config.seed)
        by_name[name].setdefault("utility", {}).update(values)
        table[name] = values
    (folder / "utility.json").write_text(json.dumps(table, indent=1))


def _analyses(pipe, folder: Path, config: DemoConfig, stage) -> None:
    """The three locality analyses at the demo's (scaled-down) counts; their figures are copied to the top."""
    import shutil
    from dataclasses import replace

    from .analysis.activations import run_activations
    from .analysis.scatter import run_scatter
    from .analysis.weights import run_weights

    def progress(name):
        callback = stage(name)
        return (lambda _stage, done, total: callback(done, total)) if callback else None

    scatter_path, _ = run_scatter(pipe, config.scatter, folder / "analyze-scatter", progress=progress("scatter"))
    triggers = str(scatter_path)
    run_activations(pipe, replace(config.activations, triggers=triggers), folder / "analyze-activations",
                    progress=progress("activations"))
    run_weights(pipe, replace(config.weights, triggers=triggers), folder / "analyze-weights",
                progress=progress("weights"))
    for name in ("scatter", "activations", "weights"):
        for suffix in (".png", ".pdf"):
            source = folder / f"analyze-{name}" / f"{name}{suffix}"
            if source.exists():
                shutil.copy(source, folder / f"{name}{suffix}")


def write_grid(folder: Path, pipe, config: DemoConfig) -> Path:
    """``grid.json`` for the report: per memorized prompt and seed, the training image, the unmitigated,
    mitigated, and mitigated + Dori generations (whichever stages ran)."""
    from .descriptors import to_tensor
    from .evaluate import save_png
    from .prompts import load_prompt_set

    memorized = load_prompt_set("testbed:memorized", model_folder=pipe.dori_model["location"])
    (folder / "references").mkdir(exist_ok=True)
    columns = ["reference"]
    cells: dict[tuple[str, int], dict] = {}
    prompts = {r.id: r.prompt for r in memorized.records}
    seeds = list(range(config.seed, config.seed + config.grid_seeds))
    for record in memorized.records:
        name = f"references/{record.id.replace('/', '_')}.png"
        save_png(to_tensor(memorized.references[record.id][None])[0], folder / name)
        for seed in seeds:
            cells[(record.id, seed)] = {"reference": {"image": name, "score": None}}

    def from_records(column: str, path: Path, seed_of) -> None:
        file = path / "records.parquet"
        if not file.exists():
            return
        import pandas as pd

        columns.append(column)
        for r in pd.read_parquet(file).to_dict("records"):
            for seed, image, score in seed_of(r):
                if (r["prompt_id"], seed) in cells:
                    cells[(r["prompt_id"], seed)][column] = {"image": f"{path.name}/{image}", "score": float(score)}

    def evaluated(r):
        return [(int(r["seed"]), r["image"], r["sscd_orig"])]

    def attacked(r):
        # the i-th evaluation image of the trigger sits in row seed + i (the fresh attack uses other seeds)
        return [(config.seed + i, img, s) for i, (img, s) in enumerate(zip(r["images"], r["scores"], strict=True))
                if r["restart"] == 0]

    for column, sub, kind in (("unmitigated", "memorized", "eval"), ("nemo", "nemo", "eval"),
                              ("nemo+dori", "attack-nemo", "attack"), ("wanda", "wanda", "eval"),
                              ("wanda+dori", "attack-wanda", "attack"), ("adversarial-ft", "adversarial-ft", "eval"),
                              ("adversarial-ft+dori", "attack-adversarial-ft-prompt", "attack")):
        from_records(column, folder / sub, evaluated if kind == "eval" else attacked)
    rows = [{"prompt_id": pid, "prompt": prompts[pid], "seed": seed, "cells": value}
            for (pid, seed), value in cells.items()]
    path = folder / "grid.json"
    path.write_text(json.dumps({"columns": columns, "rows": rows}, indent=1))
    return path
