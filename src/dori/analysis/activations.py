"""Locality analysis B (the paper's section 2.3): activation discrepancy in the layers where NeMo and Wanda act.

Two embedding sets: Y_adv, the triggers of ONE memorized image (from a scatter or attack run), and
Y_mem, the embeddings of different memorized prompts. Per layer, each embedding's activation vector
is the statistic the method scores (the paper's "activation vector" is not defined further):

* ``statistic="scored"`` (default): the statistic each method scores.

  * NeMo (``attn2.to_v`` of the down and mid blocks): the token-mean of ``|to_v(y)|`` per neuron;
    ``to_v`` sees only the text embedding, so no UNet pass is needed.
  * Wanda (``ff.net.2`` of the same transformer blocks): the per-input-channel L2 norm of the layer
    input with each row (spatial position) L2-normalised, at the first denoising step, from one fixed
    initial noise for every embedding.

* ``statistic="raw"``: the whole activation map, flattened: ``to_v(y)`` (tokens x neurons) and the
  ``ff.net.2`` input (positions x channels) at that first step. The magnitudes in the paper's figure
  (100-500 for layers of 320-1280 neurons; docs/analyses.md) are those of distances between whole
  maps rather than between token-means, so this is the other reading of the paper. Maps larger than
  ``raw_max_features`` are compared on a fixed random subset of their coordinates, the distances
  rescaled to the full size (an unbiased estimate of the squared distance).

Discrepancy = mean pairwise L2 distance among a set's activation vectors; the error bar is the std
of the pairwise distances. The paper: Y_adv (one image) is as spread as Y_mem (different images).

Run folder: ``manifest.json``, ``table.parquet`` (method, layer, set, mean/std/median, members,
pairs), ``activations.safetensors`` (every vector), ``summary.json``, ``activations.png`` / ``.pdf``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from .. import paper
from ..errors import DoriError
from ..mitigations.nemo import NeMoConfig
from ..progress import Progress
from .attention import MEASURES, AttentionRecorder, cross_attention_layers
from .common import (
    analysis_layers,
    first_step_pass,
    save_figure,
    scaled_note,
    short_name,
)
from .metrics import discrepancy

logger = logging.getLogger(__name__)

METHODS = ("nemo", "wanda")
STATISTICS = ("scored", "raw")


@dataclass(frozen=True)
class ActivationsConfig:
    """Analysis B's settings; defaults are the paper's counts (100 triggers, 100 memorized prompts).

    ``triggers``: a scatter or attack run folder; ``prompt_id``: which image's triggers (default the
    run's first); ``successful_only``: only triggers that replicated (the paper's Y_adv). ``seed``:
    the one initial noise for Wanda's first denoising step of a ``num_inference_steps`` schedule.
    ``ffn_layers`` (None): the ``ff.net.2`` of the transformer blocks of ``value_layers``.
    ``control_starts``: also measure Y_0, the same triggers' start embeddings (not in the paper): how
    much of Y_adv's spread the starts already had. ``statistic``: ``scored`` or ``raw`` (the module
    docstring); ``raw_max_features``: the most coordinates of a raw map compared per layer.
    ``attention``: also record, per set, where the cross-attention of the value layers' blocks looks
    (:mod:`dori.analysis.attention`: the share on the first token, the effective number of tokens).
    """

    triggers: str = ""
    prompt_id: str | None = None
    successful_only: bool = True
    max_triggers: int = paper.STARTS
    memorized: str = "testbed:memorized"
    max_memorized: int = paper.MEMORIZED
    seed: int = 0
    num_inference_steps: int = 50
    value_layers: tuple[str, ...] = field(default_factory=lambda: NeMoConfig().layers)
    ffn_layers: tuple[str, ...] | None = None
    batch_size: int = 16
    control_starts: bool = True
    statistic: str = "scored"
    raw_max_features: int = 65536
    attention: bool = True

    def validate(self) -> None:
        if self.statistic not in STATISTICS:
            raise DoriError(f"statistic: must be one of {', '.join(STATISTICS)}, got {self.statistic!r}")
        if self.raw_max_features < 1:
            raise DoriError(f"raw_max_features: must be >= 1, got {self.raw_max_features}")
        if not self.triggers:
            raise DoriError("triggers: give the run folder of a `dori analyze scatter` or `dori attack` run")
        if not Path(self.triggers).is_dir():
            raise DoriError(f"triggers: {self.triggers} is not a folder (give a scatter or attack run folder)")
        if self.max_triggers < 2 or self.max_memorized < 2:
            raise DoriError("max_triggers, max_memorized: a discrepancy needs at least 2 members per set")
        if self.num_inference_steps < 1 or self.batch_size < 1:
            raise DoriError("num_inference_steps, batch_size: must be >= 1")

    def to_dict(self) -> dict:
        return asdict(self)


def nemo_statistic(layers: dict[str, torch.nn.Linear], embeds: torch.Tensor, batch_size: int = 64) -> dict[str, torch.Tensor]:
    """NeMo's neuron activation (token-mean ``|to_v(y)|``) per layer, ``(n, channels)``."""
    from ..mitigations.nemo import neuron_activations

    device = next(iter(layers.values())).weight.device
    parts = [neuron_activations(layers, embeds[i : i + batch_size].to(device)) for i in range(0, len(embeds), batch_size)]
    return {name: torch.cat([p[name] for p in parts]) for name in layers}


