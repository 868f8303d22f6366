"""``dori demo``: the paper's story on the embedded testbed, written to one run folder.

Rows of ``summary.json`` (a list of ``{"name", "n", "sscd_mean", "sscd_std", "mr", ...}``):

* ``memorized``: the memorized captions, similarity to their own training photo (SSCD_orig);
* ``seen-once``: captions seen once, similarity to their own training crop (the paper's
  "non-memorized" row);
* ``shape`` (trained drawings) and ``held-out`` (never trained): there is no training image they
  could copy, so their similarity is to the *closest memorized photo*;
* ``nemo`` / ``wanda``: the memorized captions with NeMo's neurons deactivated / Wanda's weights
  pruned (fitted on the memorized captions by ``dori mitigate``, the methods' own procedures);
* ``adversarial-ft`` / ``adversarial-ft+dori``: the adversarially fine-tuned testbed (cached under
  ``$DORI_CACHE/finetune``, keyed by the weights and the settings), and a fresh Dori attack on it;
* ``non-memorized``: the seen-once rows again under the paper's name; ``non-memorized+dori``: Dori
  aimed at seen-once and held-out images on the unmitigated model (the false-positive control);
  ``nemo+dori`` / ``wanda+dori``: Dori against the mitigated model, from the memorized prompt's
  embedding, 50 steps. Their similarity and MR are over ``attack_seeds`` generations per trigger;
  ``mr_by_step`` holds the MR after 0, 1, 10, 25 and 50 steps (``mr_vs_steps.png``);
* ``esd`` / ``ca`` / ``siss`` / ``wanda-10``, each with ``+dori``: Table 2's unlearning baselines and the
  stronger pruning;
* ``wen`` / ``ren`` / ``random-tokens``, each with ``+dori`` (optimised without the mitigation) and
  ``+dori-adaptive`` (through it); ``dori`` (the unmitigated model) and ``dori-low-noise-norm`` (the
  detection-aware recipe), with ``detection.json`` and ``leaderboard.json`` (:mod:`dori.robustness`).

Every row has ``paper_mr`` where the paper (v3, SD v1.4) reports one (:mod:`dori.paper`).

Every row has ``mr_gallery`` (share of generations replicating any memorized photo). The model rows
(``memorized``, ``nemo``, ``wanda``) also carry ``utility``: the share of shape captions drawn in the
right colours (:mod:`dori.testbed.shape_colours`) and, for mitigations, the SSCD_gen of held-out and shape
captions (similarity to the unmitigated image of the same seed; 1 = unchanged).
"""

from __future__ import annotations

import copy
import json
import logging
import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from . import paper
from .analysis.activations import ActivationsConfig
from .analysis.scatter import ScatterConfig
from .analysis.weights import WeightsConfig
from .attack.loop import AttackConfig
from .config_files import to_dict
from .descriptors import DescriptorConfig
from .errors import DoriError
from .evaluate import EvaluateConfig, EvaluationResult, run_evaluate
from .finetune import FinetuneConfig
from .finetune.config import TEMPLATE_TESTBED_PROMPTS
from .generation import GenerationConfig
from .memorization import attack_row, summary_row
from .mitigations.concept_ablation import ConceptAblationConfig
from .mitigations.esd import ESDConfig
from .mitigations.nemo import NeMoConfig
from .mitigations.siss import SISSConfig
from .mitigations.wanda import WandaConfig
from .mitigations.wen import WenConfig
from .progress import Progress, labelled
from .prompts import prompt_kinds
from .robustness import RobustnessConfig
from .runs import Processes, RunFolder, default_run_dir, json_text, safe_filename

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DemoGroup:
    name: str
    prompts: str
    num_seeds: int
    limit: int | None
    score: str
    references: str | None = None
    """A folder of the prompts' training images (the testbed's sets carry theirs)."""


UNLEARNING = {"esd": "esd", "concept-ablation": "ca", "siss": "siss"}
"""The unlearning baselines the demo can run -> their rows' names (each has a settings field of the
method's name, ``-`` as ``_``)."""


