"""Images per second: dori's batched, per-image-seeded generation vs a plain ``pipe(prompt, generator=...)`` loop.

Both produce the same images (same model, prompts, seeds and steps); the script checks that and
prints both rates (medians of ``--repeats`` runs, with their range) and their ratio.

    python benchmarks/generation.py                      # the shipped testbed
    python benchmarks/generation.py --model PATH --device cuda --steps 50 --batch-size 8
    python benchmarks/generation.py --model ~/.cache/dori/sd-shaped/sd14-64 --prompts laion-nonmem \
        --size 128 --n-prompts 2 --seeds 2 --steps 10 --batch-size 4      # SD 1.4's shape on CPU, 128 px
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from measure import machine_line, ratio_range, timed

from dori.generation import GenerationConfig, generate
from dori.models import load_pipeline
from dori.prompts import prompts_for


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="testbed")
    parser.add_argument("--prompts", default="testbed")
    parser.add_argument("--n-prompts", type=int, default=16)
    parser.add_argument("--seeds", type=int, default=4)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--guidance", type=float, default=7.5)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each (median)")
    parser.add_argument("--size", type=int, default=None, help="image side in pixels (default: the model's)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    pipe = load_pipeline(args.model, device=args.device)
    records = prompts_for(pipe, args.prompts).records
    records = records[:: max(1, len(records) // args.n_prompts)][: args.n_prompts]
    prompts = [r.prompt for r in records for _ in range(args.seeds)]
    seeds = [s for _ in records for s in range(args.seeds)]
    config = GenerationConfig(num_inference_steps=args.steps, guidance_scale=args.guidance, batch_size=args.batch_size,
                              height=args.size, width=args.size)
    generate(pipe, seeds[:2], prompts[:2], config=config)  # warm-up
    out: dict[str, torch.Tensor] = {}

    def ours():
        out["ours"] = generate(pipe, seeds, prompts, config=config).images

    def plain():
        images = []
        for prompt, seed in zip(prompts, seeds, strict=True):
            images.append(pipe(prompt, num_inference_steps=args.steps, guidance_scale=args.guidance,
                               height=args.size, width=args.size,
                               generator=torch.Generator().manual_seed(seed), output_type="pt").images.float().cpu())
        out["plain"] = torch.cat(images)

    t_ours = timed(ours, repeats=args.repeats, device=args.device)
    t_plain = timed(plain, repeats=args.repeats, device=args.device)
    n = len(prompts)
    diff = (out["ours"] - out["plain"]).abs().max().item()
    print(machine_line(args.device))
    print(f"model {args.model}  images {n} ({len(records)} prompts x {args.seeds} seeds)  steps {args.steps}  "
          f"guidance {args.guidance}  size {args.size or 'default'}")
    print(f"dori batched (batch {args.batch_size}): {n / t_ours.median:8.2f} images/s  ({t_ours})")
    print(f"plain pipe() loop:        {n / t_plain.median:8.2f} images/s  ({t_plain})")
    print(f"speed-up: {ratio_range(t_plain, t_ours)}x   max |pixel difference| {diff:.2e}")


if __name__ == "__main__":
    main()
