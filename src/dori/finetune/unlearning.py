"""The training loop the fine-tuning baselines of the paper's Table 2 share (ESD, and the other
unlearning methods as they are added): one objective per step on ``pipe.unet`` under accelerate.

A method supplies an :class:`UnlearningObjective`: which UNet parameters train, its optimiser, and
the loss of draw ``k`` (every random draw of draw ``k`` comes from a generator keyed by
``(method, seed, k)``). One step is one optimiser update over ``gradient_accumulation`` draws (step
``s`` takes draws ``(s - 1) * gradient_accumulation + 1 ...``). A method whose update is not the
gradient of one loss (SISS scales its deletion term's gradient to a fixed norm) returns its loss as
named terms and combines their accumulated gradients itself (:class:`GradientTerms`).
The loop adds what every method needs and none should write again:
gradient accumulation and clipping, mixed precision, a checkpoint every ``checkpoint_every`` steps
that a rerun resumes from (ending with the weights of an uninterrupted run), one row per step in
``steps.jsonl``, a loss plot, and the result saved as a normal diffusers pipeline folder
(:func:`dori.finetune.trainer.save_training_run`, as adversarial fine-tuning saves its own).
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch

from ..errors import DoriError
from ..models import model_record
from ..progress import Progress
from ..runs import Processes, json_text, read_jsonl
from .checkpoints import (
    checkpoint_bytes,
    checkpoints_to_write,
    latest_checkpoint,
    pipeline_bytes,
    require_disk,
    resume_finished,
    save_checkpoint,
)
from .trainer import save_training_run

logger = logging.getLogger(__name__)

STEPS_FILE = "steps.jsonl"
MIXED_PRECISION = ("no", "fp16", "bf16")


@dataclass(frozen=True)
class TrainingSettings:
    """The loop's settings, shared by every method's config (each sets its own official defaults)."""

    iterations: int = 200
    lr: float = 5e-5
    gradient_accumulation: int = 1
    """Draws whose gradients are averaged into one optimiser update (one step); SISS's config uses 16."""
    max_grad_norm: float | None = None
    """Clip the gradient norm before each update (None: no clipping)."""
    mixed_precision: str = "no"
    checkpoint_every: int = 50
    seed: int = 0
    save_pipeline: bool = True

    def to_dict(self) -> dict:
        return asdict(self)

    def validate_training(self) -> None:
        for name in ("iterations", "gradient_accumulation", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise DoriError(f"{name}: must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0:
            raise DoriError(f"lr: must be > 0, got {self.lr}")
        if self.max_grad_norm is not None and self.max_grad_norm <= 0:
            raise DoriError(f"max_grad_norm: must be > 0 or None, got {self.max_grad_norm}")
        if self.mixed_precision not in MIXED_PRECISION:
            raise DoriError(f"mixed_precision: must be one of {', '.join(MIXED_PRECISION)}, got {self.mixed_precision!r}")


@runtime_checkable
class UnlearningObjective(Protocol):
    """What a fine-tuning unlearning method supplies to :func:`train_unlearning`."""

    name: str

    def trainable(self, unet: torch.nn.Module) -> list[str]:
        """Names of the UNet parameters that train."""

    def optimizer(self, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
        """The method's optimiser over ``params``."""

    def loss(self, model: torch.nn.Module, step: int) -> tuple[torch.Tensor, dict[str, float]]:
        """The loss of draw ``step`` (1-based) with the trained UNet ``model``, and named parts to log."""

    # optional: ``prepare(folder: Path) -> None`` builds the method's data (e.g. generated images) in the
    # run folder before training; it must resume from what an interrupted call left there.


@runtime_checkable
class GradientTerms(Protocol):
    """An objective whose ``loss`` returns named terms ``{name: tensor}`` instead of one tensor: the loop
    accumulates each term's gradient on its own (averaged over the step's draws) and sets the update's
    gradient to ``combine`` of them (before clipping)."""

    terms: tuple[str, ...]

    def combine(self, grads: dict[str, list[torch.Tensor]]) -> tuple[list[torch.Tensor], dict[str, float]]:
        """The update's gradient, one tensor per trained parameter, and named figures to log."""


def _backward(accelerator, objective, loss, params, scale: float, sums: dict | None) -> float:
    """Backpropagate one draw's loss (times ``scale``); a :class:`GradientTerms` objective's terms go into
    ``sums`` one by one. Returns the draw's logged loss (the first term's for a term objective)."""
    if sums is None:
        accelerator.backward(loss * scale)
        return float(loss.detach())
    missing = [name for name in objective.terms if name not in loss]
    if missing:
        raise DoriError(f"{objective.name}: loss has no term {missing[0]!r} (terms: {', '.join(objective.terms)})")
    for i, name in enumerate(objective.terms):
        last = i == len(objective.terms) - 1
        grads = torch.autograd.grad(loss[name] * scale, params, retain_graph=not last, allow_unused=True)
        acc = sums.setdefault(name, [torch.zeros_like(p) for p in params])
        for a, g in zip(acc, grads, strict=True):
            if g is not None:
                a.add_(g)
    return float(loss[objective.terms[0]].detach())


@dataclass
class UnlearningResult:
    path: Path
    pipeline: Path | None
    summary: dict


class _Step:
    """The step counter accelerate checkpoints beside the model and the optimiser."""

    def __init__(self) -> None:
        self.step = 0

    def state_dict(self) -> dict:
        return {"step": self.step}

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])


def train_unlearning(pipe, objective: UnlearningObjective, settings: TrainingSettings, out: str | Path, *,
                     config: dict, stage: str, resolved: dict | None = None, overwrite: bool = False,
                     progress: Progress | None = None) -> UnlearningResult:
    """Train ``pipe.unet`` with ``objective`` for ``settings.iterations`` updates in the run folder ``out``
    (``config``: the method's full settings, kept in the manifest; a rerun with the same settings resumes).

    ``pipe`` keeps the trained UNet (frozen, eval mode); with ``settings.save_pipeline`` the pipeline is
    saved to ``<out>/pipeline`` and ``pipe`` records that folder as where it comes from.
    """
    from accelerate import Accelerator

    settings.validate_training()
    accelerator = Accelerator(mixed_precision=settings.mixed_precision, cpu=pipe.unet.device.type == "cpu")
    separate = isinstance(objective, GradientTerms)
    if separate and settings.mixed_precision == "fp16":
        raise DoriError(f"mixed_precision: {objective.name} combines gradient terms itself, which fp16's loss "
                        "scaling does not support; use bf16 or no")
    # made by the main process first (a process that finds the folder half-made would refuse it)
    run = Processes(pipe).open(Path(out), objective.name, config, model=model_record(pipe), resolved=resolved or {},
                               overwrite=overwrite, seeds=[settings.seed])
    with run.guard():
        prepare = getattr(objective, "prepare", None)
        if prepare is not None:  # the method's data (generated images, scores), resumable in the run folder
            if accelerator.is_main_process:
                prepare(run.path)
            accelerator.wait_for_everyone()
            if not accelerator.is_main_process:
                prepare(run.path)
        # a rerun of a run that ended: its pipeline folder holds the result (the method's data, read back
        # above from the run folder, stays what the sidecar reports)
        summary = resume_finished(run, pipe) if settings.save_pipeline else None
        if summary is not None:
            return UnlearningResult(run.path, run.path / "pipeline", summary)
        unet = pipe.unet
        names = set(objective.trainable(unet))
        if not names:
            raise DoriError(f"{objective.name}: no UNet parameter is selected for training")
        unet.requires_grad_(False)
        params = [p for n, p in unet.named_parameters() if n in names]
        for p in params:
            p.requires_grad_(True)
        model, optimizer = accelerator.prepare(unet, objective.optimizer(params))
        state = _Step()
        accelerator.register_for_checkpointing(state)
        latest = latest_checkpoint(run)
        if latest is not None:
            accelerator.load_state(str(latest))
            logger.info("resuming %s at step %d", objective.name, state.step)
        require_disk(run, checkpoint_bytes(unet, params),
                     checkpoints_to_write(state.step, settings.iterations, settings.checkpoint_every),
                     pipeline_bytes(pipe) if settings.save_pipeline else 0)
        steps_file = run.path / STEPS_FILE
        rows = [r for r in (read_jsonl(steps_file) if steps_file.exists() else []) if r["step"] <= state.step]
        if accelerator.is_main_process:
            steps_file.write_text("".join(json_text(r) + "\n" for r in rows))
        model.train()
        if progress:
            progress(stage, state.step, settings.iterations)
        while state.step < settings.iterations:
            t0 = time.perf_counter()
            step = state.step + 1
            n = settings.gradient_accumulation
            losses, logged, sums = [], {}, ({} if separate else None)
            for draw in range((step - 1) * n + 1, step * n + 1):
                with accelerator.autocast():
                    loss, parts = objective.loss(model, draw)
                losses.append(_backward(accelerator, objective, loss, params, 1.0 / n, sums))
                for k, v in parts.items():
                    logged[k] = logged.get(k, 0.0) + float(v) / n
            if separate:
                grads, figures = objective.combine(sums)
                for p, g in zip(params, grads, strict=True):
                    p.grad = g.to(p.dtype)
                logged.update(figures)
            if settings.max_grad_norm:
                accelerator.clip_grad_norm_(params, settings.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            state.step = step
            row = {"step": step, "loss": sum(losses) / n, **logged, "seconds": time.perf_counter() - t0}
            if accelerator.is_main_process:
                with open(steps_file, "a") as f:
                    f.write(json_text(row) + "\n")
            if step % settings.checkpoint_every == 0 or step == settings.iterations:
                save_checkpoint(accelerator, run, step)
            if progress:
                progress(stage, step, settings.iterations)
        final = accelerator.unwrap_model(model).eval().requires_grad_(False)
        pipe.unet = final
        rows = [r for r in read_jsonl(steps_file) if r["step"] <= settings.iterations]
        summary = {"steps": len(rows), "seconds": float(sum(r["seconds"] for r in rows)),
                   "loss_first": rows[0]["loss"] if rows else None, "loss_last": rows[-1]["loss"] if rows else None,
                   "trained_parameters": int(sum(p.numel() for p in params))}
        pipeline = None
        if accelerator.is_main_process:
            from ..analysis.plots import plot_training_loss

            pipeline = save_training_run(pipe, run, settings.save_pipeline, summary,
                                         plot_training_loss(rows, objective.name) if rows else None)
        accelerator.wait_for_everyone()
    if settings.save_pipeline:
        pipeline = run.path / "pipeline"
        pipe.register_to_config(_name_or_path=str(pipeline))
    return UnlearningResult(run.path, pipeline, summary)