@dataclass(frozen=True)
class DemoConfig:
    """The demo's stages and their settings. The defaults are the testbed's story; :meth:`paper` is the
    same story on any model (the bundled Webster prompts, your references and descriptor)."""

    seed: int = 0
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    descriptor: DescriptorConfig = field(default_factory=DescriptorConfig)
    memorized: str = "testbed:memorized"
    """The memorized prompts that are mitigated, attacked, shown in the grid and analysed."""
    references: str | None = None
    """Their training images (a folder of ``<prompt id>.png``; the testbed's sets carry theirs)."""
    limit: int | None = None
    """Only the first N memorized prompts (a first look)."""
    groups: tuple[DemoGroup, ...] = (
        DemoGroup("memorized", "testbed:memorized", 10, None, "sscd_orig"),
        DemoGroup("seen-once", "testbed:seen-once", 2, 40, "sscd_orig"),
        DemoGroup("shape", "testbed:shape", 1, 40, "gallery_max"),
        DemoGroup("held-out", "testbed:held-out", 2, None, "gallery_max"),
    )
    mitigations: bool = True
    nemo: NeMoConfig = field(default_factory=NeMoConfig)
    wanda: WandaConfig = field(default_factory=lambda: WandaConfig(scope="per-prompt"))
    """Wanda's weights selected per memorized caption; per set, as the authors' code does, cut less on
    every testbed build measured (docs/testbed.md)."""
    wanda_10: WandaConfig | None = field(default_factory=lambda: WandaConfig(scope="per-prompt", sparsity=0.10))
    """The paper's stronger pruning (Table 2, Wanda at 10%): rows ``wanda-10`` and ``wanda-10+dori``, and on the
    testbed its damage to the memorized captions' subjects (``a_concept``, ``fid_concept``); None: not run."""
    attack: bool = True
    attack_config: AttackConfig = field(default_factory=AttackConfig)
    attack_seeds: int = 10
    control_targets: tuple[tuple[str, int], ...] = (("testbed:seen-once", 4), ("testbed:held-out", 4))
    """Non-memorized prompt sets (and how many of each) Dori aims at: the false-positive control."""
    control_references: str | None = None
    """The training images of the control prompts (the testbed's sets carry theirs)."""
    utility_groups: tuple[str, ...] = ("shape", "held-out")
    """Groups whose captions measure what a mitigation does to other prompts (SSCD_gen, shape colours)."""
    testbed_utility: bool = True
    """The testbed's utility bundle per model (shape colours, FID with VAE features, retain loss)."""
    finetune: bool = True
    finetune_config: FinetuneConfig = field(default_factory=FinetuneConfig.testbed)
    finetune_prompts: str | None = None
    """The prompts adversarial fine-tuning attacks, with their training images from the testbed's sets or
    ``references`` (``limit`` does not apply); None: ``memorized``. The rows still measure ``memorized``. A
    template photo is reached from every caption of its template, so on a testbed with template captions
    (``dori testbed build --recipe v2``) ``testbed:memorized+testbed:template`` attacks them all
    (docs/testbed.md, "Adversarial fine-tuning re-measured"); :meth:`on_template_testbed` sets it."""
    finetune_cache: bool = True
    """Keep the fine-tuned testbed under ``$DORI_CACHE/finetune`` and reuse it in later demos."""
    unlearning: tuple[str, ...] = tuple(UNLEARNING)
    """Fine-tuning unlearning baselines of Table 2, each fitted on the memorized captions (cached like the
    adversarial fine-tuning when ``finetune_cache`` is on) with the rows ``<method>`` and ``<method>+dori``."""
    esd: ESDConfig = field(default_factory=ESDConfig.testbed)
    concept_ablation: ConceptAblationConfig = field(default_factory=ConceptAblationConfig.testbed)
    siss: SISSConfig = field(default_factory=SISSConfig.testbed)
    robustness: RobustnessConfig | None = field(default_factory=RobustnessConfig)
    """The inference-time mitigations (rows ``wen``, ``ren``, ``random-tokens``, each with ``+dori`` and
    ``+dori-adaptive``), detection under attack (``detection.json``, rows ``dori`` and ``dori-low-noise-norm``)
    and the leaderboard (:mod:`dori.robustness`); None: not run."""
    fresh_attack_seed: int = 1000
    """First seed of the fresh Dori attack on the fine-tuned model (new seeds, prompt and N(0, I) inits)."""
    table2_curves: bool = False
    """Record Table 2's attacks (Wanda at 10%, the fine-tuned models) after 0/1/10/25/50 steps too; by default
    only their final MR is checked: the success checks are most of an attack's cost, and the paper's MR-vs-steps
    figure shows NeMo, Wanda and the control only."""
    utility_images: int = 60
    concept_damage: bool = True
    """The testbed's concept damage (``a_concept``, ``fid_concept``) in every model's utility."""
    concept_seeds: int = 2
    """Generations per concept caption (32 captions) for the concept damage, and for its baseline."""
    table1_curves: bool = True
    """Record Dori against NeMo and Wanda after 0/1/10/25/50 steps (the MR-vs-steps figure); False: the final
    success check only, as Table 2's rows."""
    analyses: bool = True
    scatter: ScatterConfig = field(default_factory=lambda: ScatterConfig(starts=12, num_seeds=4, reference_count=40))
    activations: ActivationsConfig = field(default_factory=lambda: ActivationsConfig(max_triggers=12))
    weights: WeightsConfig = field(default_factory=lambda: WeightsConfig(max_triggers=6))
    report: bool = True
    grid_seeds: int = 2
    title: str = "dori demo: memorization on the testbed"

    def to_dict(self) -> dict:
        return asdict(self)

    def validate(self) -> None:
        self.generation.validate()
        self.nemo.validate()
        self.wanda.validate()
        if self.wanda_10 is not None:
            self.wanda_10.validate()
        if self.robustness is not None:
            self.robustness.validate()
        self.attack_config.validate()
        self.finetune_config.validate()
        for method in UNLEARNING:
            getattr(self, method.replace("-", "_")).validate()
        if self.finetune_prompts is not None and not self.finetune_prompts.strip():
            raise DoriError("finetune_prompts: give a prompt set (e.g. testbed:memorized+testbed:template) or leave it "
                            "unset for the memorized prompts")
        if self.concept_seeds < 1:
            raise DoriError(f"concept_seeds: must be >= 1, got {self.concept_seeds}")
        unknown = [m for m in self.unlearning if m not in UNLEARNING]
        if unknown:
            raise DoriError(f"unlearning: {unknown[0]!r} is not one of {', '.join(UNLEARNING)}")

    @classmethod
    def quick(cls) -> DemoConfig:
        """The same story with fewer seeds, prompts and attack steps (3 to 4.5 minutes on 2 cores, by the
        machine; its models fitted in the run folder; for a first look and the tests)."""
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
            esd=ESDConfig.testbed(iterations=2),
            concept_ablation=ConceptAblationConfig.testbed(iterations=2, num_class_images=8, paraphrase_images=2),
            siss=SISSConfig.testbed(iterations=2, keep_images=32),
            robustness=RobustnessConfig(negatives=(("testbed:seen-once", 6), ("testbed:held-out", 6)), detection_seeds=2),
            finetune_cache=False,
            utility_images=16,
            concept_seeds=1,
            scatter=ScatterConfig(starts=3, num_seeds=2, reference_count=12,
                                  attack=AttackConfig(steps=10, record_at=(0,))),
            activations=ActivationsConfig(max_triggers=3, num_inference_steps=10),
            weights=WeightsConfig(max_triggers=2, methods=("wanda",)),
        )

    def on_template_testbed(self, quick: bool = False) -> DemoConfig:
        """This config for a testbed with template captions (a ``dori testbed build --recipe v2`` folder; the
        verbs apply it there by default): adversarial fine-tuning attacks every caption of each template
        (``testbed:memorized+testbed:template``), with :meth:`FinetuneConfig.testbed_v2` unless ``quick`` (the
        quick demo keeps its short fine-tuning)."""
        finetune = self.finetune_config if quick else FinetuneConfig.testbed_v2()
        return replace(self, finetune_prompts=TEMPLATE_TESTBED_PROMPTS, finetune_config=finetune)

    @classmethod
    def leaderboard(cls, quick: bool = False) -> DemoConfig:
        """The testbed's leaderboard (``dori leaderboard``): every mitigation's rows, utility and the detection
        stage, without the non-memorized groups, the false-positive control, the locality analyses, the
        concept damage and the MR-vs-steps curves (only the final success check of each attack)."""
        base = cls.quick() if quick else cls()
        return replace(base, groups=base.groups[:1], control_targets=(), utility_groups=(), analyses=False,
                       concept_damage=False, table1_curves=False,
                       title="dori leaderboard: mitigations against Dori on the testbed")

    @classmethod
    def paper(cls, memorized: str = "webster-sd1-vm", references: str | None = None, *,
              non_memorized: str = "laion-nonmem", non_memorized_references: str | None = None,
              limit: int | None = None, num_seeds: int = 10, seed: int = 0,
              generation: GenerationConfig | None = None, descriptor: DescriptorConfig | None = None,
              starts: int = 10, analyses: bool = True) -> DemoConfig:
        """The paper's Table 1 and the locality analyses on any model: the memorized prompts (with their
        training images) and, where their images are given too, the non-memorized prompts and Dori aimed
        at them (the false-positive control). No fine-tuning (it needs retain data: ``dori finetune``)."""
        generation = generation or GenerationConfig()
        descriptor = descriptor or DescriptorConfig()
        groups = [DemoGroup("memorized", memorized, num_seeds, limit, "sscd_orig", references)]
        if non_memorized_references is not None:
            groups.append(DemoGroup("non-memorized", non_memorized, num_seeds, limit, "sscd_orig",
                                    non_memorized_references))
        attack = dict(generation=generation, descriptor=descriptor)
        return cls(
            seed=seed, generation=generation, descriptor=descriptor, memorized=memorized, references=references,
            limit=limit, groups=tuple(groups), attack_seeds=num_seeds,
            control_targets=((non_memorized, limit or 40),) if non_memorized_references is not None else (),
            control_references=non_memorized_references, utility_groups=("non-memorized",), testbed_utility=False,
            finetune=False, unlearning=(), wanda_10=None, analyses=analyses,
            robustness=RobustnessConfig(wen=WenConfig(), negatives=((non_memorized, limit or 40),)),
            scatter=ScatterConfig(prompts=memorized, references=references, starts=starts, num_seeds=num_seeds,
                                  reference_prompts=non_memorized, **attack),
            activations=ActivationsConfig(memorized=memorized, max_triggers=starts),
            weights=WeightsConfig(memorized=memorized, max_triggers=min(starts, 6)),
            title=f"dori: memorization of {memorized}",
        )


