"""What every benchmark here prints, so that a figure can be compared across machines: the machine
line (CPU, cores, threads, torch, device) and each timing as the median of repeats with its spread.

    from measure import machine_line, Timing, timed

    print(machine_line("cpu"))
    t = timed(lambda: work(), repeats=3)        # Timing: median, low, high, the runs
    print(f"work {t}")                          # "1.23 s (median of 3, 1.20-1.31)"

Also the fine-tuning benchmarks' shared measurements: ``fresh_dori_row``, the demo's fresh Dori on a model,
and ``robustness_figures``, that with the MR of the memorized captions before any attack.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch


def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo`` on Linux), else what ``platform`` says."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_line(device: str = "cpu") -> str:
    """One line: CPU, cores, torch threads, torch version, device (GPU name when CUDA)."""
    where = device
    if device.startswith("cuda") and torch.cuda.is_available():
        where = f"{device} ({torch.cuda.get_device_name(torch.device(device))})"
    return (f"machine: {cpu_name()} ({platform.machine()}), {os.cpu_count()} cores, {torch.get_num_threads()} torch "
            f"threads, torch {torch.__version__}, Python {platform.python_version()}, device {where}")


@dataclass(frozen=True)
class Timing:
    """Seconds of repeated runs; ``median``, ``low`` and ``high`` over them."""

    runs: tuple[float, ...]

    @property
    def median(self) -> float:
        return statistics.median(self.runs)

    @property
    def low(self) -> float:
        return min(self.runs)

    @property
    def high(self) -> float:
        return max(self.runs)

    def spread(self) -> float:
        """``(high - low) / median``: how far apart the repeats were."""
        return (self.high - self.low) / self.median if self.median else 0.0

    def __str__(self) -> str:
        return f"{self.median:.3f} s (median of {len(self.runs)}, {self.low:.3f}-{self.high:.3f})"


def sync(device: str) -> None:
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn: Callable[[], object], repeats: int = 3, device: str = "cpu", warmup: int = 0) -> Timing:
    """Run ``fn`` ``warmup`` times untimed, then ``repeats`` times timed (synchronising a GPU around each)."""
    if repeats < 1:
        raise ValueError(f"repeats: must be >= 1, got {repeats}")
    for _ in range(warmup):
        fn()
    runs = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        runs.append(time.perf_counter() - t0)
    return Timing(tuple(runs))


def ratio_range(a: Timing, b: Timing) -> str:
    """``a / b`` from the medians, with the range the repeats allow (lowest a over highest b, and back)."""
    return f"{a.median / b.median:.3f} (range {a.low / b.high:.3f}-{a.high / b.low:.3f})"


def parse_value(text: str):
    """A ``--set FIELD=VALUE`` value: None, a bool, an int, a float, or the text itself."""
    if text.lower() in ("none", "null"):
        return None
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def fresh_dori_row(pipe, out, threshold: float, kinds=None, name: str = "ft+dori") -> tuple[dict, list[dict]]:
    """The fine-tuning benchmarks' fresh Dori on the testbed's memorized captions, as the demo's
    ``adversarial-ft+dori`` row: 50 Adam steps from the prompt and from N(0, I), 10 seeds per trigger from seed
    1000; run folders ``<out>/attack-prompt`` and ``<out>/attack-random`` (resumable). The row (MR, and MR per
    memorization kind where ``kinds`` labels them) and the records."""
    from dataclasses import replace

    from dori.attack.loop import AttackConfig
    from dori.attack.run import AttackRunConfig, run_attack
    from dori.memorization import attack_row

    records = []
    for init in ("prompt", "random"):
        fresh = AttackRunConfig(prompts="testbed:memorized", init=init, num_seeds=10, seed=1000,
                                attack=replace(AttackConfig(), record_at=(50,)))
        records += run_attack(pipe, fresh, Path(out) / f"attack-{init}")[1]
    return attack_row(name, records, threshold, kinds), records


def robustness_figures(pipe, out, name: str = "ft") -> tuple[dict, list[dict]]:
    """MR of the testbed's memorized captions (10 seeds; run folder ``<out>/eval``) and the fresh Dori of
    :func:`fresh_dori_row` on ``pipe`` (the descriptor and the memorization kinds are the testbed's): ``({"mr",
    "mr_dori", "mr_dori_by_kind", "dori_generations"}, the attack records)``."""
    from dori.descriptors import DescriptorConfig
    from dori.evaluate import EvaluateConfig, run_evaluate
    from dori.memorization import summary_row
    from dori.prompts import prompt_kinds

    threshold = DescriptorConfig().build(pipe).threshold
    evaluated = run_evaluate(pipe, EvaluateConfig(prompts="testbed:memorized", num_seeds=10), Path(out) / "eval")
    dori_row, records = fresh_dori_row(pipe, out, threshold, prompt_kinds(pipe, "testbed:memorized"), f"{name}+dori")
    return {"mr": summary_row(name, evaluated.records, threshold)["mr"], "mr_dori": dori_row["mr"],
            "mr_dori_by_kind": dori_row.get("mr_by_kind"),
            "dori_generations": sum(len(r["scores"]) for r in records)}, records
