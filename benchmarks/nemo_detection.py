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
the seed, as a memorized caption draws its photo). For a run scored against the memorized photos
(a pruned ``memorized`` group), it splits the MR against any memorized photo into the captions the
pruning left replicating their own photo (for a demo's ``nemo`` run: how many of them NeMo's test
flagged, and how many neurons it blocked for them) and the others' jumps to another memorized photo.

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


def seed_similarity(images: torch.Tensor, descriptor) -> float:
    """Mean pairwise descriptor similarity of one caption's generations under different seeds (1.0: one image)."""
    e = torch.nn.functional.normalize(descriptor.embed(images), dim=-1)
    n = len(e)
    return float(((e @ e.T).sum() - n) / (n * n - n))


def caption_table(folder: Path):
    """One row per caption of a run folder: its seed similarity (the mean descriptor similarity between
    its seeds' images), and, where the run scored against the memorized photos, its own-photo MR and the
    share of its generations that copy *another* memorized photo (for a run of memorized captions)."""
    import json

    import pandas as pd

    from dori.descriptors import TestbedDescriptor
    from dori.images import load_image, to_tensor

    records = pd.read_parquet(folder / "records.parquet")
    summary = folder / "summary.json"
    threshold = json.loads(summary.read_text()).get("threshold") if summary.exists() else None
    memorized = records["prompt_id"].str.startswith(("memorized/", "template/")).all()
    scored = memorized and threshold is not None and {"sscd_orig", "gallery_max"} <= set(records.columns)
    descriptor = TestbedDescriptor()
    rows = []
    for prompt_id, group in records.groupby("prompt_id"):
        if len(group) < 2:
            continue
        images = to_tensor([load_image(folder / p) for p in group["image"]])
        row = {"prompt_id": prompt_id, "prompt": group["prompt"].iloc[0],
               "seed_similarity": seed_similarity(images, descriptor)}
        if scored:
            own = group["sscd_orig"] > threshold
            row["own"] = float(own.mean())
            row["other"] = float(((group["gallery_max"] > threshold) & ~own).mean())
        rows.append(row)
    if not rows:
        raise SystemExit(f"{folder}: no caption with generations under two seeds or more")
    return pd.DataFrame(rows)


def describe_run(folder: Path) -> str:
    """The run's seed similarity and, for a pruned memorized group, what its MR against any memorized
    photo is made of: the captions the pruning left replicating their own photo (own MR > 0.5), and the
    others' generations that copy another memorized photo (docs/testbed.md, "What the 'any' row is made of")."""
    table = caption_table(folder)
    line = f"{folder}: seed similarity {table['seed_similarity'].mean():.3f} over {len(table)} captions"
    if "own" not in table:
        return line
    left = table[table["own"] > 0.5]
    pruned = table[table["own"] <= 0.5]
    line += f"; left replicating: {len(left)} ({', '.join(p.split('/')[-1] for p in left['prompt_id']) or '-'})"
    localization = folder.parent / "localize-nemo" / "nemo.safetensors"
    if folder.name == "nemo" and localization.exists() and len(left):
        from dori.mitigations.nemo import NeMo

        found = {r.prompt: r for r in NeMo.load(localization).results}
        mine = [found[p] for p in left["prompt"] if p in found]
        flagged = [r for r in mine if r.memorized]
        neurons = sorted(r.n_neurons() for r in flagged)
        line += (f", of which NeMo's test flagged {len(flagged)}"
                 + (f" (neurons blocked: median {neurons[len(neurons) // 2]})" if neurons else ""))
    if len(pruned):
        line += (f"; the {len(pruned)} others: {pruned['other'].mean():.2f} of their generations copy another"
                 f" memorized photo, seed similarity {pruned['seed_similarity'].mean():.3f}")
    return line


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
        print(describe_run(folder))


if __name__ == "__main__":
    main()