def wanda_statistic(pipe, layers: dict[str, torch.nn.Linear], embeds: torch.Tensor, *, seed: int = 0,
                    num_inference_steps: int = 50, batch_size: int = 16,
                    also: tuple[Callable, ...] = ()) -> dict[str, torch.Tensor]:
    """Wanda's input statistic per layer at the first denoising step, ``(n, d_in)``.

    Every embedding ``(n, tokens, dim)`` sees the same initial latent (``seed``) at the first timestep of
    a ``num_inference_steps`` schedule (:func:`dori.analysis.common.first_step_pass`, which also runs the
    recorders in ``also``); each row of the layer input is L2-normalised and the column L2 norm over rows
    is taken per embedding (what :func:`dori.mitigations.wanda.input_norms` sums over prompts, at step 0,
    for the conditional half of the guidance batch).
    """
    out: dict[str, list[torch.Tensor]] = {name: [] for name in layers}

    def make_hook(name):
        def hook(_module, args):
            x = args[0].float()
            x = x.reshape(x.shape[0], -1, x.shape[-1])
            x = x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)
            out[name].append(x.pow(2).sum(1).sqrt().cpu())

        return hook

    def register(hooks) -> None:
        for name in layers:
            hooks.pre(name, make_hook(name))

    first_step_pass(pipe, embeds, (register, *also), seed=seed, num_inference_steps=num_inference_steps,
                    batch_size=batch_size, owner="wanda-statistic")
    return {name: torch.cat(v) for name, v in out.items()}


def raw_statistic(pipe, values: dict[str, torch.nn.Linear], ffns: dict[str, torch.nn.Linear], embeds: torch.Tensor, *,
                  seed: int = 0, num_inference_steps: int = 50, batch_size: int = 16,
                  max_features: int = 65536, also: tuple[Callable, ...] = ()) -> dict[str, torch.Tensor]:
    """The whole activation maps per layer, flattened, at the first denoising step, ``(n, features)``.

    ``to_v`` layers (``values``): their output, tokens x neurons; ``ff.net.2`` layers (``ffns``): their
    input, positions x channels; every embedding sees the same initial latent (``seed``; the recorders in
    ``also`` run in the same pass). A map with more than ``max_features`` coordinates keeps a fixed random
    subset of them (drawn from ``seed`` and the layer name) scaled by ``sqrt(total / kept)``, so squared
    distances are unbiased estimates of the full ones.
    """
    from ..seeding import generator_for

    keep: dict[str, tuple[torch.Tensor, float] | None] = {}
    out: dict[str, list[torch.Tensor]] = {name: [] for name in (*values, *ffns)}

    def store(name: str, x: torch.Tensor) -> None:
        x = x.flatten(1)
        if name not in keep:
            total = x.shape[1]
            if total > max_features:
                index = torch.randperm(total, generator=generator_for(f"raw/{seed}/{name}"))[:max_features].sort().values
                keep[name] = (index.to(x.device), (total / max_features) ** 0.5)
            else:
                keep[name] = None
        if keep[name] is not None:
            index, scale = keep[name]
            x = x[:, index] * scale
        out[name].append(x.float().cpu())

    def register(hooks) -> None:
        for name in values:
            hooks.forward(name, lambda _m, _a, output, name=name: store(name, output))
        for name in ffns:
            hooks.pre(name, lambda _m, args, name=name: store(name, args[0]))

    first_step_pass(pipe, embeds, (register, *also), seed=seed, num_inference_steps=num_inference_steps,
                    batch_size=batch_size, owner="raw-activations")
    return {name: torch.cat(v) for name, v in out.items()}


