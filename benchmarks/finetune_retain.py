"""Adversarial fine-tuning's utility cost on a testbed build, for one setting of its retain term.

Fine-tunes a copy of the model with ``FinetuneConfig.testbed()`` and ``changes`` laid over it (nested, as in a
config file) and prints one JSON line:
utility (shape captions drawn in the right colours, VAE-feature FID) over the utility stage's 60 shape
captions and over 200 more (other seeds), MR of the memorized captions (10 seeds) and MR under a fresh
Dori (50 steps from the prompt and from N(0, I), 10 seeds per trigger, seed 1000, as the demo's row),
with its MR per memorization kind (VM / TM) on a build that labels them.
The line is also appended to ``<out>/results.jsonl``. docs/methods.md ("The retain term") has the
figures.

    python benchmarks/finetune_retain.py uncond20 '{"retain_uncond": 0.2, "seed": 1}' --out /tmp/ft
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("name", help="this setting's name (its folder under --out)")
    parser.add_argument("changes", help="FinetuneConfig.testbed fields as JSON, e.g. '{\"retain_uncond\": 0.2}' or "
                                        "'{\"inner\": {\"steps\": 25}}' (the inner attack's fields)")
    parser.add_argument("--model", default="testbed")
    parser.add_argument("--prompts", default="testbed:memorized",
                        help="what the fine-tuning attacks: a prompt set, or several joined by '+' (e.g. "
                             "testbed:memorized+testbed:template, every caption of the template photos too); "
                             "MR and the fresh Dori are always over testbed:memorized")
    parser.add_argument("--out", default="runs/finetune-retain")
    args = parser.parse_args()

    from measure import robustness_figures

    from dori.config_files import from_dict, merge, to_dict
    from dori.finetune import FinetuneConfig, adversarial_finetune
    from dori.models import load_pipeline
    from dori.prompts import prompts_for
    from dori.utility import testbed_utility

    changes = json.loads(args.changes)
    # laid over the testbed setting as a config file's settings are (nested fields such as the inner attack's)
    config = from_dict(FinetuneConfig, merge(to_dict(FinetuneConfig.testbed()), changes), "changes")
    out = Path(args.out) / args.name
    base = load_pipeline(args.model)
    pipe = copy.deepcopy(base)
    t0 = time.perf_counter()
    adversarial_finetune(pipe, prompts_for(pipe, args.prompts), config, out / "ft")
    seconds = time.perf_counter() - t0
    utility = testbed_utility(pipe, original_vae=base.vae)
    more = testbed_utility(pipe, original_vae=base.vae, num_images=200, seed=500)
    robustness, _ = robustness_figures(pipe, out)
    row = {"name": args.name, "prompts": args.prompts, "changes": changes, "finetune_s": round(seconds),
           "shapes_60": utility["shape_accuracy"], "fid_60": utility["fid_vae"],
           "shapes_200": more["shape_accuracy"], "fid_200": more["fid_vae"], **robustness}
    line = json.dumps(row)
    print(line)
    with open(Path(args.out) / "results.jsonl", "a") as f:
        f.write(line + "\n")


if __name__ == "__main__":
    main()
