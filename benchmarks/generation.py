"""Images per second: dori's batched, per-image-seeded generation vs a plain ``pipe(prompt, generator=...)`` loop.

Both produce the same images (same model, prompts, seeds and steps); the script checks that and
prints both rates and their ratio.

    python benchmarks/generation.py                      # the shipped testbed
    python benchmarks/generation.py --model PATH --device cuda --steps 50 --batch-size 8
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

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
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    pipe = load_pipeline(args.model, device=args.device)
    records = prompts_for(pipe, args.prompts).records
    records = records[:: max(1, len(records) // args.n_prompts)][: args.n_prompts]
    prompts = [r.prompt for r in records for _ in range(args.seeds)]
    seeds = [s for _ in records for s in range(args.seeds)]
    config = GenerationConfig(num_inference_steps=args.steps, guidance_scale=args.guidance, batch_size=args.batch_size)
    generate(pipe, seeds[:2], prompts[:2], config=config)  # warm-up

    def sync():
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()

    sync()
    t0 = time.perf_counter()
    ours = generate(pipe, seeds, prompts, config=config).images
    sync()
    t_ours = time.perf_counter() - t0

    t0 = time.perf_counter()
    plain = []
    for prompt, seed in zip(prompts, seeds, strict=True):
        out = pipe(prompt, num_inference_steps=args.steps, guidance_scale=args.guidance,
                   generator=torch.Generator().manual_seed(seed), output_type="pt").images
        plain.append(out.float().cpu())
    sync()
    t_plain = time.perf_counter() - t0
    plain = torch.cat(plain)

    n = len(prompts)
    diff = (ours - plain).abs().max().item()
    print(f"model {args.model}  images {n} ({len(records)} prompts x {args.seeds} seeds)  steps {args.steps}  "
          f"guidance {args.guidance}  device {args.device}  threads {torch.get_num_threads()}")
    print(f"dori batched (batch {args.batch_size}): {n / t_ours:8.2f} images/s  ({t_ours:.2f} s)")
    print(f"plain pipe() loop:        {n / t_plain:8.2f} images/s  ({t_plain:.2f} s)")
    print(f"speed-up: {t_plain / t_ours:.2f}x   max |pixel difference| {diff:.2e}")


if __name__ == "__main__":
    main()