def _load_images(result: EvaluationResult):
    import torch

    from .images import load_image, to_tensor

    return torch.cat([to_tensor(load_image(result.path / r["image"])) for r in result.records])


def shape_accuracy(results: list[EvaluationResult]) -> float:
    """Share of the shape captions among these runs' records drawn in the right colours."""
    from .testbed.shape_colours import shape_caption_accuracy

    scores, weights = [], []
    for result in results:
        acc = shape_caption_accuracy(_load_images(result), [r["prompt"] for r in result.records])
        n = sum(1 for r in result.records if r["prompt"].endswith(" background"))
        if not math.isnan(acc):
            scores.append(acc * n)
            weights.append(n)
    return float(sum(scores) / sum(weights)) if weights else math.nan


class _Demo:
    """The demo's stages, each a sub-run in the demo's folder (and so resumable on its own)."""

    def __init__(self, pipe, config: DemoConfig, run: RunFolder, progress: Progress | None):
        self.pipe, self.config, self.run, self.progress = pipe, config, run, progress
        self.threshold: float | None = None
        self.kinds = prompt_kinds(pipe, config.memorized)
        """Memorized prompt id -> ``VM`` / ``TM`` where the set labels them (rows get ``mr_by_kind``)."""

    def evaluate(self, name: str, group: DemoGroup, mitigations: tuple[str, ...] = (), pipe=None,
                 union: bool = False) -> EvaluationResult:
        config = EvaluateConfig(prompts=group.prompts, references=group.references, num_seeds=group.num_seeds,
                                seed=self.config.seed, generation=self.config.generation,
                                descriptor=self.config.descriptor, limit=group.limit, mitigations=mitigations,
                                mitigation_union=union)
        return run_evaluate(pipe or self.pipe, config, self.run.path / name, progress=labelled(self.progress, name))

    def attack(self, name: str, prompts: str, limit: int | None, mitigations: tuple[str, ...] = (), *, pipe=None,
               init: str = "prompt", seed: int | None = None, attack: AttackConfig | None = None,
               references: str | None = None, adaptive: bool = True, recipe: str | None = None) -> list[dict]:
        from .attack.recipes import DEFAULT_RECIPE
        from .attack.run import AttackRunConfig, run_attack

        config = AttackRunConfig(prompts=prompts, references=references, limit=limit, init=init,
                                 adaptive=adaptive, recipe=recipe or DEFAULT_RECIPE,
                                 num_seeds=self.config.attack_seeds, seed=self.config.seed if seed is None else seed,
                                 attack=attack or self.config.attack_config, generation=self.config.generation,
                                 descriptor=self.config.descriptor, mitigations=mitigations)
        label = f"attack ({name})"
        return run_attack(pipe or self.pipe, config, self.run.path / f"attack-{name}",
                          progress=labelled(self.progress, label))[1]

    def table2_attack(self) -> AttackConfig:
        """The attack settings of Table 2's rows: the final success check only, unless ``table2_curves``."""
        attack = self.config.attack_config
        return attack if self.config.table2_curves else replace(attack, record_at=(attack.steps,))

    def fit(self, method: str, settings, folder: str) -> Path:
        from .mitigations import MitigateConfig, run_mitigate

        config = MitigateConfig(method, self.config.memorized, references=self.config.references,
                                limit=self.config.limit, settings=to_dict(settings))
        return run_mitigate(self.pipe, config, self.run.path / folder, progress=labelled(self.progress, method)).artefact

    # -- the rows -------------------------------------------------------------------------------------
    def table1_models(self) -> tuple[list[dict], dict[str, Path]]:
        """The unmitigated rows, then NeMo's and Wanda's, with their utility; the mitigations' files."""
        config = self.config
        rows, results = [], {}
        for group in config.groups:
            results[group.name] = self.evaluate(group.name, group)
            self.threshold = results[group.name].summary["threshold"]
            rows.append(summary_row(group.name, results[group.name].records, self.threshold, field=group.score,
                                    kinds=self.kinds))
        utility_groups = [g for g in config.groups if g.name in config.utility_groups]
        if config.testbed_utility:
            rows[0]["utility"] = {"shape_accuracy": shape_accuracy([results[g.name] for g in utility_groups])}
        paths: dict[str, Path] = {}
        if not config.mitigations:
            return rows, paths
        paths["nemo"] = self.fit("nemo", config.nemo, "localize-nemo")
        paths["wanda"] = self.fit("wanda", config.wanda, "prune-wanda")
        if config.wanda_10 is not None:
            paths["wanda-10"] = self.fit("wanda", config.wanda_10, "prune-wanda-10")
        memorized = config.groups[0]
        for name, path in paths.items():
            mitigation = (str(path),)
            row = summary_row(name, self.evaluate(name, memorized, mitigation).records, self.threshold, field="sscd_orig",
                              kinds=self.kinds)
            # utility prompts were not fitted on: every memorized prompt's selection applied together
            others = [self.evaluate(f"{name}-{g.name}", g, mitigation, union=True) for g in utility_groups]
            gen = [r["sscd_gen"] for o in others for r in o.records]
            if gen:
                row["utility"] = {"sscd_gen_mean": float(np.mean(gen)), "sscd_gen_min": float(np.min(gen))}
                if config.testbed_utility:
                    row["utility"] = {"shape_accuracy": shape_accuracy(others), **row["utility"]}
            row["mitigation"] = str(path)
            rows.append(row)
        return rows, paths

    def table1_attacks(self, paths: dict[str, Path]) -> list[dict]:
        """Dori on non-memorized images (the false-positive control) and against NeMo and Wanda."""
        config = self.config
        control = [r for i, (prompts, limit) in enumerate(config.control_targets)
                   for r in self.attack(f"control-{i}", prompts, limit, references=config.control_references)]
        rows = [attack_row("non-memorized+dori", control, self.threshold)] if control else []
        for name in paths:
            curve = config.table1_curves and name != "wanda-10"
            records = self.attack(name, config.memorized, config.limit, (str(paths[name]),), references=config.references,
                                  attack=None if curve else self.table2_attack())
            rows.append(attack_row(f"{name}+dori", records, self.threshold, self.kinds))
        return rows

    def cache_folder(self, kind: str, settings: dict) -> Path:
        """``$DORI_CACHE/<kind>/<model>-<key>-<weights>``: keyed by the settings, where the model is loaded
        from (the run folder's identity) and its weights, so that a rebuilt testbed is never served a stale
        fit."""
        import torch

        from .mitigations.nemo import model_fingerprint
        from .models import model_name, pipeline_location
        from .runs import cache_dir, config_hash

        linears = {n: m for n, m in self.pipe.unet.named_modules() if isinstance(m, torch.nn.Linear)}
        key = config_hash({**settings, "location": pipeline_location(self.pipe)})
        return cache_dir() / kind / f"{model_name(self.pipe)}-{key}-{model_fingerprint(self.pipe, linears)}"

    def finetuned(self):
        """Adversarial fine-tuning of a copy of the model against Dori for ``finetune_prompts`` (cached by
        weights, settings and the prompts it attacks); the copy."""
        import shutil

        from .finetune import adversarial_finetune
        from .prompts import prompts_for

        config = self.config
        ft_config = config.finetune_config
        spec, limit = ((config.finetune_prompts, None) if config.finetune_prompts is not None
                       else (config.memorized, config.limit))
        if config.finetune_cache:
            out = self.cache_folder("finetune", {"finetune": ft_config.to_dict(), "prompts": spec, "limit": limit,
                                                 "references": config.references})
        else:
            out = self.run.path / "finetune"
        ft_pipe = copy.deepcopy(self.pipe)
        attacked = prompts_for(self.pipe, spec, references=config.references, limit=limit)
        result = adversarial_finetune(ft_pipe, attacked, ft_config, out,
                                      progress=labelled(self.progress, "adversarial fine-tuning"))
        (self.run.path / "finetune.json").write_text(json_text({**result.summary, "run": str(result.path)}, indent=1))
        for name in ("losses.png", "losses.pdf"):
            if (result.path / name).exists():
                shutil.copy(result.path / name, self.run.path / f"finetune_{name}")
        return ft_pipe, result

    def table2(self) -> tuple[list[dict], object]:
        """The fine-tuned model's rows: its memorized captions (``adversarial-ft``) and a fresh Dori attack
        (new seeds; prompt and N(0, I) inits; ``adversarial-ft+dori``)."""
        ft_pipe, result = self.finetuned()
        row = summary_row("adversarial-ft", self.evaluate("adversarial-ft", self.config.groups[0], pipe=ft_pipe).records,
                          self.threshold, field="sscd_orig", kinds=self.kinds)
        row["model"] = str(result.pipeline)
        fresh = replace(self.table2_attack(), seed=self.config.fresh_attack_seed)
        records = []
        for init in ("prompt", "random"):
            records += self.attack(f"adversarial-ft-{init}", self.config.memorized, self.config.limit, pipe=ft_pipe,
                                   init=init, seed=self.config.fresh_attack_seed, attack=fresh,
                                   references=self.config.references)
        return [row, attack_row("adversarial-ft+dori", records, self.threshold, self.kinds)], ft_pipe

    def fit_cached(self, method: str, settings) -> Path:
        """A weights mitigation fitted on the memorized captions, taken from ``$DORI_CACHE/<method>`` when the
        same settings were fitted on the same weights before (``finetune_cache``), else fitted in the demo's
        folder and kept there."""
        import shutil

        if not self.config.finetune_cache:
            return self.fit(method, settings, f"fit-{method}")
        cached = self.cache_folder(method, {method: to_dict(settings), "memorized": self.config.memorized,
                                            "limit": self.config.limit, "references": self.config.references})
        artefact = cached / f"{method}.safetensors"
        if not artefact.exists():
            fitted = self.fit(method, settings, f"fit-{method}")
            if self.run.rank != 0:  # the main process fills the cache; the others wait for it
                self.run.barrier()
                return artefact
            cached.parent.mkdir(parents=True, exist_ok=True)
            scratch = cached.with_name(f".{cached.name}.tmp")
            shutil.rmtree(scratch, ignore_errors=True)
            scratch.mkdir()
            for name in (fitted.name, fitted.with_suffix(".json").name):
                shutil.copy(fitted.parent / name, scratch / name)
            if (fitted.parent / "summary.json").exists():  # the fit's cost, for the leaderboard
                shutil.copy(fitted.parent / "summary.json", scratch / f"{method}.summary.json")
            shutil.rmtree(cached, ignore_errors=True)  # an entry without its artefact (a crashed copy)
            scratch.replace(cached)
            self.run.barrier()
        return artefact

    def unlearned(self) -> list[dict]:
        """Table 2's unlearning rows: each method on the memorized captions, then Dori against it."""
        rows = []
        for method in self.config.unlearning:
            name = UNLEARNING[method]
            path = str(self.fit_cached(method, getattr(self.config, method.replace("-", "_"))))
            row = summary_row(name, self.evaluate(name, self.config.groups[0], (path,)).records, self.threshold,
                              field="sscd_orig", kinds=self.kinds)
            row["mitigation"] = path
            records = self.attack(name, self.config.memorized, self.config.limit, (path,),
                                  references=self.config.references, attack=self.table2_attack())
            rows += [row, attack_row(f"{name}+dori", records, self.threshold, self.kinds)]
        return rows

    def utility(self, ft_pipe, rows: list[dict], processes: Processes) -> None:
        """``utility`` per model row: shape-colour accuracy, FID with the original VAE's latents as features,
        and the retain denoising loss (:func:`dori.utility.testbed_utility`). NeMo's per-prompt neurons are
        all blocked together here (the union), a conservative reading of its utility cost.

        Each model's figures are written to ``utility/<name>.json`` as they are done (a resumed demo keeps
        them), the models shared among the processes; ``utility.json`` holds them all."""
        from .mitigations import mitigated
        from .mitigations.base import load_for
        from .utility import testbed_concept, testbed_utility

        by_name = {r["name"]: r for r in rows}
        cases = [("memorized", self.pipe, ())]  # (row, model, saved mitigations: loaded by the process that scores it)
        inference = self.config.robustness.inference if self.config.robustness is not None else ()
        for name in ("nemo", "wanda", "wanda-10", *[UNLEARNING[m] for m in self.config.unlearning], *inference):
            if name in by_name and "mitigation" in by_name[name]:
                cases.append((name, self.pipe, (by_name[name]["mitigation"],)))
        if ft_pipe is not None:
            cases.append(("adversarial-ft", ft_pipe, ()))
        folder = self.run.path / "utility"
        folder.mkdir(exist_ok=True)
        concept = self.config.concept_damage
        baseline = None
        for name, model, mitigations in cases[processes.rank :: processes.world]:
            file = folder / f"{safe_filename(name)}.json"
            if file.exists():
                continue
            if concept and baseline is None:
                # the concept captions' reference set: the unmitigated model's generations with other seeds
                baseline = testbed_concept(self.pipe, seed=self.config.seed + 1000, num_seeds=self.config.concept_seeds)[1]
            with mitigated(model, *[load_for(self.pipe, path) for path in mitigations]):
                values = testbed_utility(model, original_vae=self.pipe.vae, num_images=self.config.utility_images,
                                         seed=self.config.seed)
                if concept:
                    values.update(testbed_concept(model, baseline=baseline, original_vae=self.pipe.vae,
                                                  seed=self.config.seed, num_seeds=self.config.concept_seeds)[0])
            scratch = file.with_name(f".{file.name}.tmp")
            scratch.write_text(json_text(values, indent=1))
            scratch.replace(file)
        processes.barrier()
        table = {}
        for name, _, _ in cases:
            values = json.loads((folder / f"{safe_filename(name)}.json").read_text())
            by_name[name].setdefault("utility", {}).update(values)
            table[name] = values
        if processes.main:
            (self.run.path / "utility.json").write_text(json_text(table, indent=1))

    def analyses(self) -> None:
        """The three locality analyses at the demo's (scaled-down) counts; their figures are copied to the top."""
        import shutil

        from .analysis.activations import run_activations
        from .analysis.scatter import run_scatter
        from .analysis.weights import run_weights

        folder, config = self.run.path, self.config
        scatter_path, _ = run_scatter(self.pipe, config.scatter, folder / "analyze-scatter",
                                      progress=labelled(self.progress, "scatter"))
        triggers = str(scatter_path)
        run_activations(self.pipe, replace(config.activations, triggers=triggers), folder / "analyze-activations",
                        progress=labelled(self.progress, "activations"))
        run_weights(self.pipe, replace(config.weights, triggers=triggers), folder / "analyze-weights",
                    progress=labelled(self.progress, "weights"))
        for name in ("scatter", "activations", "weights"):
            for suffix in (".png", ".pdf"):
                source = folder / f"analyze-{name}" / f"{name}{suffix}"
                if source.exists():
                    shutil.copy(source, folder / f"{name}{suffix}")


