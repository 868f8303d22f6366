"""The training loops' checkpoints (adversarial fine-tuning, the unlearning baselines) and the disk they take.

A checkpoint is accelerate's ``save_state``: the whole UNet, the optimiser's state (Adam keeps two
moments per trained weight), the weights' moving average where one is kept, and the loop's own state.
A run keeps only its latest one, written before the previous one is removed, so that a kill at any
moment leaves one to resume from.

A run that has ended and saved its pipeline folder does not need its checkpoint: the folder holds the
trained UNet. The checkpoint is then removed (for all of Stable Diffusion's UNet trained in float32 it
is 10.3 GB, three times the pipeline's UNet), and a rerun of the finished run reads the UNet back from
the folder (:func:`resume_finished`) instead of resuming. A run that does not save its pipeline keeps its
checkpoint: it is the only copy of the trained weights.

Before training starts, :func:`require_disk` checks that the run's folder has room for what the run
will write at its peak, so that a run that cannot end fails at once, not at its first checkpoint.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import torch

from ..errors import DoriError
from ..runs import RunFolder, folder_bytes

logger = logging.getLogger(__name__)

FOLDER = "checkpoints"
ADAM_MOMENTS = 2
"""Tensors the optimiser keeps per trained weight (Adam and AdamW, the only optimisers the loops use)."""


def latest_checkpoint(run: RunFolder) -> Path | None:
    """The run's last checkpoint folder, if any."""
    found = sorted((run.path / FOLDER).glob("step-*"), key=lambda p: int(p.name.split("-")[1]))
    return found[-1] if found else None


def save_checkpoint(accelerator, run: RunFolder, step: int) -> None:
    """Write step ``step``'s checkpoint, then remove the earlier ones (main process)."""
    target = run.path / FOLDER / f"step-{step:06d}"
    accelerator.save_state(str(target))
    if accelerator.is_main_process:
        for old in target.parent.glob("step-*"):
            if old != target:
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


def checkpoints_to_write(start: int, total: int, every: int) -> int:
    """How many checkpoints a loop going from step ``start`` to ``total`` writes (every ``every`` steps and
    at the last)."""
    return sum(1 for s in range(start + 1, total + 1) if s % every == 0 or s == total)


def tensor_bytes(tensors) -> int:
    return int(sum(t.numel() * t.element_size() for t in tensors))


def checkpoint_bytes(unet: torch.nn.Module, trainable: list[torch.Tensor], ema: bool = False) -> int:
    """About what one checkpoint takes: the UNet's state, the optimiser's moments of the trained weights and,
    with ``ema``, their moving average."""
    return tensor_bytes(unet.state_dict().values()) + (ADAM_MOMENTS + int(ema)) * tensor_bytes(trainable)


def pipeline_bytes(pipe) -> int:
    """About what the saved pipeline folder takes: every module component's state."""
    return int(sum(tensor_bytes(c.state_dict().values()) for c in pipe.components.values()
                   if isinstance(c, torch.nn.Module)))


def disk_needed(checkpoint: int, held: int, writes: int, pipeline: int) -> int:
    """The most the run's folder grows by from now: each new checkpoint is written while the previous one
    (``held`` bytes now, ``checkpoint`` later) is still there, and the pipeline (``pipeline`` bytes, 0 when it
    is not saved) while the last checkpoint is."""
    need = checkpoint if writes else 0
    if writes >= 2:
        need = max(need, 2 * checkpoint - held)
    return max(need, (checkpoint - held if writes else 0) + pipeline)


def require_disk(run: RunFolder, checkpoint: int, writes: int, pipeline: int) -> None:
    """Raise when the run's folder lacks room for the checkpoints still to write and the pipeline folder."""
    latest = latest_checkpoint(run)
    held = folder_bytes(latest) if latest is not None else 0
    need = disk_needed(checkpoint, held, writes, pipeline)
    free = shutil.disk_usage(run.path).free
    if need > free:
        gb = 1e9
        raise DoriError(f"out: {run.path} has {free / gb:.1f} GB free; the run needs about {need / gb:.1f} GB "
                        f"({writes} checkpoint(s) of {checkpoint / gb:.1f} GB to write, each while the previous one "
                        f"is kept, and a pipeline folder of {pipeline / gb:.1f} GB). Free space or choose another "
                        "--out; a LoRA (lora_rank) or a half-precision model makes checkpoints smaller")


def resume_finished(run: RunFolder, pipe) -> dict | None:
    """For a run that ended and saved its pipeline folder: put its trained UNet into ``pipe`` (read from
    that folder, in ``pipe.unet``'s dtype and device, frozen; the folder recorded as where ``pipe`` now
    comes from) and return the run's summary. None for any other run. A leftover checkpoint of such a
    run (a kill between its end and the checkpoint's removal) is removed."""
    folder = run.path / "pipeline"
    if run.manifest().get("status") != "done" or not (folder / "unet").is_dir():
        return None
    unet = pipe.unet
    trained = type(unet).from_pretrained(folder, subfolder="unet", torch_dtype=unet.dtype).to(unet.device)
    logger.info("%s finished before: its UNet is read from %s", run.path, folder)
    pipe.unet = trained.eval().requires_grad_(False)
    pipe.register_to_config(_name_or_path=str(folder))
    release_checkpoints(run)
    summary = json.loads((run.path / "summary.json").read_text())
    return {k: v for k, v in summary.items() if k not in ("pipeline", "base_model")}


def release_checkpoints(run: RunFolder) -> None:
    """Remove the checkpoints of a run whose pipeline folder holds the result (main process)."""
    folder = run.path / FOLDER
    if run.rank != 0 or not folder.is_dir():
        return
    size = folder_bytes(folder)
    shutil.rmtree(folder, ignore_errors=True)
    logger.info("removed the checkpoints of %s (%.1f GB): its pipeline folder holds the trained UNet",
                run.path, size / 1e9)
