"""Where the time goes: torch-profiler tables of the attack loop, NeMo's localisation and batched
generation on the testbed, the first step of making them faster (``docs/profile.md``).

For each workload it prints the wall time, the share spent inside the UNet's forward and backward
(the floor any implementation pays) and the top operators by self CPU time, so that what remains
(Python, optimiser, projections, SSIM, VAE, text encoding) can be read off.

    python benchmarks/profiles.py                  # all three
    python benchmarks/profiles.py --only attack    # one of attack, nemo, generation
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch
from measure import machine_line
from torch.profiler import ProfilerActivity, profile, record_function


def unet_timed(unet):
    """Wrap the UNet's forward in a profiler range so its share (forward, and backward through it) shows."""
    forward = unet.forward

    def wrapped(*args, **kwargs):
        with record_function("unet.forward"):
            return forward(*args, **kwargs)

    unet.forward = wrapped
    return lambda: setattr(unet, "forward", forward)


def report(name: str, prof, wall: float, rows: int) -> None:
    events = prof.key_averages()
    by_name = {e.key: e for e in events}
    unet = by_name.get("unet.forward")
    unet_ms = unet.cpu_time_total / 1000 if unet else 0.0
    backward_ms = sum(e.cpu_time_total for e in events if e.key.startswith("autograd::engine::evaluate_function"))
    print(f"\n== {name}: {wall:.2f} s wall; inside UNet forward {unet_ms / 1000:.2f} s "
          f"({unet_ms / 10 / wall:.0f}%), autograd backward nodes {backward_ms / 1e6:.2f} s")
    print(events.table(sort_by="self_cpu_time_total", row_limit=rows, max_name_column_width=60))


def attack(pipe, rows: int, steps: int) -> None:
    from dori.attack import DiffusionLoss, RandomNormal
    from dori.images import to_tensor
    from dori.models import encode_images
    from dori.prompts import prompts_for
    from dori.seeding import item_generator

    prompt_set = prompts_for(pipe, "testbed:memorized")
    targets = encode_images(pipe, to_tensor(np.stack([prompt_set.references[r.id] for r in prompt_set.records])))
    init = RandomNormal(seed=0)
    y = torch.nn.Parameter(torch.stack([init(pipe, r.prompt, 0) for r in prompt_set.records] * 2).float())
    goal = torch.cat([targets, targets])
    objective = DiffusionLoss(pipe, pairs=8)
    optimizer = torch.optim.Adam([y], lr=0.1)

    def step(k: int) -> None:
        loss = objective(y, goal, [item_generator("profile", i, k) for i in range(len(y))])
        optimizer.zero_grad(set_to_none=True)
        loss.sum().backward()
        optimizer.step()

    step(-1)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        for k in range(steps):
            step(k)
        wall = time.perf_counter() - t0
    report(f"attack loop: {len(y)} triggers x 8 pairs, {steps} steps", prof, wall, rows)


def nemo(pipe, rows: int) -> None:
    from dori.mitigations.nemo import NeMo, NeMoConfig, statistics_prompts
    from dori.prompts import prompts_for

    config = NeMoConfig()
    prompts = [r.prompt for r in prompts_for(pipe, "testbed:memorized").records]
    stats = statistics_prompts(config.statistics, pipe)
    NeMo.localize(pipe, prompts[:1], config, statistics_prompts=stats)  # statistics and threshold cached
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        NeMo.localize(pipe, prompts, config, statistics_prompts=stats)
        wall = time.perf_counter() - t0
    report(f"NeMo localisation: {len(prompts)} prompts (statistics and threshold cached)", prof, wall, rows)


def generation(pipe, rows: int) -> None:
    from dori.generation import GenerationConfig, generate
    from dori.prompts import prompts_for

    prompts = [r.prompt for r in prompts_for(pipe, "testbed:memorized").records] * 4
    config = GenerationConfig(batch_size=16)
    generate(pipe, list(range(2)), prompts[:2], config=config)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        generate(pipe, list(range(len(prompts))), prompts, config=config)
        wall = time.perf_counter() - t0
    report(f"generation: {len(prompts)} images, {config.num_inference_steps} steps, batch {config.batch_size}",
           prof, wall, rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=("attack", "nemo", "generation"))
    parser.add_argument("--rows", type=int, default=15)
    parser.add_argument("--steps", type=int, default=10, help="Attack steps profiled.")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from dori.models import load_pipeline

    print(machine_line("cpu"))
    pipe = load_pipeline("testbed")
    restore = unet_timed(pipe.unet)
    try:
        for name, run in (("attack", lambda: attack(pipe, args.rows, args.steps)), ("nemo", lambda: nemo(pipe, args.rows)),
                          ("generation", lambda: generation(pipe, args.rows))):
            if args.only in (None, name):
                run()
    finally:
        restore()


if __name__ == "__main__":
    main()