def discrepancy_rows(method: str, stats: dict[str, dict[str, torch.Tensor]]) -> list[dict]:
    """Table rows (one per layer and set) from ``{set: {layer: (n, d)}}``."""
    rows = []
    for set_name, per_layer in stats.items():
        for k, (layer, acts) in enumerate(per_layer.items(), start=1):
            d = discrepancy(acts)
            rows.append({"method": method, "layer_id": k, "layer": layer, "short": short_name(layer),
                         "width": int(acts.shape[1]), "set": set_name, "n": d.n_members, "n_pairs": d.n_pairs,
                         "mean": d.mean, "std": d.std, "median": d.median})
    return rows


def run_activations(pipe, config: ActivationsConfig, out: str | Path | None = None, *, overwrite: bool = False,
                    progress: Progress | None = None) -> tuple[Path, dict]:
    """Run analysis B; returns the run folder and the summary."""
    from ..config_files import to_dict
    from ..models import model_name, model_record
    from ..runs import RunFolder, default_run_dir
    from .triggers import analysis_inputs

    config.validate()
    adv, mem_ids, _, mem = analysis_inputs(pipe, config)
    values, ffns = analysis_layers(pipe.unet, config.value_layers, config.ffn_layers)
    out = Path(out) if out is not None else default_run_dir("analyze-activations", model_name(pipe))
    run = RunFolder(out, "analyze-activations", to_dict(config), model=model_record(pipe),
                    resolved={"trigger_run": str(adv.run), "trigger_keys": adv.keys}, overwrite=overwrite,
                    seeds=[config.seed])
    with run.guard():
        summary = _measure(pipe, config, run, adv, mem_ids, mem, values, ffns, progress)
        run.finalize(summary)
    logger.info("activations: Y_adv/Y_mem ratio (geometric mean) NeMo %.2f, Wanda %.2f",
                summary["methods"]["nemo"]["ratio_geometric_mean"], summary["methods"]["wanda"]["ratio_geometric_mean"])
    return run.path, summary


