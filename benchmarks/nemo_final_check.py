"""NeMo with a check at the end of sampling: how far its search must go before a flagged caption stops replicating.

NeMo (Hintersdorf et al. 2024; Finding Dori section 2.2) stops its search at the first level (theta, k) whose
blocked SSIM at the detection step is down to its threshold, then refines. On the version-2 testbed builds, most
captions it leaves replicating were flagged and had neurons blocked (docs/testbed.md, "What the 'any' row is made
of"). This script continues the official search levels (theta down by ``theta_step``, k up by 1) for each flagged
caption, past NeMo's stop, until a few check seeds' final generations are no longer alike: mean pairwise
testbed-descriptor similarity at or below ``--threshold``. That test needs no training image, like NeMo's own.
It writes the selections as a NeMo file (the level's unrefined selection where the check moved the search on,
NeMo's own refined one where it did not) for ``dori evaluate --mitigation``.

    python benchmarks/nemo_final_check.py --model <build>/pipeline --nemo <demo>/localize-nemo/nemo.safetensors \\
        --threshold 0.511 --out final.safetensors

Not part of the package: measured, as an experiment on the testbed (docs/testbed.md gives the figures).
"""

from __future__ import annotations

import argparse
import os
from dataclasses import replace
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from nemo_detection import seed_similarity


def main() -> None:
    from dori.descriptors import TestbedDescriptor
    from dori.generation import GenerationConfig, generate
    from dori.mitigations.base import mitigated
    from dori.mitigations.nemo import (
        NeMo,
        activation_statistics,
        encode,
        initial_selection,
        neuron_activations,
        search_schedule,
        statistics_prompts,
        value_layers,
    )
    from dori.models import load_pipeline

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="the pipeline NeMo was fitted on")
    parser.add_argument("--nemo", type=Path, required=True, help="NeMo's file (a demo's localize-nemo/nemo.safetensors)")
    parser.add_argument("--threshold", type=float, required=True,
                        help="seed similarity above which a caption still replicates (the build's descriptor threshold)")
    parser.add_argument("--seeds", type=int, default=4, help="check seeds per level (from 1000, apart from evaluate's)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    if args.seeds < 2:
        parser.error("--seeds must be >= 2 (the check compares seeds)")

    pipe = load_pipeline(args.model)
    nemo = NeMo.load(args.nemo)
    nemo.check_model(pipe, args.nemo)
    layers = value_layers(pipe.unet, nemo.config.layers)
    stats = activation_statistics(pipe, layers, nemo.config, statistics_prompts(nemo.config.statistics, pipe))
    descriptor = TestbedDescriptor()
    seeds = list(range(1000, 1000 + args.seeds))
    schedule = search_schedule(nemo.config, max(layer.out_features for layer in layers.values()))
    results = []
    for result in nemo.results:
        if not result.memorized:
            results.append(result)
            continue
        activations = {n: a[0] for n, a in neuron_activations(layers, encode(pipe, [result.prompt])).items()}
        z = stats.z_scores(activations)
        start = next((i for i, level in enumerate(schedule) if level == (result.theta, result.k)), None)
        if start is None:
            raise SystemExit(f"{args.nemo}: level {(result.theta, result.k)} is not on this config's search schedule")
        selection, level, similarity = result.refined, start, None
        while True:
            probe = NeMo([replace(result, refined=selection)], nemo.layer_names, nemo.config, nemo.threshold)
            with mitigated(pipe, probe, prompt=result.prompt):
                images = generate(pipe, seeds, [result.prompt] * len(seeds), config=GenerationConfig()).images
            similarity = seed_similarity(images, descriptor)
            if similarity <= args.threshold or level + 1 >= len(schedule):
                break
            level += 1
            selection = initial_selection(activations, z, *schedule[level])
        neurons = sum(len(v) for v in selection.values())
        print(f"{result.prompt[:48]:48s} NeMo's stop {schedule[start]} ({result.n_neurons()} neurons) -> "
              f"{schedule[level]} ({neurons} neurons), check-seed similarity {similarity:.3f}")
        results.append(replace(result, refined=selection))
    NeMo(results, nemo.layer_names, nemo.config, nemo.threshold).stamp(pipe).save(args.out)
    print(f"written: {args.out}")


if __name__ == "__main__":
    main()
