"""Which UNet weights carry a utility change: the testbed's utility stage with one weight group of a changed model
put back to the unmitigated model's.

Prints how much each group (:data:`dori.weight_groups.WEIGHT_GROUPS`) of ``--other`` (e.g. a fine-tuned pipeline
folder of the same architecture) moved from ``--model``; then measures, over ``--blocks`` disjoint blocks of
seeds (:func:`dori.utility.testbed_utility_blocks`, with the colour failures), the unmitigated model, the other
model, and for each group the other model with that group (or groups joined by ``+``) reverted (:func:`dori.weight_groups.revert_groups`),
each paired with the unmitigated model (mean difference, 95% Student-t interval), and the share of the other
model's shape-colour loss that the reversion recovers. A hybrid that recovers at least ``--recovered`` of it
is then attacked with a fresh Dori (the demo's ``adversarial-ft+dori`` row, 160 generations), which says
whether the model stays robust without that group's change. One JSON line per model goes to
``<out>/results.jsonl``. docs/testbed.md ("Which weights carry the lost shape colours") has the figures.

    python benchmarks/weight_groups.py --model <build>/pipeline --other <finetuned>/pipeline --out /tmp/wg
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from paired_utility import pair_arguments, paired_report, parse_pair


def main() -> None:
    from dori.weight_groups import WEIGHT_GROUPS

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    pair_arguments(parser)
    parser.add_argument("--groups", default=",".join(WEIGHT_GROUPS),
                        help=f"comma-separated groups to revert one at a time (of {', '.join(WEIGHT_GROUPS)}); "
                             "'a+b' reverts two together")
    parser.add_argument("--recovered", type=float, default=2 / 3,
                        help="attack a hybrid with a fresh Dori when it recovers at least this share of the colour "
                             "loss (above 1: never)")
    parser.add_argument("--out", default="runs/weight-groups")
    args = parse_pair(parser)

    from measure import fresh_dori_row, machine_line

    from dori.descriptors import DescriptorConfig
    from dori.errors import DoriError
    from dori.models import load_pipeline
    from dori.prompts import prompt_kinds
    from dori.utility import testbed_utility_blocks
    from dori.weight_groups import check_groups, group_change, revert_groups

    try:
        reverts = [check_groups([g.strip() for g in item.split("+")], "--groups")
                   for item in args.groups.split(",") if item.strip()]
    except DoriError as e:
        parser.error(str(e))
    print(machine_line("cpu"))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    base, other = load_pipeline(args.model), load_pipeline(args.other)
    print("weight groups: share of the UNet's parameters; relative change ||other - model|| / ||model||")
    for group, change in group_change(other.unet, base.unet).items():
        print(f"  {group:9s} {change['share']:.3f}  {change['relative_change']:.4f}  ({WEIGHT_GROUPS[group]})")

    def measure(pipe) -> list[dict]:
        return testbed_utility_blocks(pipe, original_vae=base.vae, blocks=args.blocks, num_images=args.num_images,
                                      seed=args.seed, failures=True)

    def report(name: str, blocks: list[dict], seconds: float) -> dict:
        print(f"{name} ({seconds:.0f} s)")
        return {"model": name, "base": args.model, "other": args.other, "blocks": args.blocks,
                "num_images": args.num_images, "seed": args.seed, **paired_report(reference, blocks)}

    def write(row: dict) -> None:
        with open(out / "results.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")

    t0 = time.perf_counter()
    reference = measure(base)
    print(f"{args.model}: {args.blocks} blocks in {time.perf_counter() - t0:.0f} s; shapes in the right colours "
          f"{sum(b['shape_accuracy'] for b in reference) / len(reference):.3f}")
    t0 = time.perf_counter()
    whole = report("other", measure(other), time.perf_counter() - t0)
    write(whole)
    loss = -whole["shape_accuracy"]["diff_mean"]
    for groups in reverts:
        group = "+".join(groups)
        t0 = time.perf_counter()
        with revert_groups(other.unet, base.unet, groups):
            row = report(f"other with {group} reverted", measure(other), time.perf_counter() - t0)
            row["recovered"] = (loss + row["shape_accuracy"]["diff_mean"]) / loss if loss > 0 else None
            if loss > 0:
                print(f"  recovers {row['recovered']:.2f} of the other model's colour loss ({loss:.3f})")
            if loss > 0 and row["recovered"] >= args.recovered:
                t0 = time.perf_counter()
                threshold = DescriptorConfig().build(base).threshold
                dori, records = fresh_dori_row(other, out / f"revert-{group}", threshold,
                                               prompt_kinds(base, "testbed:memorized"))
                row["mr_dori"], row["mr_dori_by_kind"] = dori["mr"], dori.get("mr_by_kind")
                row["dori_generations"] = sum(len(r["scores"]) for r in records)
                print(f"  fresh Dori ({time.perf_counter() - t0:.0f} s): MR {dori['mr']:.4f} of "
                      f"{row['dori_generations']} generations; by kind {dori.get('mr_by_kind')}")
        write(row)


if __name__ == "__main__":
    main()
