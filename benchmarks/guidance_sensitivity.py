"""How strongly a changed model's predictions follow the testbed's shape captions, and whether a higher guidance
scale gives back what it draws less strongly.

First the guidance difference (:func:`dori.guidance_branches.guidance_difference`: the UNet's prediction under a
shape caption minus its prediction under the empty caption, the part of each sampling step that classifier-free
guidance scales) of the unmitigated model (``--model``) and of ``--other`` on the utility stage's shape captions
(:func:`dori.utility.utility_shapes`), their training images noised at ``--timesteps`` with ``--pairs`` noise draws
each (the same draws for both models). Prints per timestep each model's mean norm, their ratio (other over
unmitigated; under 1 the other model follows the captions less strongly) and the mean cosine of the two
differences (1: the same direction).

Then the utility stage over ``--blocks`` disjoint blocks of seeds (:func:`dori.utility.testbed_utility_blocks`,
with the colour failures; left out with ``--difference-only``): the unmitigated model at the sampler's guidance
scale, and ``--other`` at that scale and at each ``--scale`` (default: the sampler's scale divided by the mean ratio
over the timesteps from 500 on, the scale that would restore the unmitigated model's guidance difference there if
the change were a shrinking), each paired with the unmitigated model (mean difference, 95% Student-t interval;
``paired_utility``). One JSON line per measurement goes to ``<out>/results.jsonl``. docs/testbed.md ("Where on the
sampling trajectory the shape colours are lost") has the figures.

    python benchmarks/guidance_sensitivity.py --model <build>/pipeline --other <finetuned>/pipeline --out /tmp/gs
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from paired_utility import pair_arguments, paired_report, parse_pair

HIGH_NOISE = 500
"""Timesteps from here on make up the default rescaled guidance (where a sample's colours and layout are set)."""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    pair_arguments(parser)
    parser.add_argument("--timesteps", default="950,750,500,250,50", help="comma-separated training timesteps")
    parser.add_argument("--pairs", type=int, default=2, help="noise draws per caption and timestep")
    parser.add_argument("--scale", type=float, action="append", default=[],
                        help="a guidance scale for --other's utility stage (repeatable; default: the rescaled one)")
    parser.add_argument("--difference-only", action="store_true", help="measure the guidance difference, no utility")
    parser.add_argument("--out", default="runs/guidance-sensitivity")
    args = parse_pair(parser)
    timesteps = [int(t) for t in args.timesteps.split(",")]

    import numpy as np
    from diffusers import DDPMScheduler
    from measure import machine_line

    from dori.generation import GenerationConfig
    from dori.guidance_branches import compare_guidance, guidance_difference
    from dori.models import encode_images, encode_prompts, load_pipeline
    from dori.utility import testbed_utility_blocks, utility_shapes

    print(machine_line("cpu"))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    base, other = load_pipeline(args.model), load_pipeline(args.other)

    def record(row: dict) -> None:
        with open(out / "results.jsonl", "a") as f:
            f.write(json.dumps({"model": args.model, "other": args.other, **row}) + "\n")

    shape_set, chosen = utility_shapes(base, args.num_images)
    latents = encode_images(base, [shape_set.references[r.id] for r in chosen])
    scheduler = DDPMScheduler.from_config(base.scheduler.config)
    t0 = time.perf_counter()
    diffs = [guidance_difference(pipe.unet, scheduler, latents, encode_prompts(pipe, [r.prompt for r in chosen]),
                                 encode_prompts(pipe, [""]), timesteps, pairs=args.pairs, seed=args.seed)
             for pipe in (base, other)]
    rows = compare_guidance(*diffs, timesteps)
    print(f"guidance difference on {len(chosen)} shape captions x {args.pairs} draws "
          f"({time.perf_counter() - t0:.0f} s)")
    print("  timestep  unmitigated  other  ratio  cosine")
    for row in rows:
        print(f"  {row['timestep']:8d}  {row['norm_base']:11.3f}  {row['norm_other']:5.3f}  {row['ratio']:5.3f}  "
              f"{row['cosine']:6.3f}")
    record({"guidance_difference": rows, "pairs": args.pairs, "num_images": len(chosen), "seed": args.seed})

    if args.difference_only:
        return
    sampler = GenerationConfig()
    high = [r["ratio"] for r in rows if r["timestep"] >= HIGH_NOISE]
    scales = args.scale or ([sampler.guidance_scale / float(np.mean(high))] if high else [])

    def measure(pipe, scale: float) -> list[dict]:
        return testbed_utility_blocks(pipe, original_vae=base.vae, blocks=args.blocks, num_images=args.num_images,
                                      seed=args.seed, failures=True,
                                      generation=GenerationConfig(guidance_scale=scale))

    t0 = time.perf_counter()
    reference = measure(base, sampler.guidance_scale)
    print(f"{args.model} at guidance {sampler.guidance_scale:g}: {args.blocks} blocks in "
          f"{time.perf_counter() - t0:.0f} s")
    for scale in dict.fromkeys([sampler.guidance_scale, *scales]):  # a scale once, in order
        t0 = time.perf_counter()
        blocks = measure(other, scale)
        print(f"{args.other} at guidance {scale:.3f} ({time.perf_counter() - t0:.0f} s), against the unmitigated "
              f"model at {sampler.guidance_scale:g}:")
        record({"guidance_scale": scale, "blocks": args.blocks, "num_images": args.num_images, "seed": args.seed,
                **paired_report(reference, blocks)})


if __name__ == "__main__":
    main()
