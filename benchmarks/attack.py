"""Dori's cost: loop overhead and UNet evaluations per successful trigger.

1. Overhead: wall time of the optimisation loop (no success checks) against
   ``steps x (time of one bare UNet forward + backward w.r.t. the embedding at the same batch)``,
   both the median of ``--repeats`` runs on the same model in the same process. Target: <= 1.05.
2. Cost per trigger: UNet evaluations per successful trigger with each early-stop policy against the
   paper's fixed 50 steps x 8 pairs = 400, and the MR each reaches, over ``4 photos x --restarts``
   random starts (32 at the defaults). Target: <= 100 at the fixed schedule's MR.

    python benchmarks/attack.py                     # the testbed (NeMo-free, memorized captions, random starts)
    python benchmarks/attack.py --device cuda       # an SD 1.4-sized UNet with random weights, bf16, 64x64 latents
    python benchmarks/attack.py --sd14 --steps 5    # the same on CPU, fp32, 16x16 latents (128 px)
"""

from __future__ import annotations

import argparse
import os
import time
from dataclasses import replace

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch
from measure import Timing, machine_line, ratio_range, timed

from dori.attack import AttackConfig, AttackItem, DiffusionLoss, RandomNormal, dori_kowalczuk2025
from dori.descriptors import TestbedDescriptor
from dori.images import to_tensor
from dori.models import encode_images, load_pipeline, testbed_folder
from dori.prompts import prompts_for
from dori.seeding import item_generator

POLICIES = {
    # name: (AttackConfig fields, recipe keywords)
    "fixed 50 steps (the paper)": ({"early_stop": False}, {}),
    "early stop, checks every 5 steps, 2 passes in a row": (
        {"early_stop": True, "check_every": 5, "check_confirm": 2, "check_margin": 0.1}, {"check_seeds": 2}),
    "early stop, checks every 4 steps, 1 pass + 6 steps": (
        {"early_stop": True, "check_every": 4, "check_confirm": 1, "check_margin": 0.3, "check_tail": 6},
        {"check_seeds": 1}),
}


def bare_step_time(unet, y: torch.Tensor, latents: torch.Tensor, pairs: int, device: str, repeats: int = 5) -> Timing:
    """One UNet forward + backward w.r.t. the embedding at batch ``len(y) * pairs``."""
    y = y.detach().repeat_interleave(pairs, 0).requires_grad_(True)
    x = latents.repeat_interleave(pairs, 0)
    t = torch.randint(0, 1000, (len(x),), generator=torch.Generator().manual_seed(0)).to(x.device)

    def once():
        out = unet(x, t, encoder_hidden_states=y).sample
        out.float().square().mean().backward()
        y.grad = None

    return timed(once, repeats=repeats, device=device, warmup=1)


def loop_time(pipe, targets, y0, steps: int, pairs: int, device: str, repeats: int) -> Timing:
    """The attack's optimisation loop alone (objective, Adam, projection), as EmbeddingAttack runs it."""
    objective = DiffusionLoss(pipe, pairs=pairs)

    def once():
        y = torch.nn.Parameter(y0.clone())
        opt = torch.optim.Adam([y], lr=0.1)
        for step in range(steps):
            loss = objective(y, targets, [item_generator("bench", i, step) for i in range(len(y))])
            opt.zero_grad(set_to_none=True)
            loss.sum().backward()
            opt.step()

    return timed(once, repeats=repeats, device=device)


