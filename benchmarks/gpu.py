"""Stable Diffusion v1.4's shape on a GPU (random weights, bfloat16, 512x512): what the paper's stages cost
per call, in one run of a few minutes.

    python benchmarks/gpu.py                     # --device cuda --dtype bfloat16 by default
    python benchmarks/gpu.py --compile           # the same with torch.compile on the UNet

Prints: the machine; the bare UNet forward+backward (gradient to the conditioning only) against one
Dori step at the same batch (8 (noise, t) pairs: the overhead ratio); NeMo's memorization test and one batch of
search levels per prompt (UNet calls and seconds); batched generation against the plain diffusers pipeline loop (images/s,
same images). Medians of ``--repeats`` runs with their spread.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch


def timed(fn, repeats: int, sync) -> tuple[float, float, float]:
    """(median, min, max) seconds of ``fn`` over ``repeats`` runs after one warm-up."""
    fn()
    sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), min(times), max(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--images", type=int, default=8, help="Images for the generation comparison.")
    parser.add_argument("--steps", type=int, default=50, help="Sampling steps of the generation comparison.")
    parser.add_argument("--compile", action="store_true", help="torch.compile the UNet first.")
    args = parser.parse_args()

    from dori.attack.parts import DiffusionLoss
    from dori.generation import GenerationConfig, generate
    from dori.hooks import counting_calls
    from dori.mitigations.nemo import NeMo, NeMoConfig
    from dori.models import load_pipeline, parse_dtype
    from dori.sd_shapes import build_sd_shaped, shaped_folder
    from dori.seeding import item_generator

    cuda = args.device.startswith("cuda")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    name = torch.cuda.get_device_name() if cuda else f"{platform.machine()} CPU, {torch.get_num_threads()} threads"
    print(f"machine: {name}; torch {torch.__version__}; {args.dtype}; {args.size}x{args.size}; "
          f"compile {args.compile}; repeats {args.repeats}", flush=True)
    folder = build_sd_shaped("sd14", shaped_folder(f"sd14-{args.size}"), sample_size=args.size // 8)
    pipe = load_pipeline(folder, device=args.device, dtype=parse_dtype(args.dtype), scheduler="DDIMScheduler")
    if args.compile:
        pipe.unet = torch.compile(pipe.unet)
    unet, latent = pipe.unet, args.size // 8

    # 1. bare forward+backward vs one Dori step (batch 8: one trigger, 8 (noise, t) pairs)
    x = torch.randn(8, 4, latent, latent, device=args.device, dtype=unet.dtype)
    t = torch.randint(0, 1000, (8,), device=args.device)
    y = torch.randn(1, 77, 768, device=args.device, dtype=unet.dtype)

    def bare():
        cond = y.expand(8, -1, -1).clone().requires_grad_(True)
        unet(x, t, encoder_hidden_states=cond).sample.float().pow(2).mean().backward()

    objective = DiffusionLoss(pipe, pairs=8)
    target = torch.randn(1, 4, latent, latent)
    trigger = torch.nn.Parameter(y.float().clone())
    optimizer = torch.optim.Adam([trigger], lr=0.1)
    step = {"k": 0}

    def dori_step():
        step["k"] += 1
        loss = objective(trigger, target, [item_generator("gpu-bench", step["k"])])
        optimizer.zero_grad(set_to_none=True)
        loss.sum().backward()
        optimizer.step()

    b = timed(bare, args.repeats, sync)
    d = timed(dori_step, args.repeats, sync)
    print(f"bare UNet forward+backward, batch 8: {b[0] * 1000:.1f} ms ({b[1] * 1000:.1f}-{b[2] * 1000:.1f})")
    print(f"one Dori step (8 pairs):             {d[0] * 1000:.1f} ms ({d[1] * 1000:.1f}-{d[2] * 1000:.1f}); "
          f"overhead ratio {d[0] / b[0]:.3f}", flush=True)

    # 2. NeMo per prompt. Random weights make every seed look memorized and no level of the search
    # reaches the threshold, so the whole search (up to max_k levels, then a refinement neuron by
    # neuron) is no real model's cost: time the memorization test and one batch of 8 search levels
    # (one UNet call), what a real prompt's search costs per ``search_batch`` levels.
    config = NeMoConfig(ssim_threshold=0.428, ms_ssim_betas="official", seed_draws="official", min_theta=3.0,
                        refine=False)
    prompts = ["The No Limits Business Woman Podcast", "Director Danny Boyle Is Headed To TV With FX Deal"]
    with counting_calls(unet) as counter:
        t0 = time.perf_counter()
        nemo = NeMo.localize(pipe, prompts, config, statistics_prompts=["a photo", "a painting", "a drawing"])
        sync()
        seconds = time.perf_counter() - t0
    print(f"NeMo test + 8 search levels: {seconds / len(prompts):.2f} s and {counter.calls / len(prompts):.1f} UNet "
          f"calls per prompt, statistics of 3 prompts included ({sum(r.memorized for r in nemo.results)} of "
          f"{len(prompts)} flagged by the test)", flush=True)

    # 3. batched generation vs the plain pipeline loop, same seeds
    prompt_list = [prompts[i % 2] for i in range(args.images)]
    seeds = list(range(args.images))
    gen = GenerationConfig(num_inference_steps=args.steps, guidance_scale=7.0, batch_size=args.images)
    t0 = time.perf_counter()
    ours = generate(pipe, seeds, prompt_list, config=gen).images
    sync()
    t_ours = time.perf_counter() - t0
    t0 = time.perf_counter()
    plain = torch.cat([pipe(p, num_inference_steps=args.steps, guidance_scale=7.0,
                            generator=torch.Generator().manual_seed(s), output_type="pt").images.float().cpu()
                       for p, s in zip(prompt_list, seeds, strict=True)])
    sync()
    t_plain = time.perf_counter() - t0
    print(f"generation, {args.images} images x {args.steps} steps: batched {args.images / t_ours:.2f} images/s, plain "
          f"loop {args.images / t_plain:.2f} images/s, speed-up {t_plain / t_ours:.2f}x, max |pixel difference| "
          f"{(ours - plain).abs().max():.2e}")


if __name__ == "__main__":
    main()
