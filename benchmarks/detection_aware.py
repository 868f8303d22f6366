"""The detection-aware recipe's trade-off on the testbed: for each penalty weight, the MR of its triggers and
how well Wen et al.'s noise norm and NeMo's test still separate them from non-memorized captions.

    python benchmarks/detection_aware.py --weights 0 1 4 16 --out runs/detection-aware

Each weight is one `dori_low_noise_norm` attack on the 4 memorized captions (Dori's settings: 50 steps,
10 seeds, prompt starts; weight 0 is Dori itself); the negatives are 24 seen-once and 24 held-out
captions. Prints the machine line and one JSON line per weight (docs/methods.md's table comes from it).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from measure import machine_line


def main() -> None:
    import torch

    from dori.attack.loop import AttackConfig
    from dori.attack.recipes import RECIPES
    from dori.attack.recipes.dori_low_noise_norm import dori_low_noise_norm
    from dori.attack.run import AttackRunConfig, load_triggers, run_attack
    from dori.detection import DETECTORS, detector_scores, separation
    from dori.models import encode_prompts, load_pipeline
    from dori.prompts import prompts_for

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", type=float, nargs="+", default=[0.0, 1.0, 4.0, 16.0])
    parser.add_argument("--out", type=Path, default=Path("runs") / f"detection-aware-{time.strftime('%Y%m%d-%H%M%S')}")
    args = parser.parse_args()
    pipe = load_pipeline("testbed")
    negatives = [r.prompt for spec in ("testbed:seen-once", "testbed:held-out") for r in prompts_for(pipe, spec, limit=24).records]
    neg = encode_prompts(pipe, negatives)
    seeds = [0, 1, 2, 3]
    neg_scores = {d: detector_scores(d, pipe, neg, seeds) for d in DETECTORS}
    print(machine_line())
    for weight in args.weights:
        name = f"dori_low_noise_norm_w{weight:g}"

        def variant(pipe, descriptor, references, weight=weight, **parts):
            return dori_low_noise_norm(pipe, descriptor, references, weight=weight, **parts)

        RECIPES.register(name)(variant)
        t0 = time.perf_counter()
        out = args.out / f"weight-{weight:g}"
        config = AttackRunConfig(recipe=name, attack=AttackConfig(record_at=(50,)))
        _, records = run_attack(pipe, config, out)
        seconds = time.perf_counter() - t0
        triggers = load_triggers(out)
        y = torch.stack([triggers[k] for k in sorted(triggers)])
        scores = [s for r in records for s in r["scores"]]
        row = {"weight": weight, "mr": sum(s > 0.7 for s in scores) / len(scores), "seconds": round(seconds, 1)}
        for d in DETECTORS:
            sep = separation(d, "triggers", detector_scores(d, pipe, y, seeds), "non-memorized", neg_scores[d])
            row[d] = {"auc": round(sep.auc, 3), "tpr_at_1pct_fpr": round(sep.tpr_at_1pct_fpr, 3),
                      "median": round(sep.positive_median, 3), "negative_median": round(sep.negative_median, 3)}
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
