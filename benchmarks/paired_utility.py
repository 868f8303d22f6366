"""What the benchmarks that compare a changed model's utility with the unmitigated model's share: their
arguments, and each figure paired over the blocks of seeds (mean difference, 95% Student-t interval) with the
commonest colour confusions (``benchmarks/guidance_branches.py``, ``benchmarks/weight_groups.py``).
"""

from __future__ import annotations

import argparse
from collections import Counter

FIGURES = {"shape_accuracy": "shapes in the right colours", "shape_background_wrong": "background wrong",
           "shape_object_missing": "no object", "shape_object_wrong": "object in a wrong colour",
           "fid_vae": "FID (VAE features)"}


def pair_arguments(parser: argparse.ArgumentParser) -> None:
    """``--model`` (the unmitigated model), ``--other`` (the changed pipeline folder), ``--blocks``,
    ``--num-images``, ``--seed``."""
    parser.add_argument("--model", default="testbed", help="the unmitigated model")
    parser.add_argument("--other", required=True, help="the changed model (a pipeline folder)")
    parser.add_argument("--blocks", type=int, default=10)
    parser.add_argument("--num-images", type=int, default=60)
    parser.add_argument("--seed", type=int, default=0)


def parse_pair(parser: argparse.ArgumentParser) -> argparse.Namespace:
    """The parsed arguments, refusing ``--other`` equal to ``--model`` (a model paired with itself)."""
    args = parser.parse_args()
    if args.other == args.model:
        parser.error("--other: give a model other than --model")
    return args


def paired_report(reference: list[dict], blocks: list[dict]) -> dict:
    """Prints each figure of ``blocks`` (a model's utility blocks with the colour failures) paired with
    ``reference``'s (the unmitigated model's, same captions and seeds) and the commonest confusions; returns
    ``{figure: paired spread, "confusions": {...}}``."""
    from dori.utility import paired_spread

    row = {}
    for key, label in FIGURES.items():
        spread = paired_spread([b[key] for b in reference], [b[key] for b in blocks])
        row[key] = spread
        print(f"  {label}: {spread['other_mean']:.3f}; minus unmitigated {spread['diff_mean']:+.3f} "
              f"(95% {spread['diff_low']:+.3f} to {spread['diff_high']:+.3f})")
    confusions = sum((Counter(b["shape_confusions"]) for b in blocks), Counter())
    row["confusions"] = dict(confusions)
    print("  commonest confusions (wanted>drawn: count): "
          + (", ".join(f"{k}: {n}" for k, n in confusions.most_common(6)) or "none"))
    return row
