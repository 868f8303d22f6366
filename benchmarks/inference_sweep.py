"""One point of an inference-time mitigation's testbed sweep: MR on the memorized captions (10 seeds, as the
demo) and the testbed's utility (60 shape-caption images) with the mitigation applied.

    python benchmarks/inference_sweep.py wen --set target_loss=0.9
    python benchmarks/inference_sweep.py ren --set scale=2 --set mask=false

Prints the machine line and one JSON line (docs/methods.md's sweep tables come from it).
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace

from measure import machine_line, parse_value


def main() -> None:
    from dori.descriptors import DescriptorConfig
    from dori.generation import generate
    from dori.memorization import score_images
    from dori.mitigations import MITIGATIONS, mitigated
    from dori.models import load_pipeline
    from dori.prompts import prompts_for
    from dori.robustness import INFERENCE, RobustnessConfig
    from dori.utility import testbed_utility

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("method", choices=list(INFERENCE))
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE")
    args = parser.parse_args()
    changes = {k: parse_value(v) for k, v in (item.split("=", 1) for item in args.set)}
    pipe = load_pipeline("testbed")
    settings = replace(RobustnessConfig().settings(args.method), **changes)
    mitigation = MITIGATIONS.get(args.method).fit(pipe, None, settings)
    memorized = prompts_for(pipe, "testbed:memorized")
    seeds = list(range(10))
    prompts = [r.prompt for r in memorized.records for _ in seeds]
    references = [memorized.references[r.id] for r in memorized.records for _ in seeds]
    descriptor = DescriptorConfig().build(pipe)
    t0 = time.perf_counter()
    with mitigated(pipe, mitigation):
        images = generate(pipe, seeds * len(memorized.records), prompts).images
        utility = testbed_utility(pipe, original_vae=pipe.vae, num_images=60, seed=0)
    scores = score_images(descriptor, images, references).sscd_orig
    print(machine_line())
    print(json.dumps({"method": args.method, "settings": settings.to_dict(),
                      "mr": float((scores > descriptor.threshold).mean()),
                      "shape_accuracy": utility["shape_accuracy"], "fid_vae": utility["fid_vae"],
                      "seconds": round(time.perf_counter() - t0, 1)}))


if __name__ == "__main__":
    main()
