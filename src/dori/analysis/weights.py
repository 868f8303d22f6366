"""Locality analysis C (the paper's section 2.4): do NeMo and Wanda localise the same weights for one image?

Each method's own localisation runs once per embedding: every trigger of one image (Y_adv), every
memorized prompt (Y_mem), and the image's original prompt. Sets (the paper says "per-layer IoU" of the
selected weights; these are the natural sets of each method): NeMo =
the refined neuron indices per value layer (from its own memorization test and search); Wanda = the
masked ``(row, col)`` weight positions per ``ff.net.2`` layer after the union over the first
``timesteps`` steps, with the single embedding as the target and the empty prompt as the base.

Weight agreement per layer = mean pairwise IoU (1 when both sets are empty, the paper's convention;
layers where the method selected nothing are flagged, because their IoU is 1 by definition):

* ``Y_adv``: among the triggers; ``Y_adv vs original``: each trigger's set against the original
  prompt's; ``Y_mem``: among the different memorized prompts.

Each localisation is a record written as it finishes (Wanda's masks in ``masks/``), so a rerun
resumes. Run folder: ``manifest.json``, records, ``masks/``, ``table.parquet``, ``summary.json``,
``weights.png`` / ``.pdf``.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from .. import paper
from ..errors import DoriError
from ..mitigations.nemo import NeMoConfig, PromptLocalization
from ..mitigations.wanda import WandaConfig
from ..progress import Progress
from .common import (
    analysis_layers,
    save_figure,
    scaled_note,
    short_name,
)
from .metrics import PairStats, iou_to_reference, pairwise_iou

logger = logging.getLogger(__name__)

METHODS = ("nemo", "wanda")
COMPARISONS = ("Y_mem", "Y_adv", "Y_adv vs original")


@dataclass(frozen=True)
class WeightsConfig:
    """Analysis C's settings; defaults are the paper's counts and each method's own defaults.

    ``triggers`` / ``prompt_id`` / ``successful_only``: as :class:`ActivationsConfig`. ``nemo``: NeMo's
    search (its ``layers`` pick the value layers, its ``statistics`` the non-memorized prompts);
    ``wanda``: Wanda's scoring (sparsity, timesteps, sampler; its ``layers`` field is not used:
    ``ffn_layers``, default the ``ff.net.2`` of NeMo's transformer blocks, picks the layers).
    """

    triggers: str = ""
    prompt_id: str | None = None
    successful_only: bool = True
    max_triggers: int = paper.STARTS
    memorized: str = "testbed:memorized"
    max_memorized: int = paper.MEMORIZED
    methods: tuple[str, ...] = METHODS
    nemo: NeMoConfig = field(default_factory=NeMoConfig)
    wanda: WandaConfig = field(default_factory=WandaConfig)
    ffn_layers: tuple[str, ...] | None = None

    def validate(self) -> None:
        if not self.triggers:
            raise DoriError("triggers: give the run folder of a `dori analyze scatter` or `dori attack` run")
        if not Path(self.triggers).is_dir():
            raise DoriError(f"triggers: {self.triggers} is not a folder (give a scatter or attack run folder)")
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown or not self.methods:
            raise DoriError(f"methods: choose from {', '.join(METHODS)}, got {', '.join(self.methods) or 'none'}")
        if self.max_triggers < 2 or self.max_memorized < 2:
            raise DoriError("max_triggers, max_memorized: an agreement needs at least 2 sets")
        self.nemo.validate()
        self.wanda.validate()

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Item:
    """One embedding to localise: its set (``Y_adv``, ``Y_mem`` or ``original``) and label."""

    set: str
    label: str
    index: int

    @property
    def name(self) -> str:
        return f"{self.set}|{self.label}"

    def key(self, method: str) -> str:
        return f"{method}|{self.name}"


def _localization_from_record(record: dict) -> PromptLocalization:
    fields = {k: record[k] for k in PromptLocalization.__dataclass_fields__ if k in record}
    fields["prompt"] = record["name"]
    fields["initial"] = json.loads(record["initial"])
    fields["refined"] = json.loads(record["refined"])
    return PromptLocalization(**fields)


def _mask_file(run_path: Path, key: str) -> Path:
    return run_path / "masks" / f"wanda-{hashlib.sha256(key.encode()).hexdigest()[:16]}.safetensors"


def localize_nemo(pipe, run, items: list[Item], embeds: torch.Tensor, config: NeMoConfig, statistics: list[str],
                  progress: Progress | None = None) -> dict[str, dict[str, list[int]]]:
    """NeMo's selection ``{item name: {layer: neuron indices}}`` per embedding (resuming from the run's records)."""
    from ..mitigations.nemo import NeMo

    done = {r["name"]: _localization_from_record(r) for r in run.records() if r.get("method") == "nemo"}
    by_name = {it.name: it for it in items}
    count = {"n": len(done)}

    def on_result(result: PromptLocalization) -> None:
        item = by_name[result.prompt]
        record = {k: v for k, v in asdict(result).items() if k not in ("prompt", "initial", "refined")}
        run.append([{"key": item.key("nemo"), "method": "nemo", "set": item.set, "label": item.label,
                     "name": item.name, **record, "initial": json.dumps(result.initial),
                     "refined": json.dumps(result.refined), "n_selected": result.n_neurons(config.refine)}])
        count["n"] += 1
        if progress:
            progress("NeMo localisation", count["n"], len(items))

    if progress:
        progress("NeMo localisation", count["n"], len(items))
    nemo = NeMo.localize(pipe, [it.name for it in items], replace(config, scope="per-prompt"),
                         statistics_prompts=statistics, done=done, on_result=on_result,
                         prompt_embeds=embeds[[it.index for it in items]])
    return {it.name: nemo.selection(it.name) for it in items}


def localize_wanda(pipe, run, items: list[Item], embeds: torch.Tensor, layers: dict[str, torch.nn.Linear],
                   config: WandaConfig, progress: Progress | None = None) -> dict[str, dict[str, torch.Tensor]]:
    """Wanda's selection ``{item name: {layer: flat indices row * d_in + col}}`` per embedding (single-embedding target, empty
    base prompt), saved under ``masks/`` as each finishes (resuming from the run's records)."""
    from safetensors.torch import load_file, save_file

    from ..mitigations.wanda import input_norms, wanda_masks

    (run.path / "masks").mkdir(exist_ok=True)
    done = {r["key"] for r in run.records() if r.get("method") == "wanda"}
    todo = [it for it in items if it.key("wanda") not in done]
    if progress:
        progress("Wanda scoring", len(items) - len(todo), len(items))
    if todo:
        base = input_norms(pipe, layers, [config.base_prompt], config)
    for k, item in enumerate(todo, start=1):
        target = input_norms(pipe, layers, None, config, prompt_embeds=embeds[item.index : item.index + 1])
        masks = {name: wanda_masks(layer.weight, target[name], base[name], config.sparsity, config.timesteps, config.keep)
                 for name, layer in layers.items()}
        path = _mask_file(run.path, item.key("wanda"))
        save_file({name: m.to(torch.uint8).contiguous() for name, m in masks.items()}, str(path),
                  metadata={"key": item.key("wanda")})
        run.append([{"key": item.key("wanda"), "method": "wanda", "set": item.set, "label": item.label,
                     "name": item.name, "file": path.name, "n_selected": int(sum(int(m.sum()) for m in masks.values())),
                     "per_layer": json.dumps({name: int(m.sum()) for name, m in masks.items()})}])
        if progress:
            progress("Wanda scoring", len(items) - len(todo) + k, len(items))
    return {it.name: {name: np.flatnonzero(m.numpy()) for name, m in load_file(str(_mask_file(run.path, it.key("wanda")))).items()}
            for it in items}


def agreement_rows(method: str, layers: list[str], widths: dict[str, int], sets: dict[str, dict[str, object]],
                   adv: list[str], mem: list[str], original: str) -> list[dict]:
    """Per layer and comparison: mean/std of the pairwise IoUs, and how many of the sets are empty.

    ``sets``: ``{item name: {layer: indices}}`` (lists or integer arrays of distinct indices); ``adv`` /
    ``mem``: item names of the triggers and of the memorized prompts; ``original``: the original
    prompt's item name.
    """
    rows = []
    for k, layer in enumerate(layers, start=1):
        for comparison in COMPARISONS:
            if comparison == "Y_mem":
                members = mem
                values = pairwise_iou([sets[m][layer] for m in members])
                both_empty = _both_empty([len(sets[m][layer]) for m in members])
            elif comparison == "Y_adv":
                members = adv
                values = pairwise_iou([sets[m][layer] for m in members])
                both_empty = _both_empty([len(sets[m][layer]) for m in members])
            else:
                members = [*adv, original]
                values = iou_to_reference([sets[m][layer] for m in adv], sets[original][layer])
                both_empty = sum(len(sets[m][layer]) == 0 for m in adv) if len(sets[original][layer]) == 0 else 0
            sizes = [len(sets[m][layer]) for m in members]
            stats = PairStats.of(values, len(members))
            rows.append({"method": method, "layer_id": k, "layer": layer, "short": short_name(layer),
                         "width": widths[layer], "comparison": comparison, "n_sets": len(members),
                         "n_pairs": stats.n_pairs, "iou_mean": stats.mean, "iou_std": stats.std,
                         "iou_median": stats.median, "empty_sets": int(sum(s == 0 for s in sizes)),
                         "both_empty_pairs": int(both_empty), "all_empty": bool(all(s == 0 for s in sizes)),
                         "mean_selected": float(np.mean(sizes))})
    return rows


def _both_empty(sizes: list[int]) -> int:
    empty = sum(s == 0 for s in sizes)
    return empty * (empty - 1) // 2


def _method_summary(table, method: str) -> dict:
    part = table[table.method == method]
    out: dict = {}
    for comparison in COMPARISONS:
        rows = part[part.comparison == comparison]
        effective = rows[~rows.all_empty]
        out[comparison] = {
            "iou_by_layer": dict(zip(rows.layer, (float(v) for v in rows.iou_mean), strict=True)),
            "iou_mean_all_layers": float(rows.iou_mean.mean()),
            "iou_mean_selecting_layers": float(effective.iou_mean.mean()) if len(effective) else float("nan"),
            "layers_with_nothing_selected": list(rows[rows.all_empty].layer),
            "layers_with_some_empty_sets": list(rows[(rows.empty_sets > 0) & ~rows.all_empty].layer),
        }
    adv = part[part.comparison == "Y_adv"]
    out["mean_selected_per_layer_Y_adv"] = dict(zip(adv.layer, (float(v) for v in adv.mean_selected), strict=True))
    sel = out["Y_adv"]["iou_mean_selecting_layers"]
    out["clearly_below_1"] = bool(np.isfinite(sel) and sel < 0.9)
    return out


def _items(pipe, adv, mem_ids, mem) -> tuple[list[Item], torch.Tensor, str]:
    """Every embedding to localise (triggers, memorized prompts, the original prompt unless it is one of
    them), their embeddings ``(n, tokens, dim)`` and the original prompt's item name."""
    items = [Item("Y_adv", key, i) for i, key in enumerate(adv.keys)]
    items += [Item("Y_mem", pid, len(adv) + i) for i, pid in enumerate(mem_ids)]
    embeds = torch.cat([adv.triggers, mem])
    if adv.prompt_id in mem_ids:
        return items, embeds, f"Y_mem|{adv.prompt_id}"
    from ..models import encode_prompts

    items.append(Item("original", adv.prompt_id, len(embeds)))
    embeds = torch.cat([embeds, encode_prompts(pipe, [adv.prompt]).float().cpu()])
    return items, embeds, f"original|{adv.prompt_id}"


def run_weights(pipe, config: WeightsConfig, out: str | Path | None = None, *, overwrite: bool = False,
                progress: Progress | None = None) -> tuple[Path, dict]:
    """Run analysis C; returns the run folder and the summary. A rerun resumes the localisations."""
    from ..config_files import to_dict
    from ..models import model_name, model_record
    from ..runs import RunFolder, default_run_dir
    from .triggers import analysis_inputs

    config.validate()
    adv, mem_ids, _, mem = analysis_inputs(pipe, config)
    values, ffns = analysis_layers(pipe.unet, config.nemo.layers, config.ffn_layers)
    items, embeds, original = _items(pipe, adv, mem_ids, mem)
    out = Path(out) if out is not None else default_run_dir("analyze-weights", model_name(pipe))
    run = RunFolder(out, "analyze-weights", to_dict(config), model=model_record(pipe),
                    resolved={"trigger_run": str(adv.run), "trigger_keys": adv.keys, "value_layers": list(values),
                              "ffn_layers": list(ffns)}, overwrite=overwrite)
    with run.guard():
        summary = _agreement(pipe, config, run, adv, mem_ids, items, embeds, original, values, ffns, progress)
        run.finalize(summary)
    return run.path, summary


def _agreement(pipe, config: WeightsConfig, run, adv, mem_ids, items, embeds, original, values, ffns, progress) -> dict:
    """Each method's localisation per embedding, their IoU table, figure and summary."""
    import pandas as pd

    from ..mitigations.nemo import statistics_prompts

    adv_names = [it.name for it in items if it.set == "Y_adv"]
    mem_names = [it.name for it in items if it.set == "Y_mem"]
    rows, selected = [], {}
    if "nemo" in config.methods:
        sel = localize_nemo(pipe, run, items, embeds, config.nemo, statistics_prompts(config.nemo.statistics, pipe),
                            progress)
        sets = {name: {layer: s.get(layer, []) for layer in values} for name, s in sel.items()}
        rows += agreement_rows("nemo", list(values), {n: m.out_features for n, m in values.items()}, sets,
                               adv_names, mem_names, original)
        selected["nemo"] = {"memorized_test_passed": {
            s: int(sum(r["memorized"] for r in run.records() if r.get("method") == "nemo" and r["set"] == s))
            for s in ("Y_adv", "Y_mem")}}
    if "wanda" in config.methods:
        masks = localize_wanda(pipe, run, items, embeds, ffns, replace(config.wanda, layers=tuple(ffns)), progress)
        rows += agreement_rows("wanda", list(ffns), {n: m.weight.numel() for n, m in ffns.items()}, masks,
                               adv_names, mem_names, original)
    table = pd.DataFrame.from_records(rows)
    table.to_parquet(run.path / "table.parquet", index=False)

    methods = {m: {**_method_summary(table, m), **selected.get(m, {})} for m in config.methods}
    summary = {
        "analysis": "weights (section 2.4)",
        "prompt_id": adv.prompt_id, "prompt": adv.prompt, "original_set": original,
        "n_adv": len(adv), "n_adv_available": adv.n_available, "n_adv_succeeded": adv.n_succeeded,
        "successful_only": config.successful_only, "n_mem": len(mem_ids), "memorized": config.memorized,
        "methods": methods,
        "iou_convention": "IoU = 1 when both sets are empty; layers where every set is empty are listed under "
                          "layers_with_nothing_selected (IoU 1 by definition)",
        "paper": {"n_adv": paper.STARTS, "n_mem": paper.MEMORIZED,
                  "finding": "Wanda IoU < 0.6 in most layers; NeMo near 1 only where it selects nothing, "
                             "about 0.6 in its effective layer"},
        "error_bars": "std of the pairwise IoUs (spread over pairs, not a standard error)",
        "note": scaled_note([("Y_adv triggers", len(adv), paper.STARTS), ("Y_mem prompts", len(mem_ids), paper.MEMORIZED)])
                + f"; Y_mem = the first {len(mem_ids)} prompts of {config.memorized}; NeMo {config.nemo.num_seeds} seeds, "
                f"Wanda sparsity {config.wanda.sparsity} over the first {config.wanda.timesteps} of "
                f"{config.wanda.num_inference_steps} steps",
    }
    from .plots import plot_weight_agreement

    save_figure(plot_weight_agreement(table, summary), run.path, "weights")
    return summary
