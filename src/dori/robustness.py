"""Every mitigation against Dori in one table: the inference-time mitigations with the non-adaptive and the
adaptive attack, detection under attack, and the leaderboard that the demo and ``dori leaderboard`` write.

Stages (each a sub-run of the demo's folder, so resumable; see :mod:`dori.demo`):

* :func:`inference_rows`: Wen et al.'s embedding adjustment, Ren et al.'s cross-attention re-scaling and
  random token addition (:mod:`dori.mitigations.wen`, ``ren``, ``random_tokens``), each fitted on the
  memorized captions, with rows ``<method>`` (MR), ``<method>+dori`` (the attack optimised without the
  mitigation, its images generated with it) and ``<method>+dori-adaptive`` (optimised through it);
* :func:`detection_rows`: Dori against the unmitigated model (``dori``) and the detection-aware recipe
  (``dori-low-noise-norm``), then the noise-norm and NeMo detectors scored on memorized captions, on both
  kinds of trigger and on non-memorized captions (``detection.json``: AUC and TPR at 1% FPR);
* :func:`leaderboard`: one row per mitigation (MR, MR + Dori non-adaptive and adaptive, the noise-norm
  detector's AUC on that row's triggers, utility, cost), written as ``leaderboard.json`` and
  ``leaderboard.parquet``; :func:`merge_leaderboards` joins files from several models and machines.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from .config_files import to_dict
from .errors import DoriError
from .mitigations.random_tokens import RandomTokensConfig
from .mitigations.ren import RenConfig
from .mitigations.wen import WenConfig

INFERENCE = ("wen", "ren", "random-tokens")
FORMAT = 1
"""Version of ``leaderboard.json``."""
COLUMNS = ("model", "method", "kind", "mr", "mr_dori", "mr_dori_adaptive", "trigger_auc", "shape_accuracy", "fid",
           "fit_seconds", "fit_unet_evaluations", "generate_seconds_per_image", "unet_evaluations_per_image",
           "machine", "created")


@dataclass(frozen=True)
class RobustnessConfig:
    """The leaderboard's extra stages. ``negatives``: non-memorized prompt sets (and how many of each)
    the detectors score as the negative class; ``detection_seeds``: seeds per embedding of the noise-norm
    detector (Wen et al. use 4 generations)."""

    inference: tuple[str, ...] = INFERENCE
    wen: WenConfig = field(default_factory=WenConfig.testbed)
    ren: RenConfig = field(default_factory=RenConfig)
    random_tokens: RandomTokensConfig = field(default_factory=RandomTokensConfig)
    detection: bool = True
    negatives: tuple[tuple[str, int], ...] = (("testbed:seen-once", 24), ("testbed:held-out", 24))
    detection_seeds: int = 4
    leaderboard: bool = True

    def validate(self) -> None:
        unknown = [m for m in self.inference if m not in INFERENCE]
        if unknown:
            raise DoriError(f"inference: {unknown[0]!r} is not one of {', '.join(INFERENCE)}")
        if self.detection_seeds < 1:
            raise DoriError(f"detection_seeds: must be >= 1, got {self.detection_seeds}")
        self.wen.validate()
        self.ren.validate()
        self.random_tokens.validate()

    def settings(self, method: str):
        return getattr(self, method.replace("-", "_"))

    def to_dict(self) -> dict:
        return asdict(self)


# -- the inference-time mitigations ------------------------------------------------------------------------
def inference_rows(demo, config: RobustnessConfig) -> list[dict]:
    """Rows ``<m>``, ``<m>+dori`` and ``<m>+dori-adaptive`` for each inference-time mitigation ``m``."""
    from .memorization import attack_row, summary_row

    rows = []
    memorized = demo.config.groups[0]
    for method in config.inference:
        path = str(demo.fit(method, config.settings(method), f"fit-{method}"))
        row = summary_row(method, demo.evaluate(method, memorized, (path,)).records, demo.threshold, field="sscd_orig",
                          kinds=demo.kinds)
        row["mitigation"] = path
        rows.append(row)
        for adaptive in (False, True):
            name = f"{method}+dori" + ("-adaptive" if adaptive else "")
            records = demo.attack(name.replace("+", "-"), demo.config.memorized, demo.config.limit, (path,),
                                  references=demo.config.references, attack=demo.table2_attack(), adaptive=adaptive)
            rows.append({**attack_row(name, records, demo.threshold, demo.kinds), "adaptive": adaptive})
    return rows


# -- detection under attack ----------------------------------------------------------------------------------
def _triggers(folder: Path):
    from .attack.run import load_triggers

    triggers = load_triggers(folder)
    return [triggers[k] for k in sorted(triggers)]


def detection_rows(demo, config: RobustnessConfig) -> list[dict]:
    """Dori on the unmitigated model (``dori``) and the detection-aware recipe (``dori-low-noise-norm``), then
    both detectors on memorized captions, the two kinds of trigger and the non-memorized captions."""
    import torch

    from .detection import DETECTORS, detector_scores, separation
    from .memorization import attack_row
    from .models import encode_prompts
    from .prompts import prompts_for

    cfg, pipe, threshold = demo.config, demo.pipe, demo.threshold
    rows = []
    records = {}
    for name, recipe in (("dori", None), ("dori-low-noise-norm", "dori_low_noise_norm")):
        records[name] = demo.attack(name, cfg.memorized, cfg.limit, references=cfg.references,
                                    attack=demo.table2_attack(), recipe=recipe)
        rows.append(attack_row(name, records[name], threshold, demo.kinds))
    memorized = prompts_for(pipe, cfg.memorized, references=cfg.references, limit=cfg.limit)
    negatives = [r.prompt for spec, n in config.negatives for r in prompts_for(pipe, spec, limit=n).records]
    if not negatives:
        raise DoriError("negatives: the detectors need non-memorized prompts")
    groups = {
        "memorized": encode_prompts(pipe, [r.prompt for r in memorized.records]),
        "dori": torch.stack(_triggers(demo.run.path / "attack-dori")),
        "dori-low-noise-norm": torch.stack(_triggers(demo.run.path / "attack-dori-low-noise-norm")),
        "non-memorized": encode_prompts(pipe, negatives),
    }
    seeds = list(range(cfg.seed, cfg.seed + config.detection_seeds))
    scores = {d: {g: detector_scores(d, pipe, y, seeds).tolist() for g, y in groups.items()} for d in DETECTORS}
    table = [separation(d, g, scores[d][g], "non-memorized", scores[d]["non-memorized"]).to_dict()
             for d in DETECTORS for g in ("memorized", "dori", "dori-low-noise-norm")]
    mr = {name: attack_row(name, recs, threshold)["mr"] for name, recs in records.items()}
    (demo.run.path / "detection.json").write_text(json.dumps({"separations": table, "scores": scores, "mr": mr,
                                                              "negatives": [list(n) for n in config.negatives],
                                                              "seeds": seeds}, indent=1))
    return rows


# -- the leaderboard ----------------------------------------------------------------------------------------
def _fit_cost(mitigation: str | None, finetune: Path | None = None) -> dict:
    """``fit_seconds`` and ``fit_unet_evaluations`` from the fit's ``summary.json`` (beside the artefact), or
    from the demo's ``finetune.json`` for adversarial fine-tuning, if any."""
    if finetune is not None and finetune.is_file():
        data = json.loads(finetune.read_text())
        return {"fit_seconds": data.get("seconds"), "fit_unet_evaluations": data.get("unet_evaluations")}
    if not mitigation:
        return {}
    path = Path(mitigation)
    for candidate in (path.parent / "summary.json", path.with_suffix(".summary.json")):
        if candidate.is_file():
            data = json.loads(candidate.read_text())
            data = data.get("summary", data)
            return {k: data.get(k) for k in ("fit_seconds", "fit_unet_evaluations")}
    return {}