def run_demo(pipe=None, config: DemoConfig | None = None, out: str | Path | None = None, *, overwrite: bool = False,
             progress: Progress | None = None) -> tuple[Path, list[dict]]:
    """Run (or resume) the demo on ``pipe`` (default: the shipped testbed); returns the folder and the rows."""
    from .models import load_pipeline, model_name, model_record
    from .prompts import prompts_for, require_references

    config = config or DemoConfig()
    config.validate()
    pipe = pipe if pipe is not None else load_pipeline("testbed")
    # every stage attacks or scores the memorized prompts' training images: refuse a run without them now
    require_references(prompts_for(pipe, config.memorized, references=config.references, limit=config.limit), "the demo")
    if config.finetune and config.finetune_prompts is not None:
        require_references(prompts_for(pipe, config.finetune_prompts, references=config.references),
                           "adversarial fine-tuning (finetune_prompts)")
    out = Path(out) if out is not None else default_run_dir("demo", model_name(pipe))
    processes = Processes(pipe)
    run = processes.open(out, "demo", to_dict(config), model=model_record(pipe), overwrite=overwrite,
                         seeds=[config.seed])
    demo = _Demo(pipe, config, run, progress)
    with run.guard():
        # the evaluations, fits and attacks share their work among processes; the rest is the main one's
        rows, paths = demo.table1_models()
        if config.mitigations and config.attack:
            rows.extend(demo.table1_attacks(paths))
            seen = next((r for r in rows if r["name"] == "seen-once"), None)
            if seen is not None:
                rows.insert(rows.index(seen) + 1, {**seen, "name": "non-memorized"})
        ft_pipe = None
        if config.finetune:
            ft_rows, ft_pipe = demo.table2()
            rows.extend(ft_rows)
        if config.unlearning and config.attack:
            rows.extend(demo.unlearned())
        if config.robustness is not None and config.attack:
            from .robustness import detection_rows, inference_rows

            rows.extend(inference_rows(demo, config.robustness))
            if config.robustness.detection:
                rows.extend(detection_rows(demo, config.robustness))
        if config.finetune and config.testbed_utility:
            demo.utility(ft_pipe, rows, processes)
        with processes.main_only() as main:
            if main:
                _finish(demo, pipe, ft_pipe, rows)
    logger.info("demo written to %s", run.path)
    return run.path, rows


