"""The testbed's utility figures against their own seed-to-seed noise: is a mitigated model's utility
within a tolerance of the unmitigated model's, or only within the noise of one 60-caption measurement?

Measures the unmitigated model (``--model``) and each ``--other`` pipeline folder (a fine-tuned model,
e.g. the ``model`` of a demo's ``adversarial-ft`` row) with :func:`dori.utility.testbed_utility_blocks`:
the utility stage's shape captions over ``--blocks`` disjoint blocks of generation seeds (block 0 is the
demo's utility stage), FID with the unmitigated VAE's features. Prints, per figure, each model's mean
and standard deviation over the blocks, and for each other model the paired difference (other minus
unmitigated, same captions and seeds): its mean with a 95% Student-t interval, and its standard
deviation over blocks, the noise of a comparison on one block. For shape colours the verdict against
``--tolerance`` (how far below the unmitigated model's the figure may lie): "kept" when the whole
interval is above minus the tolerance, "lost" when it is wholly below, else "undecided"; for FID "kept"
when the mean difference is at most ``--fid-sds`` of the unmitigated model's block standard deviations
(the issue's "FID within the seed spread"), else "lost". Then how the shape generations miss their
colours (:func:`dori.testbed.shape_colours.colour_failures`): the shares with the background wrong, with no
object, and with the object in a wrong colour (paired as above; with the right ones they sum to 1), and
the commonest confusions summed over the blocks (``wanted>drawn``), beside the unmitigated model's count
of the same confusion. One JSON line per model goes to ``<out>/results.jsonl``. docs/testbed.md ("How noisy
the utility figures are", "What the lost shape colours are on u seed 0") has the figures.

    python benchmarks/utility_spread.py --model <build>/pipeline --other <finetuned>/pipeline --out /tmp/us
"""

from __future__ import annotations

import argparse
import json
import time
from collections import Counter
from pathlib import Path

FIGURES = {"shape_accuracy": "shapes in the right colours", "fid_vae": "FID (VAE features)",
           "retain_loss": "retain loss", "shape_background_wrong": "shapes: background wrong",
           "shape_object_missing": "shapes: no object", "shape_object_wrong": "shapes: object in a wrong colour"}
CONFUSIONS = 6
"""How many of a model's commonest colour confusions to print."""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="testbed", help="the unmitigated model")
    parser.add_argument("--other", action="append", default=[], help="a model to compare (repeatable)")
    parser.add_argument("--blocks", type=int, default=10)
    parser.add_argument("--num-images", type=int, default=60)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tolerance", type=float, default=0.05,
                        help="how far below the unmitigated model's the shape colours may lie")
    parser.add_argument("--fid-sds", type=float, default=2.0,
                        help="how many of the unmitigated model's block SDs FID may rise")
    parser.add_argument("--out", default="runs/utility-spread")
    args = parser.parse_args()
    if args.model in args.other or len(set(args.other)) < len(args.other):
        parser.error("--other: each model once, and not the --model itself (a model paired with itself differs "
                     "by nothing)")

    import numpy as np
    from measure import machine_line

    from dori.models import load_pipeline
    from dori.utility import paired_spread, testbed_utility_blocks

    print(machine_line("cpu"))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    base = load_pipeline(args.model)
    measured, confusions = {}, {}
    for name in [args.model, *args.other]:
        pipe = base if name == args.model else load_pipeline(name)
        t0 = time.perf_counter()
        blocks = testbed_utility_blocks(pipe, original_vae=base.vae, blocks=args.blocks,
                                        num_images=args.num_images, seed=args.seed, failures=True)
        measured[name] = {key: [b[key] for b in blocks] for key in FIGURES}
        confusions[name] = sum((Counter(b["shape_confusions"]) for b in blocks), Counter())
        print(f"{name}: {args.blocks} blocks of {blocks[0]['utility_images']} images in "
              f"{time.perf_counter() - t0:.0f} s")
    for name, values in measured.items():
        row = {"model": name, "reference": args.model, "blocks": args.blocks, "num_images": args.num_images,
               "seed": args.seed, **values}
        print(name if name == args.model else f"{name} (against {args.model})")
        for key, label in FIGURES.items():
            if name == args.model:
                print(f"  {label}: {np.mean(values[key]):.3f} +- {np.std(values[key], ddof=1):.3f} "
                      f"(block 0: {values[key][0]:.3f})")
                continue
            spread = paired_spread(measured[args.model][key], values[key])
            row[f"{key}_paired"] = spread
            line = (f"  {label}: {spread['other_mean']:.3f} +- {spread['other_sd']:.3f} (block 0: {values[key][0]:.3f}); "
                    f"minus unmitigated {spread['diff_mean']:+.3f} (95% {spread['diff_low']:+.3f} to "
                    f"{spread['diff_high']:+.3f}; one block's difference +- {spread['diff_sd']:.3f})")
            if key == "shape_accuracy":
                verdict = ("kept" if spread["diff_low"] > -args.tolerance else
                           "lost" if spread["diff_high"] < -args.tolerance else "undecided")
                row["verdict"] = verdict
                line += f": {verdict} at tolerance {args.tolerance}"
            elif key == "fid_vae":
                bar = args.fid_sds * spread["base_sd"]
                row["fid_verdict"] = "kept" if spread["diff_mean"] <= bar else "lost"
                line += f": {row['fid_verdict']} at {args.fid_sds:g} SDs ({bar:.1f})"
            print(line)
        common = confusions[name].most_common(CONFUSIONS)
        row["confusions"] = dict(confusions[name])
        print("  commonest confusions over the blocks (wanted>drawn: count"
              + ("" if name == args.model else ", unmitigated's") + "): "
              + (", ".join(f"{k}: {n}" + ("" if name == args.model else f" ({confusions[args.model][k]})")
                           for k, n in common) or "none"))
        with open(out / "results.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