def testbed(args) -> None:
    pipe = load_pipeline("testbed")
    descriptor = TestbedDescriptor.from_folder(testbed_folder(pipe))
    prompt_set = prompts_for(pipe, "testbed:memorized")
    refs = [prompt_set.references[r.id] for r in prompt_set.records]
    targets = encode_images(pipe, to_tensor(np.stack(refs)))
    init = RandomNormal(seed=args.init_seed)
    pipe.unet.requires_grad_(False)
    print(machine_line("cpu"))
    for restarts in sorted({2, args.restarts}):
        items = [AttackItem(r.id, r.prompt, i, k) for k in range(restarts) for i, r in enumerate(prompt_set.records)]
        y0 = torch.stack([init(pipe, it.prompt, it.restart) for it in items]).float()
        goal = targets[[it.index for it in items]]
        t_loop = loop_time(pipe, goal, y0, args.steps, 8, "cpu", args.repeats)
        t_bare = bare_step_time(pipe.unet, y0, goal, 8, "cpu", repeats=max(5, args.repeats))
        steps_bare = Timing(tuple(args.steps * r for r in t_bare.runs))
        print(f"[testbed] overhead at batch {len(items) * 8} ({len(items)} triggers x 8 pairs), {args.steps} steps: "
              f"loop {t_loop} vs {args.steps} x bare fwd+bwd {steps_bare} -> ratio {ratio_range(t_loop, steps_bare)}")
    items = [AttackItem(r.id, r.prompt, i, k) for k in range(args.restarts) for i, r in enumerate(prompt_set.records)]
    print(f"[testbed] cost per trigger: {len(items)} triggers ({len(refs)} photos x {args.restarts} random starts, "
          f"init seed {args.init_seed}), {args.seeds} evaluation seeds")
    for name, (fields, keywords) in POLICIES.items():
        config = replace(AttackConfig(steps=args.steps, record_at=()), **fields)
        attack = dori_kowalczuk2025(pipe, descriptor, refs, initializer=init, seeds=list(range(args.seeds)),
                                    config=config, **keywords)
        t0 = time.perf_counter()
        results = attack.run(items, targets)
        seconds = time.perf_counter() - t0
        ok = [r for r in results if r.status == "succeeded"]
        evals = sum(r.unet_evaluations for r in results)
        mr = np.mean([r.mr for r in results])
        print(f"  {name:55s}: MR {mr:.3f}, {len(ok)}/{len(results)} succeeded, "
              f"{evals / max(len(ok), 1):5.1f} UNet evaluations per successful trigger, "
              f"mean stop step {np.mean([r.steps_run for r in results]):4.1f}, {seconds:.1f} s with checks")


def sd_sized(args) -> None:
    """SD 1.4's UNet configuration with random weights (the cost does not depend on the weights)."""
    from diffusers import UNet2DConditionModel

    dtype = torch.float32 if args.device == "cpu" else torch.bfloat16
    latent = args.latent or (16 if args.device == "cpu" else 64)
    unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768, attention_head_dim=8,
                                block_out_channels=(320, 640, 1280, 1280)).to(args.device, dtype).eval()
    unet.requires_grad_(False)
    batch = 1
    y0 = torch.randn(batch, 77, 768, device=args.device, dtype=dtype)
    latents = torch.randn(batch, 4, latent, latent, device=args.device, dtype=dtype)
    print(machine_line(args.device))
    t_bare = bare_step_time(unet, y0, latents, 8, args.device, repeats=max(5, args.repeats))

    class Pipe:
        pass

    from diffusers import DDIMScheduler

    pipe = Pipe()
    pipe.unet = unet
    pipe.scheduler = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    t_loop = loop_time(pipe, latents, y0.float(), args.steps, 8, args.device, args.repeats)
    steps_bare = Timing(tuple(args.steps * r for r in t_bare.runs))
    print(f"[SD 1.4 UNet, random weights, {str(dtype)[6:]}, batch 8, {latent}x{latent} latents, {args.device}] "
          f"loop {t_loop} for {args.steps} steps, "
          f"bare fwd+bwd x {args.steps} {steps_bare}, overhead ratio {ratio_range(t_loop, steps_bare)}, "
          f"{args.steps / t_loop.median:.2f} attack steps/s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--restarts", type=int, default=8, help="random starts per photo (4 photos)")
    parser.add_argument("--init-seed", type=int, default=1, help="seed of the random starts")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats of the loop (median)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--sd14", action="store_true", help="the SD 1.4-sized UNet also on CPU")
    parser.add_argument("--latent", type=int, default=None, help="latent side of the SD-sized run (CPU 16, GPU 64)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.device == "cpu" and not args.sd14:
        testbed(args)
    else:
        sd_sized(args)


if __name__ == "__main__":
    main()