def _finish(demo: _Demo, pipe, ft_pipe, rows: list[dict]) -> None:
    """Utility, the MR figure, the paper's numbers, the analyses, the grid, the summary and the report."""
    config, run = demo.config, demo.run
    if config.robustness is not None and config.robustness.leaderboard and config.attack:
        from .robustness import leaderboard

        leaderboard(demo, rows, config.robustness, ft_pipe)
    _mr_figure(rows, run.path)
    for row in rows:
        if paper.paper_mr(row["name"]) is not None:
            row["paper_mr"] = paper.paper_mr(row["name"])
        if row["name"] in paper.CONCEPT_DAMAGE:
            row["paper_concept"] = paper.CONCEPT_DAMAGE[row["name"]]
    if config.analyses:
        demo.analyses()
    write_grid(run.path, pipe, config)
    run.write_summary(rows)
    run.write_manifest({"status": "done", "threshold": demo.threshold})
    if config.report:
        from .report import write_report

        write_report([run.path], run.path / "report.html", title=config.title)


def _mr_figure(rows: list[dict], folder: Path) -> None:
    if any(len(r.get("mr_by_step", ())) > 1 for r in rows):
        from .analysis.plots import plot_mr_vs_steps

        fig = plot_mr_vs_steps({r["name"]: r["mr_by_step"] for r in rows if len(r.get("mr_by_step", ())) > 1},
                               paper.MR_VS_STEPS)
        fig.savefig(folder / "mr_vs_steps.png")
        fig.savefig(folder / "mr_vs_steps.pdf")


