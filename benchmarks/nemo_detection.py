"""NeMo's memorization test at each detection step: where the memorized prompts stand against its threshold.

NeMo (Hintersdorf et al. 2024, one of the two prunings Finding Dori attacks) flags a seed as
memorized when the noise difference at its detection step has a maximum pairwise SSIM over seeds
above a threshold calibrated on non-memorized prompts (mean + 1 std), and it blocks neurons until the
SSIM falls to that threshold. How far above the threshold the memorized prompts start therefore sets
how deep the search goes. Per detection step this prints:

* the calibrated threshold, as `dori mitigate nemo` computes it (``calibration_ssims``);
* the memorized prompts' mean pairwise SSIM (lowest and highest prompt) at NeMo's detection guidance;
* their margin over the calibration mean in calibration standard deviations (the threshold is 1.0);
* the share of the memorized prompts' seeds the test flags.

With ``--runs``, it also prints each run folder's seed similarity: the mean testbed-descriptor
similarity between one caption's generations under different seeds (1.0: the same image whatever
the seed, as a memorized caption draws its photo).

    python benchmarks/nemo_detection.py --model testbed --steps 1,5,10,20,30,40
    python benchmarks/nemo_detection.py --steps "" --runs runs/demo/nemo runs/demo/seen-once
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from measure import machine_line


def detection_table(model: str, prompts: str, steps: list[int]) -> None:
    from dori.mitigations.nemo import (
        NeMoConfig,
        calibration_ssims,
        detection_step,
        encode,
        noise_differences,
        pairwise_ssim,
        seed_maxima,
        statistics_prompts,
    )
    from dori.models import load_pipeline
    from dori.prompts import prompts_for

    pipe = load_pipeline(model)
    memorized = [r.prompt for r in prompts_for(pipe, prompts).records]
    non_memorized = statistics_prompts(None, pipe)
    print(f"model {model}: {len(memorized)} memorized prompts ({prompts}), {len(non_memorized)} non-memorized "
          f"for the calibration (up to {NeMoConfig().calibration_prompts} used)")
    print(f"{'step':>4} {'t':>4} | {'threshold':>9} | {'memorized pairwise SSIM (min-max)':>33} | {'margin (std)':>12} | seeds flagged")
    for step in steps:
        config = NeMoConfig(detection_step=step)
        config.validate()
        calibration = calibration_ssims(pipe, non_memorized, config)
        mean, std = float(calibration.mean()), float(calibration.std())
        threshold = mean + std
        latents = config.latents(pipe)
        step_t = detection_step(pipe, config, latents.device)
        means, flagged = [], 0
        for prompt in memorized:
            values = pairwise_ssim(noise_differences(pipe, encode(pipe, [prompt]), latents, config, step=step_t), config)
            means.append(float(values.mean()))
            flagged += int((seed_maxima(values, config.num_seeds) > threshold).sum())
        t = int(step_t[1])
        average = sum(means) / len(means)
        spread = f"{average:.3f} ({min(means):.2f}-{max(means):.2f})"
        print(f"{step:4d} {t:4d} | {threshold:9.3f} | {spread:>33} | {(average - mean) / std:12.2f} | "
              f"{flagged / (len(memorized) * config.num_seeds):.2f}")


def seed_similarity(folder: Path) -> tuple[int, float]:
    """(captions, mean over captions of the mean descriptor similarity between their seeds' images)."""
    import pandas as pd

    from dori.descriptors import TestbedDescriptor
    from dori.images import load_image, to_tensor

    records = pd.read_parquet(folder / "records.parquet")
    descriptor = TestbedDescriptor()
    values = []
    for _, group in records.groupby("prompt_id"):
        if len(group) < 2:
            continue
        images = to_tensor([load_image(folder / p) for p in group["image"]])
        e = torch.nn.functional.normalize(descriptor.embed(images), dim=-1)
        n = len(group)
        values.append(float(((e @ e.T).sum() - n) / (n * n - n)))
    if not values:
        raise SystemExit(f"{folder}: no caption with generations under two seeds or more")
    return len(values), sum(values) / len(values)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="testbed")
    parser.add_argument("--prompts", default="testbed:memorized")
    parser.add_argument("--steps", default="1,5,10,20,30,40", help="detection steps, comma-separated (empty: none)")
    parser.add_argument("--runs", nargs="*", type=Path, default=[], help="run folders (records.parquet) for the seed similarity")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(machine_line("cpu"))
    if args.steps:
        detection_table(args.model, args.prompts, [int(s) for s in args.steps.split(",")])
    for folder in args.runs:
        n, value = seed_similarity(folder)
        print(f"{folder}: seed similarity {value:.3f} over {n} captions")


if __name__ == "__main__":
    main()
