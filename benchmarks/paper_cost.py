"""What the paper's Table 1 and Table 2 cost with dori's defaults, from counted UNet evaluations and the
measured time of one UNet call (``benchmarks/sd_scale.py`` or ``benchmarks/gpu.py`` figures).

    python benchmarks/paper_cost.py runs/sd-scale/figures.json [--prompts 500] [--size-factor 4]

Counts are UNet *samples* (one latent through the UNet once; a call on a batch of 8 is 8 samples),
split into forward-only samples (generation, NeMo's tests) and forward+backward samples (the attack,
fine-tuning). Seconds per sample are the measured batch-8 call time / 8. ``--size-factor`` scales a
measurement at 256x256 to 512x512 (the UNet's cost grows about 4x with 4x the latent positions; the
attention more): the result is then an estimate, and says so.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

SEEDS, STEPS, CFG = 10, 50, 2          # NeMo's generation protocol (paper-sd1 preset)
DORI_STEPS, PAIRS = 50, 8               # the attack (section 2.1)
CHECKS = 5                              # success checks after 0, 1, 10, 25, 50 steps (the last is the final one)
NEMO_SAMPLES = 10 + 28 * 10             # detection (10 seeds) + ~28 search calls of ~10 seeds (testbed count)
WANDA_SAMPLES = 2 * (STEPS * CFG)       # the target prompt's and its paired "" run, 50 calls each with CFG
STARTS, MEMORIZED = 100, 100            # locality analyses (sections 2.2-2.4)
FT_EPOCHS, FT_BATCH = 5, 8              # adversarial fine-tuning (section 2.6): images per step
ESD_ITERATIONS = 200                    # ESD (esd_sd.py): steps per caption, batch 1
ESD_SAMPLING = (STEPS - 1) / 2 * CFG    # its x_t: a guided sampling to a step drawn from 0..49 (24.5 on average)
CA_PARAPHRASES, CA_SCORE_IMAGES = 30, 10  # Concept Ablation: ~30 paraphrases scored with 10 images each (25 steps)
CA_IMAGES, CA_GEN_STEPS = 1000, 25      # its anchor images per caption, 25 guided steps
CA_ITERATIONS, CA_BATCH = 400, 2        # its steps per caption: batch 2 (+2 prior, +2 gradient-free anchor calls)
SISS_KEEP = 64                          # SISS: keep-set generations per caption (25 guided steps)
SISS_DRAWS = 35 * 16                    # its 35 updates x 16 draws per caption (one forward, two backward each)


def stages(n: int, nonmem: int) -> list[tuple[str, str, int, int]]:
    """``(table, stage, forward samples, forward+backward samples)`` for ``n`` memorized prompts."""
    gen = SEEDS * STEPS * CFG                            # one prompt's 10 images
    check = SEEDS * STEPS * CFG                          # one success check of one trigger
    attack_fb, attack_f = DORI_STEPS * PAIRS, CHECKS * check
    ft_steps = FT_EPOCHS * -(-n // FT_BATCH)
    return [
        ("1", "generate memorized (10 images each)", n * gen, 0),
        ("1", "generate non-memorized", nonmem * gen, 0),
        ("1", "NeMo: localise (threshold fixed)", n * NEMO_SAMPLES, 0),
        ("1", "NeMo: generate mitigated + unmitigated (SSCD_gen)", 2 * n * gen, 0),
        ("1", "Wanda: score (set scope)", n * WANDA_SAMPLES, 0),
        ("1", "Wanda: generate mitigated + unmitigated", 2 * n * gen, 0),
        ("1", "Dori vs NeMo (MR after 0/1/10/25/50 steps)", n * attack_f, n * attack_fb),
        ("1", "Dori vs Wanda", n * attack_f, n * attack_fb),
        ("1", "Dori vs non-memorized (control)", nonmem * attack_f, nonmem * attack_fb),
        ("A-C", "scatter: 100 random starts of one image", STARTS * 2 * check, STARTS * attack_fb),
        ("A-C", "activations (one call per embedding)", STARTS + MEMORIZED, 0),
        ("A-C", "weights: NeMo and Wanda per embedding", (STARTS + MEMORIZED) * (NEMO_SAMPLES + WANDA_SAMPLES // 2), 0),
        ("2", "adversarial fine-tuning: Dori inside every step", 0, ft_steps * FT_BATCH * attack_fb),
        ("2", "adversarial fine-tuning: the weight updates", 0, ft_steps * (FT_BATCH * PAIRS + FT_BATCH)),
        ("2", "generate with the fine-tuned model", n * gen, 0),
        ("2", "fresh Dori on it (prompt and N(0, I) starts)", 2 * n * attack_f, 2 * n * attack_fb),
        ("2", "ESD: 200 steps per caption (sampling x_t, e_c, e_0)", int(n * ESD_ITERATIONS * (ESD_SAMPLING + 2)),
         n * ESD_ITERATIONS),
        ("2", "ESD: generate with the erased model", n * gen, 0),
        ("2", "Dori vs ESD", n * attack_f, n * attack_fb),
        ("2", "Concept Ablation: score paraphrases", n * CA_PARAPHRASES * CA_SCORE_IMAGES * CA_GEN_STEPS * CFG, 0),
        ("2", "Concept Ablation: 1000 anchor images per caption", n * CA_IMAGES * CA_GEN_STEPS * CFG, 0),
        ("2", "Concept Ablation: 400 steps per caption", n * CA_ITERATIONS * CA_BATCH, n * CA_ITERATIONS * 2 * CA_BATCH),
        ("2", "Concept Ablation: generate with the ablated model", n * gen, 0),
        ("2", "Dori vs Concept Ablation", n * attack_f, n * attack_fb),
        ("2", "SISS: keep-set generations", n * SISS_KEEP * CA_GEN_STEPS * CFG, 0),
        ("2", "SISS: 35 updates of 16 draws per caption (2 backward: counted twice)", 0, n * SISS_DRAWS * 2),
        ("2", "SISS: generate with the unlearned model", n * gen, 0),
        ("2", "Dori vs SISS", n * attack_f, n * attack_fb),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("figures", type=Path)
    parser.add_argument("--prompts", type=int, default=500, help="Memorized prompts (Webster's 500; the VM set: 112).")
    parser.add_argument("--non-memorized", type=int, default=500)
    parser.add_argument("--size-factor", type=float, default=1.0,
                        help="Multiply the measured per-sample times (e.g. 4: 256x256 measured, 512x512 wanted).")
    args = parser.parse_args()
    figures = json.loads(args.figures.read_text())
    per = {(row["call"], row["batch"]): row["seconds"] for row in figures["unet"]}
    fwd, fb = per[("forward", 8)] / 8 * args.size_factor, per[("forward+backward", 8)] / 8 * args.size_factor
    machine = figures["machine"]
    kind = "measured per call" if args.size_factor == 1 else f"estimate: measured per call x {args.size_factor:g}"
    print(f"device {machine['device']} ({machine['dtype']}), {figures['size']}x{figures['size']} measured; "
          f"{fwd:.3f} s per forward sample, {fb:.3f} s per forward+backward sample ({kind})")
    print("\n| table | stage | forward samples | forward+backward samples | hours |\n| --- | --- | --- | --- | --- |")
    totals: dict[str, float] = {}
    for table, stage, f, b in stages(args.prompts, args.non_memorized):
        hours = (f * fwd + b * fb) / 3600
        totals[table] = totals.get(table, 0.0) + hours
        print(f"| {table} | {stage} | {f:,} | {b:,} | {hours:,.1f} |")
    for table, hours in totals.items():
        print(f"| {table} | **total** | | | **{hours:,.1f}** |")


if __name__ == "__main__":
    main()