def _measure(pipe, config: ActivationsConfig, run, adv, mem_ids, mem, values, ffns, progress) -> dict:
    """The statistics of every set, their table, figure and summary."""
    import pandas as pd
    from safetensors.torch import save_file

    sets = {"Y_mem": mem, "Y_adv": adv.triggers}
    if config.control_starts and adv.initial is not None:
        sets["Y_0"] = adv.initial
    stats: dict[str, dict[str, dict[str, torch.Tensor]]] = {"nemo": {}, "wanda": {}}
    recorder = AttentionRecorder(cross_attention_layers(pipe.unet, values)) if config.attention else None
    also = (recorder.register,) if recorder else ()  # the attention rides along each set's UNet pass
    attention: dict[str, dict[str, dict[str, torch.Tensor]]] = {}
    for k, (name, embeds) in enumerate(sets.items()):
        if progress:
            progress("activations", k, len(sets))
        if config.statistic == "raw":
            raw = raw_statistic(pipe, values, ffns, embeds, seed=config.seed, num_inference_steps=config.num_inference_steps,
                                batch_size=config.batch_size, max_features=config.raw_max_features, also=also)
            stats["nemo"][name] = {layer: raw[layer] for layer in values}
            stats["wanda"][name] = {layer: raw[layer] for layer in ffns}
        else:
            stats["nemo"][name] = nemo_statistic(values, embeds)
            stats["wanda"][name] = wanda_statistic(pipe, ffns, embeds, seed=config.seed,
                                                   num_inference_steps=config.num_inference_steps,
                                                   batch_size=config.batch_size, also=also)
        if recorder:
            attention[name] = recorder.collect()
    if progress:
        progress("activations", len(sets), len(sets))
    save_file({**{f"{method}/{s}/{layer}": a.contiguous() for method, per_set in stats.items()
                  for s, per_layer in per_set.items() for layer, a in per_layer.items()},
               **{f"attention/{s}/{layer}/{what}": v.contiguous() for s, per_layer in attention.items()
                  for layer, parts in per_layer.items() for what, v in parts.items()}},
              str(run.path / "activations.safetensors"),
              metadata={"Y_adv": ",".join(adv.keys), "Y_mem": ",".join(mem_ids)})
    table = pd.DataFrame.from_records([row for method in METHODS for row in discrepancy_rows(method, stats[method])])
    table.to_parquet(run.path / "table.parquet", index=False)

    per_method = {}
    for method in METHODS:
        part = table[table.method == method]
        means = {name: part[part["set"] == name].set_index("layer")["mean"] for name in sets}
        layers = list(means["Y_adv"].index)
        ratio = (means["Y_adv"] / means["Y_mem"].reindex(layers)).to_numpy()
        per_method[method] = {
            "layers": layers,
            **{name: [float(v) for v in means[name].reindex(layers)] for name in sets},
            "ratio_adv_over_mem": [float(v) for v in ratio],
            "ratio_geometric_mean": float(np.exp(np.log(ratio).mean())),
            "same_order": bool(((ratio > 0.1) & (ratio < 10)).all()),
        }
        if "Y_0" in sets:
            per_method[method]["ratio_adv_over_starts"] = [
                float(v) for v in (means["Y_adv"] / means["Y_0"].reindex(layers)).to_numpy()]
    summary = {
        "analysis": "activations (section 2.3)",
        "prompt_id": adv.prompt_id, "prompt": adv.prompt,
        "n_adv": len(adv), "n_adv_available": adv.n_available, "n_adv_succeeded": adv.n_succeeded,
        "successful_only": config.successful_only, "n_mem": len(mem_ids), "memorized": config.memorized,
        "statistic": config.statistic,
        "control_starts": "Y_0" in sets, "seed": config.seed, "timestep_index": 0, "num_inference_steps": config.num_inference_steps,
        "methods": per_method,
        "attention": _attention_summary(attention),
        "paper": {"n_adv": paper.STARTS, "n_mem": paper.MEMORIZED,
                  "finding": "Y_adv discrepancy comparable to Y_mem (NeMo: larger; Wanda: somewhat smaller)"},
        "error_bars": "std of the pairwise L2 distances (spread over pairs, not a standard error)",
        "note": scaled_note([("Y_adv triggers", len(adv), paper.STARTS), ("Y_mem prompts", len(mem_ids), paper.MEMORIZED)])
                + f"; Y_mem = the first {len(mem_ids)} prompts of {config.memorized}",
    }
    from .plots import plot_discrepancy

    save_figure(plot_discrepancy(table, summary), run.path, "activations")
    return summary


def _attention_summary(attention: dict[str, dict[str, dict[str, torch.Tensor]]]) -> dict:
    """``{"layers": [...], "sets": {set: {"first_token": [...], "effective_tokens": [...]}}}``: per set, the mean
    over members of each layer's first-token share and effective number of tokens (empty when not measured)."""
    if not attention:
        return {}
    layers = list(next(iter(attention.values())))
    return {"layers": layers,
            "sets": {name: {what: [float(per_layer[layer][what].mean()) for layer in layers]
                            for what in MEASURES}
                     for name, per_layer in attention.items()}}