def generation_cost(pipe, mitigation=None, prompts: list[str] | None = None, steps: int = 25) -> dict:
    """Seconds and UNet evaluations (samples through the UNet, the mitigation's own included) per image of
    ``prompts`` (one seed each) with ``mitigation`` applied."""
    from .generation import GenerationConfig, generate
    from .hooks import counting_calls
    from .mitigations import mitigated

    prompts = prompts or ["a photo"]
    extra = getattr(mitigation, "unet_calls", None)
    with mitigated(pipe, *([mitigation] if mitigation is not None else [])), counting_calls(pipe.unet) as counter:
        t0 = time.perf_counter()
        generate(pipe, list(range(len(prompts))), prompts, config=GenerationConfig(num_inference_steps=steps))
        seconds = time.perf_counter() - t0
    inner = (getattr(mitigation, "unet_calls", 0) - extra) if extra is not None else 0
    return {"generate_seconds_per_image": seconds / len(prompts),
            "unet_evaluations_per_image": (counter.samples + inner) / len(prompts)}


def trigger_auc(pipe, triggers, negatives, mitigation=None, seeds: list[int] | None = None) -> float:
    """The noise-norm detector's AUC, on the deployed model (the mitigation applied), for ``triggers``
    against the ``negatives`` embeddings."""
    import torch

    from .detection import noise_norm_scores, roc_auc
    from .mitigations import mitigated

    seeds = seeds or [0, 1, 2, 3]
    with mitigated(pipe, *([mitigation] if mitigation is not None else [])):
        pos = noise_norm_scores(pipe, torch.stack(list(triggers)), seeds)
        neg = noise_norm_scores(pipe, negatives, seeds)
    return roc_auc(pos.numpy(), neg.numpy())


MITIGATION_ROWS = ("nemo", "wanda", "wanda-10", "esd", "ca", "siss", "adversarial-ft", *INFERENCE)
"""The demo's model rows that become leaderboard rows, in order."""


