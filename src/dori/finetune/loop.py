"""Adversarial fine-tuning (Kowalczuk et al. 2025, section 2.6 of PAPER.md): the mitigation that holds.

Every step: run Dori against the *current* UNet for a batch of memorized images (inits from the
prompt and/or N(0, I)), then update the UNet on ``dm_weight * L_DM + adv_weight * L_Adv``:

* ``L_Adv``: the diffusion loss of each image's *surrogate* latent under its fresh triggers;
* ``L_DM``: the ordinary diffusion loss of a retain batch under its captions.

The loop runs through accelerate (mixed precision, several processes, ``save_state`` /
``load_state``); every random draw of step ``k`` comes from a generator keyed by ``(seed, k, ...)``,
so a run resumed from its last checkpoint ends with the same weights as an uninterrupted one. The
result is a normal diffusers pipeline folder (``<out>/pipeline``) that every other command accepts.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..attack.loop import frozen_unet, optimize_embeddings
from ..attack.parts import DiffusionLoss, RandomNormal, encode_images, item_generator
from ..errors import DoriError
from ..models import encode_prompts, model_name
from ..prompts import load_image, load_prompt_set, load_reference_folder
from ..runs import RunFolder, default_run_dir
from .config import FinetuneConfig
from .retain import load_retain_set
from .surrogates import make_surrogates

logger = logging.getLogger(__name__)

STEPS_FILE = "steps.jsonl"


@dataclass
class FinetuneResult:
    path: Path
    pipeline: Path
    summary: dict


class _TrainState:
    """What accelerate checkpoints beside the model and optimiser: the step and the warm-start triggers."""

    def __init__(self) -> None:
        self.step = 0
        self.triggers: dict[str, torch.Tensor] = {}

    def state_dict(self) -> dict:
        return {"step": self.step, "triggers": dict(self.triggers)}

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])
        self.triggers = dict(state["triggers"])


def _safe(key: str) -> str:
    return key.replace("/", "__").replace("#", "_")


def _latest_checkpoint(folder: Path) -> Path | None:
    found = sorted(folder.glob("step-*"), key=lambda p: int(p.name.split("-")[1]))
    return found[-1] if found else None


def _read_steps(path: Path, upto: int) -> list[dict]:
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut by an interruption
        if row["step"] <= upto:
            rows.append(row)
    return rows


def _surrogate_stage(pipe, config: FinetuneConfig, run: RunFolder, records, references, gallery,
                     descriptor) -> torch.Tensor:
    """Surrogate images (cached in the run folder), as latents ``(N, C, h, w)``."""
    from ..descriptors import to_tensor
    from ..memorization import score_images

    folder = run.path / "surrogates"
    index = run.path / "surrogates.json"
    ids = [r.id for r in records]
    if not index.exists():
        if config.surrogate == "nemo":
            from ..mitigate import statistics_prompts
            from ..mitigations import load_mitigation

            nemo = load_mitigation(config.surrogate_mitigation) if config.surrogate_mitigation else None
            fallback = None
            if config.surrogate_fallback:
                fallback = [r.prompt for r in load_prompt_set(config.surrogate_fallback,
                                                              model_folder=pipe.dori_model["location"]).records]
            seeds = list(range(config.seed + 10_000, config.seed + 10_000 + config.surrogate_seeds))
            found, images = make_surrogates(pipe, records, references, descriptor,
                                            statistics_prompts=statistics_prompts(config.statistics,
                                                                                  pipe.dori_model["location"]),
                                            seeds=seeds, generation=config.generation, nemo=nemo, gallery=gallery,
                                            fallback_prompts=fallback)
            rows = [s.record() for s in found]
        else:
            given = load_reference_folder(config.surrogate, ids)
            images = to_tensor(np.stack([given[i] for i in ids]))
            scored = score_images(descriptor, images, references, dict(enumerate(gallery)))
            rows = [{"prompt_id": r.id, "prompt": r.prompt, "seed": None, "score": float(s), "level": "given",
                     "neurons": 0, "max_score": float(m)}
                    for r, s, m in zip(records, scored.sscd_orig, scored.gallery_max, strict=True)]
            high = [row for row in rows if row["max_score"] > descriptor.threshold]
            if high:
                raise DoriError(f"surrogate: the image for {high[0]['prompt_id']!r} replicates a memorized training "
                                f"image (similarity {high[0]['max_score']:.3f} > {descriptor.threshold:.3f}); a "
                                "surrogate must not")
        from ..evaluate import save_png

        folder.mkdir(exist_ok=True)
        for row, image in zip(rows, images, strict=True):
            save_png(image, folder / f"{_safe(row['prompt_id'])}.png")
            row["image"] = f"surrogates/{_safe(row['prompt_id'])}.png"
        index.write_text(json.dumps(rows, indent=1))
    rows = json.loads(index.read_text())
    if [r["prompt_id"] for r in rows] != ids:
        raise DoriError(f"surrogates: {index} was made for other prompts; use another --out")
    images = to_tensor(np.stack([load_image(run.path / r["image"]) for r in rows]))
    return encode_images(pipe, images)


def adversarial_finetune(pipe, config: FinetuneConfig | None = None, out: str | Path | None = None, *,
                         descriptor=None, overwrite: bool = False,
                         progress: Callable[[int, int], None] | None = None) -> FinetuneResult:
    """Fine-tune ``pipe.unet`` against Dori (resuming from ``out/checkpoints``) and save the pipeline.

    ``progress(step, total)`` is called after every optimisation step. ``pipe`` keeps the fine-tuned
    UNet (frozen, in eval mode) when this returns.
    """
    from accelerate import Accelerator

    from ..descriptors import make_descriptor, to_tensor

    config = config or FinetuneConfig()
    config.validate()
    folder = pipe.dori_model["location"]
    prompt_set = load_prompt_set(config.prompts, references=config.references, model_folder=folder).subset(config.limit)
    records = prompt_set.records
    missing = [r.id for r in records if r.id not in prompt_set.references]
    if missing:
        raise DoriError(f"prompts: fine-tuning needs the training image of every prompt; none for {missing[0]!r} "
                        "(give --references DIR)")
    if not records:
        raise DoriError(f"prompts: {config.prompts!r} holds no prompts")
    retain = load_retain_set(config.retain, config.retain_images, folder)
    descriptor = descriptor or make_descriptor("auto", pipe)
    accelerator = Accelerator(mixed_precision=config.mixed_precision, cpu=pipe.unet.device.type == "cpu")
    out = Path(out) if out is not None else default_run_dir("finetune", model_name(folder))
    run = RunFolder(out, "finetune", {**config.to_dict(), "model": folder, "descriptor": descriptor.describe()},
                    overwrite=overwrite and accelerator.is_main_process, rank=accelerator.process_index,
                    world_size=accelerator.num_processes, seeds=[config.seed])
    references = [prompt_set.references[r.id] for r in records]
    # every memorized image known: a surrogate must not copy any of them
    gallery = list(prompt_set.references.values()) + list((prompt_set.gallery or {}).values())
    if accelerator.is_main_process:
        surrogate_latents = _surrogate_stage(pipe, config, run, records, references, gallery, descriptor)
    accelerator.wait_for_everyone()
    if not accelerator.is_main_process:
        surrogate_latents = _surrogate_stage(pipe, config, run, records, references, gallery, descriptor)
    targets = encode_images(pipe, to_tensor(np.stack([r if r.ndim == 3 else np.repeat(r[..., None], 3, -1)
                                                      for r in references])))
    prompt_embeds = encode_prompts(pipe, [r.prompt for r in records])

    unet = pipe.unet
    if config.lora_rank:
        from peft import LoraConfig

        unet.add_adapter(LoraConfig(r=config.lora_rank, lora_alpha=config.lora_rank, init_lora_weights="gaussian",
                                    target_modules=list(config.lora_targets)))
    unet.requires_grad_(False)
    trainable = [p for n, p in unet.named_parameters() if not config.lora_rank or "lora_" in n]
    for p in trainable:
        p.requires_grad_(True)
    torch.manual_seed(config.seed)
    optimizer = torch.optim.AdamW(trainable, lr=config.lr, weight_decay=config.weight_decay)
    model, optimizer = accelerator.prepare(unet, optimizer)
    state = _TrainState()
    accelerator.register_for_checkpointing(state)
    checkpoints = run.path / "checkpoints"
    latest = _latest_checkpoint(checkpoints)
    if latest is not None:
        accelerator.load_state(str(latest))
        logger.info("resuming adversarial fine-tuning at step %d", state.step)
    steps_file = run.path / STEPS_FILE
    rows = _read_steps(steps_file, state.step)
    if accelerator.is_main_process:
        steps_file.write_text("".join(json.dumps(r) + "\n" for r in rows))

    n = len(records)
    per_epoch = config.steps_in_epoch(n)
    total = per_epoch * config.epochs
    inner_loss = DiffusionLoss(pipe, config.inner.pairs)
    adv_loss = DiffusionLoss(pipe, config.adv_pairs, unet=model)
    dm_loss = DiffusionLoss(pipe, 1, unet=model)
    rank, world = accelerator.process_index, accelerator.num_processes
    if min(config.images_per_step, n) < world or config.retain_batch_size < world:
        raise DoriError(f"images_per_step, retain_batch_size: each process needs work; with {world} processes "
                        f"both must be >= {world} (got {min(config.images_per_step, n)}, {config.retain_batch_size})")
    if progress:
        progress(state.step, total)
    model.train()
    while state.step < total:
        t0 = time.perf_counter()
        step = state.step + 1
        epoch, within = divmod(step - 1, per_epoch)
        order = torch.randperm(n, generator=item_generator("ft-order", config.seed, epoch)).tolist()
        start = (within * config.images_per_step) % n
        batch = [order[(start + j) % n] for j in range(min(config.images_per_step, n))][rank::world]
        # 1. fresh Dori triggers against the current weights
        keys, y0, goal, surrogate = [], [], [], []
        for i in batch:
            for init in config.inits:
                key = f"{records[i].id}/{init}"
                if config.warm_start and key in state.triggers:
                    start_y = state.triggers[key]
                elif init == "prompt":
                    start_y = prompt_embeds[i]
                else:
                    start_y = RandomNormal(seed=config.seed * 100_003 + step)(pipe, records[i].prompt, 0)
                keys.append(key)
                y0.append(start_y.float())
                goal.append(targets[i])
                surrogate.append(surrogate_latents[i])
        if keys:
            with frozen_unet(pipe.unet):
                triggers, last = optimize_embeddings(inner_loss, torch.stack(y0), torch.stack(goal),
                                                     [f"ft{config.seed}/{step}/{k}" for k in keys], config.inner)
            for key, y in zip(keys, triggers, strict=True):
                state.triggers[key] = y.detach().cpu().clone()
        # 2. L_Adv on the surrogates under those triggers, L_DM on a retain batch
        g = item_generator("ft-retain", config.seed, step)
        pick = torch.randint(len(retain), (config.retain_batch_size,), generator=g).tolist()[rank::world]
        with accelerator.accumulate(model), accelerator.autocast():
            # one UNet call for both terms (DDP wants a single forward per backward)
            parts = []
            if keys:
                parts.append(adv_loss.inputs(triggers, torch.stack(surrogate),
                                             [item_generator("ft-adv", config.seed, step, k) for k in keys]))
            if pick:
                latents, captions = retain.batch(pipe, pick)
                parts.append(dm_loss.inputs(captions, latents,
                                            [item_generator("ft-dm", config.seed, step, j) for j in pick]))
            noisy, t, cond, target = (torch.cat(x) for x in zip(*parts, strict=True))
            pred = model(noisy, t, encoder_hidden_states=cond).sample
            n_adv = len(keys) * config.adv_pairs
            l_adv = adv_loss.reduce(pred[:n_adv], target[:n_adv]).mean() if keys else torch.zeros(())
            l_dm = dm_loss.reduce(pred[n_adv:], target[n_adv:]).mean() if pick else torch.zeros(())
            loss = config.adv_weight * l_adv + config.dm_weight * l_dm
            optimizer.zero_grad(set_to_none=True)
            accelerator.backward(loss)
            if accelerator.sync_gradients and config.max_grad_norm:
                accelerator.clip_grad_norm_(trainable, config.max_grad_norm)
            optimizer.step()
        state.step = step
        evaluations = len(keys) * (config.inner.steps * config.inner.pairs + config.adv_pairs) + len(pick)
        row = {"step": step, "epoch": epoch + 1, "loss": float(loss.detach()), "l_adv": float(l_adv.detach()),
               "l_dm": float(l_dm.detach()), "inner_loss": float(last.mean()) if keys else float("nan"),
               "unet_evaluations": evaluations * world, "seconds": time.perf_counter() - t0}
        if accelerator.is_main_process:
            with open(steps_file, "a") as f:
                f.write(json.dumps(row) + "\n")
        if step % config.checkpoint_every == 0 or step == total:
            target = checkpoints / f"step-{step:06d}"
            accelerator.save_state(str(target))
            if accelerator.is_main_process:
                for old in checkpoints.glob("step-*"):
                    if old != target:
                        shutil.rmtree(old, ignore_errors=True)
            accelerator.wait_for_everyone()
        if progress:
            progress(step, total)

    model.eval()
    final = accelerator.unwrap_model(model)
    if config.lora_rank:
        final.fuse_lora()
        final.unload_lora()
    final.requires_grad_(False)
    pipe.unet = final
    rows = _read_steps(steps_file, total)
    summary = summarize_finetune(rows, per_epoch)
    pipeline = run.path / "pipeline"
    if accelerator.is_main_process:
        pipe.save_pretrained(pipeline)
        from ..testbed.assets import SUBFOLDER, is_testbed_folder

        if is_testbed_folder(folder):
            shutil.copytree(Path(folder) / SUBFOLDER, pipeline / SUBFOLDER, dirs_exist_ok=True)
        _plot_losses(rows, run.path)
        run.write_manifest({"pipeline": str(pipeline)})
        (run.path / "summary.json").write_text(json.dumps({**summary, "pipeline": str(pipeline)}, indent=1))
        run.write_manifest({"status": "done"})
    accelerator.wait_for_everyone()
    pipe.dori_model = {**pipe.dori_model, "location": str(pipeline), "name": f"{pipe.dori_model['name']}-adv-ft"}
    return FinetuneResult(run.path, pipeline, summary)


def summarize_finetune(rows: list[dict], steps_per_epoch: int) -> dict:
    """Wall time and UNet evaluations per epoch, and the last losses."""
    epochs = sorted({r["epoch"] for r in rows})
    per_epoch = [{"epoch": e,
                  "seconds": float(sum(r["seconds"] for r in rows if r["epoch"] == e)),
                  "unet_evaluations": int(sum(r["unet_evaluations"] for r in rows if r["epoch"] == e)),
                  "l_adv": float(np.mean([r["l_adv"] for r in rows if r["epoch"] == e])),
                  "l_dm": float(np.mean([r["l_dm"] for r in rows if r["epoch"] == e]))} for e in epochs]
    return {"steps": len(rows), "steps_per_epoch": steps_per_epoch, "epochs": per_epoch,
            "seconds": float(sum(r["seconds"] for r in rows)),
            "unet_evaluations": int(sum(r["unet_evaluations"] for r in rows))}


def _plot_losses(rows: list[dict], folder: Path) -> None:
    if not rows:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    steps = [r["step"] for r in rows]
    for key, label in (("l_adv", "L_Adv (surrogate under triggers)"), ("l_dm", "L_DM (retain)"),
                       ("inner_loss", "Dori loss (memorized image)")):
        ax.plot(steps, [r[key] for r in rows], label=label)
    ax.set_xlabel("fine-tuning step")
    ax.set_ylabel("diffusion loss")
    ax.set_yscale("log")
    ax.legend(fontsize=8)
    ax.set_title(f"adversarial fine-tuning ({len(rows)} steps)")
    fig.tight_layout()
    fig.savefig(folder / "losses.png", dpi=120)
    fig.savefig(folder / "losses.pdf")
    plt.close(fig)
