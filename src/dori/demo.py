"""``dori demo``: the paper's story on the embedded testbed, written to one run folder.

This issue's part: evaluate the memorized, seen-once, shape and held-out captions of the testbed and
write ``summary.json``, a list of rows ``{"name", "n", "sscd_mean", "sscd_std", "mr", ...}``.

What each row's similarity is measured against:

* ``memorized``: the caption's own training photo (SSCD_orig);
* ``seen-once``: the caption's own training crop (SSCD_orig, the paper's "non-memorized" row);
* ``shape``: the trained drawings; ``held-out``: captions never trained on. Neither has a training
  image that could be copied, so their similarity is to the *closest memorized photo* (the only
  thing they could replicate). ``mr_gallery`` in every row is the share of generations that
  replicate any memorized photo.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .evaluate import EvaluateConfig, run_evaluate
from .generation import GenerationConfig
from .memorization import summary_row
from .runs import RunFolder, default_run_dir

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DemoGroup:
    name: str
    prompts: str
    num_seeds: int
    limit: int | None
    score: str


@dataclass(frozen=True)
class DemoConfig:
    model: str = "testbed"
    seed: int = 0
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    groups: tuple[DemoGroup, ...] = (
        DemoGroup("memorized", "testbed:memorized", 10, None, "sscd_orig"),
        DemoGroup("seen-once", "testbed:seen-once", 2, 40, "sscd_orig"),
        DemoGroup("shape", "testbed:shape", 1, 40, "gallery_max"),
        DemoGroup("held-out", "testbed:held-out", 2, None, "gallery_max"),
    )

    def to_dict(self) -> dict:
        return asdict(self)


def run_demo(config: DemoConfig | None = None, out: str | Path | None = None, *, overwrite: bool = False,
             on_stage: Callable[[str, int], Callable[[int, int], None] | None] | None = None) -> tuple[Path, list[dict]]:
    """Run the demo; ``on_stage(name, total)`` may return a ``progress(done, total)`` callback."""
    from .models import load_pipeline

    config = config or DemoConfig()
    out = Path(out) if out is not None else default_run_dir("demo", "testbed")
    run = RunFolder(out, "demo", config.to_dict(), overwrite=overwrite, seeds=[config.seed])
    pipe = load_pipeline(config.model)
    rows = []
    for group in config.groups:
        evaluation = EvaluateConfig(model=config.model, prompts=group.prompts, num_seeds=group.num_seeds,
                                    seed=config.seed, generation=config.generation, limit=group.limit)
        progress = on_stage(group.name, 0) if on_stage else None
        result = run_evaluate(evaluation, run.path / group.name, pipe=pipe, progress=progress, command="evaluate")
        threshold = result.summary["threshold"]
        rows.append(summary_row(group.name, result.records, threshold, field=group.score))
    summary_path = run.path / "summary.json"
    summary_path.write_text(json.dumps(rows, indent=1))
    run.write_manifest({"status": "done", "threshold": threshold})
    logger.info("demo written to %s", run.path)
    return run.path, rows