def leaderboard(demo, rows: list[dict], config: RobustnessConfig, ft_pipe=None) -> list[dict]:
    """One entry per mitigation that the demo ran, from its rows and attack folders; written to
    ``leaderboard.json`` and ``leaderboard.parquet`` in the demo's folder."""
    import datetime as _dt

    from .mitigations.base import load_for
    from .models import encode_prompts, model_name
    from .prompts import prompts_for

    pipe, folder = demo.pipe, demo.run.path
    by_name = {r["name"]: r for r in rows}
    negatives = encode_prompts(pipe, [r.prompt for spec, n in config.negatives
                                      for r in prompts_for(pipe, spec, limit=n).records])
    captions = [r.prompt for r in prompts_for(pipe, demo.config.memorized, references=demo.config.references,
                                              limit=demo.config.limit).records]
    created = _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")
    machine = _machine()
    entries = []
    names = ["none"] + [n for n in MITIGATION_ROWS if n in by_name]
    for name in names:
        model = ft_pipe if name == "adversarial-ft" else pipe
        if model is None:
            continue
        row = by_name.get("memorized" if name == "none" else name, {})
        mitigation_path = row.get("mitigation") if name != "none" else None
        mitigation = load_for(pipe, mitigation_path) if mitigation_path else None
        # the fine-tuned model is a pipeline of its own, not a mitigation file: its weights changed
        kind = "none" if name == "none" else mitigation.kind if mitigation is not None else "weights"
        attack_folders = {"none": ["attack-dori"], "adversarial-ft": ["attack-adversarial-ft-prompt",
                                                                     "attack-adversarial-ft-random"]}.get(name)
        if attack_folders is None:
            attack_folders = [f"attack-{name}-dori-adaptive"] if kind == "inference" else [f"attack-{name}"]
        triggers = [t for f in attack_folders if (folder / f / "triggers.safetensors").exists()
                    for t in _triggers(folder / f)]
        dori = by_name.get("dori" if name == "none" else f"{name}+dori", {})
        adaptive = by_name.get(f"{name}+dori-adaptive", dori)
        utility = row.get("utility", {}) if name != "none" else by_name.get("memorized", {}).get("utility", {})
        entry = {
            "model": model_name(pipe), "method": name, "kind": kind,
            "mr": row.get("mr"), "mr_dori": dori.get("mr"), "mr_dori_adaptive": adaptive.get("mr"),
            "trigger_auc": trigger_auc(model, triggers, negatives, mitigation) if triggers else None,
            "shape_accuracy": utility.get("shape_accuracy"), "fid": utility.get("fid_vae", utility.get("fid")),
            "fit_seconds": None, "fit_unet_evaluations": None,
            **_fit_cost(mitigation_path, folder / "finetune.json" if name == "adversarial-ft" else None),
            **generation_cost(model, mitigation, captions), "machine": machine, "created": created,
        }
        entries.append(entry)
    write_leaderboard(folder, entries, {"model": model_name(pipe), "robustness": to_dict(config)})
    return entries


def _machine() -> str:
    import os
    import platform

    import torch

    return f"{platform.machine()} {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads"


def write_leaderboard(folder: Path, entries: list[dict], meta: dict) -> Path:
    """``leaderboard.json`` (``{"format", "meta", "rows"}``) and ``leaderboard.parquet`` (the rows)."""
    import pandas as pd

    folder = Path(folder)
    path = folder / "leaderboard.json"
    path.write_text(json.dumps({"format": FORMAT, "meta": meta, "rows": entries}, indent=1))
    pd.DataFrame(entries, columns=list(COLUMNS)).to_parquet(folder / "leaderboard.parquet", index=False)
    return path


def read_leaderboard(path: str | Path) -> list[dict]:
    """The rows of a ``leaderboard.json`` or ``leaderboard.parquet`` (or of a folder holding one)."""
    import pandas as pd

    path = Path(path)
    if path.is_dir():
        path = path / "leaderboard.json"
    if not path.is_file():
        raise DoriError(f"leaderboard: {path} does not exist")
    if path.suffix == ".parquet":
        return pd.read_parquet(path).replace({np.nan: None}).to_dict("records")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DoriError(f"leaderboard: {path} is not JSON ({exc})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(data.get("rows"), list):
        raise DoriError(f"leaderboard: {path} is not a leaderboard.json of format {FORMAT}")
    return data["rows"]


def merge_leaderboards(paths: list[str | Path]):
    """One table (a pandas DataFrame, :data:`COLUMNS`) of the rows of several leaderboard files; a row seen in
    two files (same model, method, machine and time) is kept once."""
    import pandas as pd

    if not paths:
        raise DoriError("leaderboard: give at least one leaderboard file to merge")
    rows = [r for p in paths for r in read_leaderboard(p)]
    frame = pd.DataFrame(rows, columns=list(COLUMNS))
    return frame.drop_duplicates(subset=["model", "method", "machine", "created"]).reset_index(drop=True)
