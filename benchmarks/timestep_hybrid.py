"""Two UNets split by timestep, measured as a mitigation: does a hybrid of the fine-tuned and the unmitigated
model hold a fresh Dori out?

Within :func:`dori.guidance_branches.split_timesteps`, ``--other`` (e.g. an adversarially fine-tuned UNet)
predicts every UNet input on one side of ``--boundary`` (``--side high``: at or above it) and ``--model``'s
UNet the rest, in sampling and in Dori's objective alike (a timestep per row is split row by row), so the
attack sees the hybrid it is run against. Prints one JSON line: MR of the testbed's memorized captions (10
seeds) and MR under a fresh Dori (``measure.robustness_figures``: 50 steps from the prompt and from N(0, I), 10
seeds per trigger, the demo's ``adversarial-ft+dori`` row), with MR per memorization kind. The run folders
under ``--out`` record ``--model`` as their model (the hybrid has no folder of its own). The hybrid's utility
is ``benchmarks/guidance_branches.py --boundary``'s. docs/testbed.md ("Where on the sampling trajectory the
shape colours are lost") has the figures.

    python benchmarks/timestep_hybrid.py --model <build>/pipeline --other <finetuned>/pipeline --out /tmp/th
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="testbed", help="the unmitigated model")
    parser.add_argument("--other", required=True, help="the UNet of this pipeline folder predicts one side")
    parser.add_argument("--boundary", type=int, default=500)
    parser.add_argument("--side", default="high", help="which side --other predicts: high (t >= boundary) or low")
    parser.add_argument("--out", default="runs/timestep-hybrid")
    args = parser.parse_args()
    if args.other == args.model:
        parser.error("--other: give a model other than --model")

    from measure import machine_line, robustness_figures

    from dori.guidance_branches import split_timesteps
    from dori.models import load_pipeline

    print(machine_line("cpu"))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    base, other = load_pipeline(args.model), load_pipeline(args.other)
    t0 = time.perf_counter()
    with split_timesteps(base, other.unet, args.boundary, args.side):
        robustness, records = robustness_figures(base, out, "hybrid")
    row = {"model": args.model, "other": args.other, "boundary": args.boundary, "side": args.side,
           "seconds": round(time.perf_counter() - t0), **robustness,
           "dori_by_trigger": {f"{r['prompt_id']}/{r['init']}": r["mr"] for r in records if r["mr"]}}
    line = json.dumps(row)
    print(line)
    with open(out / "results.jsonl", "a") as f:
        f.write(line + "\n")


if __name__ == "__main__":
    main()
