"""One point of an unlearning baseline's testbed sweep: fit the method as `dori demo` does (its testbed
setting, with changes), then the demo's Table 2 stages (MR on the memorized captions, 10 seeds; Dori from
the prompt, 10 seeds) and the testbed's utility (60 shape captions) with its concept damage.

    python benchmarks/unlearning_sweep.py concept-ablation --set lr=1e-5 --out runs/sweep-ca-1e-5
    python benchmarks/unlearning_sweep.py siss --set scaling_norm=1

Prints one JSON line (docs/methods.md's sweep tables come from it).
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

from measure import machine_line, parse_value


def main() -> None:
    from dori.demo import UNLEARNING, DemoConfig, _Demo
    from dori.mitigations import mitigated
    from dori.mitigations.base import load_for
    from dori.models import load_pipeline
    from dori.runs import RunFolder
    from dori.utility import testbed_concept, testbed_utility

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("method", choices=list(UNLEARNING))
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="Change a setting of the method's testbed setting (repeatable).")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    changes = {k: parse_value(v) for k, v in (item.split("=", 1) for item in args.set)}
    field = args.method.replace("-", "_")
    pipe = load_pipeline("testbed")
    base = DemoConfig()
    config = replace(base, unlearning=(args.method,), finetune_cache=False,
                     **{field: replace(getattr(base, field), **changes)})
    out = args.out or Path("runs") / f"sweep-{args.method}-{time.strftime('%Y%m%d-%H%M%S')}"
    run = RunFolder(out, "unlearning-sweep", {"method": args.method, "changes": changes})
    demo = _Demo(pipe, config, run, None)
    demo.threshold = config.descriptor.build(pipe).threshold
    t0 = time.perf_counter()
    rows = demo.unlearned()
    seconds = time.perf_counter() - t0
    _, baseline = testbed_concept(pipe, seed=config.seed + 1000)
    with mitigated(pipe, load_for(pipe, rows[0]["mitigation"])):
        utility = testbed_utility(pipe, original_vae=pipe.vae, num_images=60, seed=config.seed)
        utility.update(testbed_concept(pipe, baseline=baseline, original_vae=pipe.vae, seed=config.seed)[0])
    print(machine_line())
    print(json.dumps({"method": args.method, "changes": changes, "mr": rows[0]["mr"], "dori_mr": rows[1]["mr"],
                      "utility": utility, "seconds_fit_evaluate_attack": round(seconds, 1)}))


if __name__ == "__main__":
    main()