def _thumbnail(image, side: int = 256):
    """A reference image as ``(3, H, W)`` in [0, 1], at most ``side`` pixels on its longer side."""
    import torch.nn.functional as F

    from .images import to_rgb, to_tensor

    x = to_tensor(to_rgb(image))
    scale = side / max(x.shape[-2:])
    if scale < 1:
        x = F.interpolate(x, scale_factor=scale, mode="bilinear", antialias=True, align_corners=False)
    return x[0].clamp(0, 1)


def write_grid(folder: Path, pipe, config: DemoConfig) -> Path:
    """``grid.json`` for the report: per memorized prompt and seed, the training image, the unmitigated,
    mitigated, and mitigated + Dori generations (whichever stages ran)."""
    from .images import save_png
    from .prompts import prompts_for

    memorized = prompts_for(pipe, config.memorized, references=config.references, limit=config.limit)
    (folder / "references").mkdir(exist_ok=True)
    columns = ["reference"]
    cells: dict[tuple[str, int], dict] = {}
    prompts = {r.id: r.prompt for r in memorized.records}
    seeds = list(range(config.seed, config.seed + config.grid_seeds))
    for record in memorized.records:
        name = f"references/{safe_filename(record.id)}.png"
        save_png(_thumbnail(memorized.references[record.id]), folder / name)
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
                              ("wanda+dori", "attack-wanda", "attack"), ("wanda-10", "wanda-10", "eval"),
                              ("wanda-10+dori", "attack-wanda-10", "attack"), ("adversarial-ft", "adversarial-ft", "eval"),
                              ("adversarial-ft+dori", "attack-adversarial-ft-prompt", "attack"),
                              *[column for m in config.unlearning for column in
                                ((UNLEARNING[m], UNLEARNING[m], "eval"),
                                 (f"{UNLEARNING[m]}+dori", f"attack-{UNLEARNING[m]}", "attack"))]):
        from_records(column, folder / sub, evaluated if kind == "eval" else attacked)
    rows = [{"prompt_id": pid, "prompt": prompts[pid], "seed": seed, "cells": value}
            for (pid, seed), value in cells.items()]
    path = folder / "grid.json"
    path.write_text(json_text({"columns": columns, "rows": rows}, indent=1))
    return path
