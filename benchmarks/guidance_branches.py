"""Which guidance branch, or which end of sampling, carries a utility change: the testbed's utility stage with one
half of classifier-free guidance, or the steps on one side of a timestep, taken from the other model.

Measures, over ``--blocks`` disjoint blocks of seeds (:func:`dori.utility.testbed_utility_blocks`, with the
colour failures), the unmitigated model (``--model``) and two hybrids of it with ``--other`` (a fine-tuned
pipeline folder of the same architecture; :func:`dori.guidance_branches.split_guidance`): the unmitigated
unconditional branch with the other model's conditional one, and the other model's unconditional branch with
the unmitigated conditional one; with ``--boundary T``, two hybrids by timestep instead
(:func:`dori.guidance_branches.split_timesteps`): the other model at every sampling step at or above ``T`` and the
unmitigated one below it, and the converse. Prints each hybrid's shape figures paired with the unmitigated model's
(mean difference, 95% Student-t interval) and its commonest colour confusions; the other model on its own is
``benchmarks/utility_spread.py``'s. The retain loss is not a guided generation and is left out. One JSON line
per hybrid goes to ``<out>/results.jsonl``. docs/testbed.md ("What the lost shape colours are on u seed 0"; by
timestep, "Where on the sampling trajectory the shape colours are lost") has the figures.

    python benchmarks/guidance_branches.py --model <build>/pipeline --other <finetuned>/pipeline --out /tmp/gb
"""

from __future__ import annotations

import argparse
import json
import time
from functools import partial
from pathlib import Path

from paired_utility import pair_arguments, paired_report, parse_pair


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    pair_arguments(parser)
    parser.add_argument("--boundary", type=int, default=None,
                        help="split sampling at this timestep instead of splitting guidance's branches")
    parser.add_argument("--out", default="runs/guidance-branches")
    args = parse_pair(parser)

    from measure import machine_line

    from dori.guidance_branches import split_guidance, split_timesteps
    from dori.models import load_pipeline
    from dori.utility import testbed_utility_blocks

    print(machine_line("cpu"))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    base, other = load_pipeline(args.model), load_pipeline(args.other)

    def measure(pipe) -> list[dict]:
        return testbed_utility_blocks(pipe, original_vae=base.vae, blocks=args.blocks, num_images=args.num_images,
                                      seed=args.seed, failures=True)

    t0 = time.perf_counter()
    reference = measure(base)
    print(f"{args.model}: {args.blocks} blocks in {time.perf_counter() - t0:.0f} s; shapes in the right colours "
          f"{sum(b['shape_accuracy'] for b in reference) / len(reference):.3f}")
    if args.boundary is None:
        hybrids = {"unmitigated unconditional + other conditional": partial(split_guidance, branch="conditional"),
                   "other unconditional + unmitigated conditional": partial(split_guidance, branch="unconditional")}
    else:
        hybrids = {f"other at t >= {args.boundary} + unmitigated below":
                   partial(split_timesteps, boundary=args.boundary, side="high"),
                   f"unmitigated at t >= {args.boundary} + other below":
                   partial(split_timesteps, boundary=args.boundary, side="low")}
    for name, split in hybrids.items():
        t0 = time.perf_counter()
        with split(base, other.unet):
            blocks = measure(base)
        print(f"{name} ({time.perf_counter() - t0:.0f} s)")
        row = {"hybrid": name, "boundary": args.boundary, "model": args.model, "other": args.other,
               "blocks": args.blocks, "num_images": args.num_images, "seed": args.seed,
               **paired_report(reference, blocks)}
        with open(out / "results.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
