"""NeMo localisation: dori's batched search vs a reference that follows the official code's structure.

The reference (as ``utils/activation_detection.py`` of the NeMo repository is organised): every
round of the initial selection recomputes the activations with a UNet pass and hooks on the value
layers; every noise difference is one seed per UNet call, for all seeds, before the
memorized-looking ones are picked; the refinement recomputes the unblocked noise differences.
dori scores neurons straight from the text embedding (no UNet pass), computes the unblocked noise
differences once and evaluates each blocked set in one UNet call with all seeds batched.

Prints, per prompt and for both, the UNet calls, the UNet samples (rows of all calls: the arithmetic
both must do) and the wall time (median of ``--repeats``), the ratio, and whether the neurons agree.

    python benchmarks/nemo.py                  # the testbed's memorized captions
"""

from __future__ import annotations

import argparse
import math
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from measure import machine_line, timed

from dori.hooks import counting_calls, hooked
from dori.mitigations.nemo import (
    ActivationStatistics,
    NeMoConfig,
    block_neurons,
    calibrate_ssim_threshold,
    encode,
    initial_selection,
    localize_prompt,
    max_pairwise_ssim,
    noise_differences,
    statistics_prompts,
    value_layers,
)
from dori.models import initial_latents, load_pipeline
from dori.prompts import prompts_for


def reference_localize(pipe, layers, prompt, stats, threshold, config):
    """NeMo's search in the structure of the official code (one seed per UNet call, nothing cached)."""
    seeds = [config.seed + i for i in range(config.num_seeds)]
    embeds = encode(pipe, [prompt])

    def diffs(selection=None):
        with block_neurons(pipe.unet, selection or {}, config.scaling_factor):
            return torch.cat([noise_differences(pipe, embeds, initial_latents(pipe, [s]), config) for s in seeds])

    def activations_via_unet():
        captured = {}
        with hooked(pipe.unet, "reference-activations") as hooks:
            for name in layers:
                hooks.forward(name, lambda m, a, out, n=name: captured.__setitem__(n, out.abs().mean(1)[0].float()))
            noise_differences(pipe, embeds, initial_latents(pipe, seeds[:1]), config)
        return captured

    unblocked = diffs()
    look = max_pairwise_ssim(unblocked, config) > threshold
    if not look.any():
        return {}
    unblocked = unblocked[look]

    def ssim(selection):
        return float(config.ssim(unblocked, diffs(selection)[look]).max())

    theta, k = config.initial_theta, config.initial_k
    max_k = max(layer.out_features for layer in layers.values())
    refine_threshold = threshold
    while True:
        acts = activations_via_unet()
        selection = initial_selection(acts, stats.z_scores(acts), theta, k)
        value = ssim(selection)
        if value > threshold:
            if theta > config.min_theta:
                theta -= config.theta_step
            k += 1
        if math.isclose(theta, config.min_theta) or theta < config.min_theta or k >= max_k:
            refine_threshold = value
            break
        if value <= threshold:
            break
    unblocked = diffs()[look]  # the refinement recomputes the vanilla noise differences
    current = {n: list(v) for n, v in selection.items()}
    for name in reversed(list(current)):
        if current[name] and ssim({**current, name: []}) < refine_threshold:
            current[name] = []
    for name in reversed(list(current)):
        for neuron in list(current[name]):
            trial = {**current, name: [x for x in current[name] if x != neuron]}
            if ssim(trial) < refine_threshold:
                current[name] = trial[name]
    return current


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="testbed")
    parser.add_argument("--prompts", default="testbed:memorized")
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--min-theta", type=float, default=1.0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats per prompt and method (median)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    pipe = load_pipeline(args.model)
    config = NeMoConfig(min_theta=args.min_theta)
    layers = value_layers(pipe.unet, config.layers)
    non_memorized = statistics_prompts(None, pipe)
    stats = ActivationStatistics.compute(pipe, layers, non_memorized)
    threshold = calibrate_ssim_threshold(pipe, layers, non_memorized, config)
    records = prompts_for(pipe, args.prompts, limit=args.limit).records
    print(machine_line("cpu"))
    print(f"model {args.model}  {len(layers)} value layers  SSIM threshold {threshold:.3f}  repeats {args.repeats}")
    names = ("dori", "reference")
    totals = {n: {"calls": 0, "samples": 0, "seconds": 0.0} for n in names}
    for record in records:
        found, row = {}, {}
        for name, search in (("dori", lambda r=record: localize_prompt(pipe, layers, r.prompt, stats, threshold, config).refined),
                             ("reference", lambda r=record: reference_localize(pipe, layers, r.prompt, stats, threshold, config))):
            with counting_calls(pipe.unet) as counter:
                found[name] = search()
            row[name] = {"calls": counter.calls, "samples": counter.samples,
                         "time": timed(search, repeats=args.repeats)}
            totals[name]["calls"] += counter.calls
            totals[name]["samples"] += counter.samples
            totals[name]["seconds"] += row[name]["time"].median
        same = {n: v for n, v in found["dori"].items() if v} == {n: sorted(v) for n, v in found["reference"].items() if v}
        ours, ref = row["dori"], row["reference"]
        print(f"{record.id:28s} neurons {sum(len(v) for v in found['dori'].values()):4d}  UNet calls {ours['calls']:4d} vs "
              f"{ref['calls']:5d}  samples {ours['samples']:5d} vs {ref['samples']:5d}  time {ours['time']} vs "
              f"{ref['time']}  ({ref['time'].median / max(ours['time'].median, 1e-9):4.1f}x)  identical neurons: {same}")
    n = len(records)
    ours, ref = totals["dori"], totals["reference"]
    print(f"per prompt: dori {ours['calls'] / n:.0f} UNet calls, {ours['samples'] / n:.0f} samples, {ours['seconds'] / n:.2f} s; "
          f"reference {ref['calls'] / n:.0f} calls, {ref['samples'] / n:.0f} samples, {ref['seconds'] / n:.2f} s; "
          f"speed-up {ref['seconds'] / ours['seconds']:.1f}x (sums of per-prompt medians)")


if __name__ == "__main__":
    main()
