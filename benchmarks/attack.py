"""Dori's cost: loop overhead and UNet evaluations per successful trigger.

1. Overhead: wall time of the optimisation loop (no success checks) against
   ``steps x (time of one bare UNet forward + backward w.r.t. the embedding at the same batch)``,
   measured on the same model in the same run. Target: ratio <= 1.1.
2. Cost per trigger: UNet evaluations per successful trigger with the early stop vs the paper's
   fixed 50 steps x 8 pairs = 400, and the MR both reach. Target: <= 200 at the same MR.

    python benchmarks/attack.py                     # the testbed (NeMo-free, memorized captions, random starts)
    python benchmarks/attack.py --device cuda       # adds an SD 1.4-sized UNet with random weights, bf16, batch 8
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch

from dori.attack import AttackConfig, AttackItem, DiffusionLoss, RandomNormal, dori_kowalczuk2025
from dori.descriptors import TestbedDescriptor
from dori.images import to_tensor
from dori.models import encode_images, load_pipeline, testbed_folder
from dori.prompts import prompts_for
from dori.seeding import item_generator


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def bare_step_time(unet, y: torch.Tensor, latents: torch.Tensor, pairs: int, device: str, repeats: int = 5) -> float:
    """One UNet forward + backward w.r.t. the embedding at batch ``len(y) * pairs``."""
    y = y.detach().repeat_interleave(pairs, 0).requires_grad_(True)
    x = latents.repeat_interleave(pairs, 0)
    t = torch.randint(0, 1000, (len(x),), device=x.device)
    times = []
    for _ in range(repeats + 1):
        sync(device)
        t0 = time.perf_counter()
        out = unet(x, t, encoder_hidden_states=y).sample
        out.float().square().mean().backward()
        sync(device)
        times.append(time.perf_counter() - t0)
        y.grad = None
    return float(np.median(times[1:]))


def loop_time(pipe, targets, y0, steps: int, pairs: int, device: str) -> float:
    """The attack's optimisation loop alone (objective, Adam, projection), as EmbeddingAttack runs it."""
    objective = DiffusionLoss(pipe, pairs=pairs)
    y = torch.nn.Parameter(y0.clone())
    opt = torch.optim.Adam([y], lr=0.1)
    sync(device)
    t0 = time.perf_counter()
    for step in range(steps):
        loss = objective(y, targets, [item_generator("bench", i, step) for i in range(len(y))])
        opt.zero_grad(set_to_none=True)
        loss.sum().backward()
        opt.step()
    sync(device)
    return time.perf_counter() - t0


def testbed(args) -> None:
    pipe = load_pipeline("testbed")
    descriptor = TestbedDescriptor.from_folder(testbed_folder(pipe))
    prompt_set = prompts_for(pipe, "testbed:memorized")
    refs = [prompt_set.references[r.id] for r in prompt_set.records]
    targets = encode_images(pipe, to_tensor(np.stack(refs)))
    items = [AttackItem(r.id, r.prompt, i, k) for k in range(args.restarts) for i, r in enumerate(prompt_set.records)]
    init = RandomNormal(seed=0)
    y0 = torch.stack([init(pipe, it.prompt, it.restart) for it in items]).float()
    goal = targets[[it.index for it in items]]
    pipe.unet.requires_grad_(False)
    t_loop = loop_time(pipe, goal, y0, args.steps, 8, "cpu")
    t_bare = bare_step_time(pipe.unet, y0, goal, 8, "cpu")
    print(f"[testbed] triggers {len(items)}, batch {len(items) * 8}, {args.steps} steps")
    print(f"  loop {t_loop:.2f} s vs {args.steps} x bare fwd+bwd {t_bare * 1000:.1f} ms = {args.steps * t_bare:.2f} s "
          f"-> overhead ratio {t_loop / (args.steps * t_bare):.3f}")
    for early in (False, True):
        attack = dori_kowalczuk2025(pipe, descriptor, refs, initializer=init, seeds=list(range(args.seeds)),
                                    config=AttackConfig(steps=args.steps, record_at=(), early_stop=early,
                                                        check_confirm=args.check_confirm),
                                    check_seeds=args.check_seeds)
        t0 = time.perf_counter()
        results = attack.run(items, targets)
        seconds = time.perf_counter() - t0
        ok = [r for r in results if r.status == "succeeded"]
        evals = sum(r.unet_evaluations for r in results)
        mr = np.mean([r.mr for r in results])
        print(f"  early stop {str(early):5s}: MR {mr:.2f}, {len(ok)}/{len(results)} succeeded, "
              f"{evals / max(len(ok), 1):.0f} UNet evaluations per successful trigger, {seconds:.1f} s with checks")


def sd_sized(args) -> None:
    """SD 1.4's UNet configuration with random weights (the cost does not depend on the weights)."""
    from diffusers import UNet2DConditionModel

    dtype = torch.bfloat16
    unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768, attention_head_dim=8,
                                block_out_channels=(320, 640, 1280, 1280)).to(args.device, dtype).eval()
    unet.requires_grad_(False)
    batch = 1
    y0 = torch.randn(batch, 77, 768, device=args.device, dtype=dtype)
    latents = torch.randn(batch, 4, 64, 64, device=args.device, dtype=dtype)
    t_bare = bare_step_time(unet, y0, latents, 8, args.device)

    class Pipe:
        pass

    from diffusers import DDIMScheduler

    pipe = Pipe()
    pipe.unet = unet
    pipe.scheduler = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    t_loop = loop_time(pipe, latents, y0.float(), args.steps, 8, args.device)
    print(f"[SD 1.4 UNet, random weights, bf16, batch 8, {args.device}] loop {t_loop:.2f} s for {args.steps} steps, "
          f"bare fwd+bwd {t_bare * 1000:.1f} ms, overhead ratio {t_loop / (args.steps * t_bare):.3f}, "
          f"{args.steps / t_loop:.2f} attack steps/s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--restarts", type=int, default=2)
    parser.add_argument("--check-seeds", type=int, default=2)
    parser.add_argument("--check-confirm", type=int, default=2, help="consecutive passing checks before a trigger stops")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.device == "cpu":
        testbed(args)
    else:
        sd_sized(args)


if __name__ == "__main__":
    main()
