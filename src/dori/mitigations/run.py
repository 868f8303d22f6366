"""``dori mitigate METHOD``: fit any registered mitigation on a prompt set and save it, as a resumable run.

Run folder: the manifest (its ``config`` holds the method's full settings, so ``--config
manifest.json`` fits it again), per-item records where the method writes them (NeMo: one per
prompt), ``<method>.safetensors`` + ``<method>.json`` (the artefact ``--mitigation`` takes) and
``summary.json`` (what the method reports, e.g. NeMo's neurons per layer, and the fit's cost: ``fit_seconds``
and ``fit_unet_evaluations``, the samples through any UNet of the model's class, a method's frozen copy
included, in this process and session).
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..config_files import from_dict, to_dict
from ..errors import DoriError
from ..hooks import counting_class_calls
from ..models import model_name, model_record
from ..progress import Progress
from ..prompts import PromptSet, prompts_for
from ..runs import Processes, default_run_dir
from .base import MITIGATIONS, Mitigation, MitigationBase


@dataclass(frozen=True)
class MitigateConfig:
    """Which method, fitted on which prompts, with which settings (``settings``: fields of the method's
    ``Config``; the rest keep its defaults)."""

    method: str = "nemo"
    prompts: str | None = "testbed:memorized"
    references: str | None = None
    limit: int | None = None
    settings: dict = field(default_factory=dict)

    def method_class(self) -> type:
        return MITIGATIONS.get(self.method)

    def method_config(self):
        """The method's config, built from ``settings`` and validated."""
        cls = self.method_class()
        config = from_dict(cls.Config, self.settings, self.method)
        config.validate()
        return config

    def validate(self) -> None:
        if self.limit is not None and self.limit < 1:
            raise DoriError(f"limit: must be >= 1, got {self.limit}")
        if self.prompts is None and getattr(self.method_class(), "needs_prompts", True):
            raise DoriError(f"prompts: {self.method} is fitted on a prompt set; give --prompts")
        self.method_config()

    def resolved(self) -> MitigateConfig:
        """The same config with ``settings`` holding every field of the method's config (what the manifest keeps)."""
        return MitigateConfig(self.method, self.prompts, self.references, self.limit, to_dict(self.method_config()))

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class MitigateResult:
    path: Path
    artefact: Path
    mitigation: Mitigation
    summary: dict


def run_mitigate(pipe, config: MitigateConfig, out: str | Path | None = None, *, overwrite: bool = False,
                 progress: Progress | None = None) -> MitigateResult:
    """Fit ``config.method`` on ``pipe`` and save it to ``<out>/<method>.safetensors``."""
    config.validate()
    config = config.resolved()
    cls = config.method_class()
    prompts = (prompts_for(pipe, config.prompts, references=config.references, limit=config.limit)
               if config.prompts is not None else PromptSet("none", []))
    if hasattr(cls, "check"):  # what can be checked on the model before anything is written
        cls.check(pipe, config.method_config())
    out = Path(out) if out is not None else default_run_dir(f"mitigate-{config.method}", model_name(pipe))
    processes = Processes(pipe)
    run = processes.open(out, "mitigate", to_dict(config), model=model_record(pipe),
                         resolved={"method": MITIGATIONS.origin(config.method)}, overwrite=overwrite)
    path = run.path / f"{config.method}.safetensors"
    with run.guard():
        # a method that shares its work among processes fits in every one; any other in the main one
        everywhere = getattr(cls, "distributed_fit", False) or processes.world == 1
        started = time.perf_counter()
        with counting_class_calls(type(pipe.unet)) as counter:
            mitigation = cls.fit(pipe, prompts, config.method_config(), run=run, progress=progress) \
                if everywhere or processes.main else None
        cost = {"fit_seconds": round(time.perf_counter() - started, 3), "fit_unet_evaluations": counter.samples}
        if processes.main:
            if isinstance(mitigation, MitigationBase) and mitigation.made_for is None:
                mitigation.stamp(pipe)  # a plugin's fit that did not record its model
            mitigation.save(path)
        processes.barrier()
        if mitigation is None:
            mitigation = cls.load(path)
        summary = {"method": config.method, "kind": mitigation.kind, "scope": mitigation.scope, "mitigation": str(path),
                   **(mitigation.summary() if hasattr(mitigation, "summary") else {}), **cost}
        if processes.main:
            run.finalize(summary)
        processes.barrier()
    logging.getLogger(__name__).info("%s written to %s", config.method, path)
    return MitigateResult(run.path, path, mitigation, summary)
