"""Adversarial fine-tuning (Kowalczuk et al. 2025, section 2.6): the mitigation that holds against Dori.

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

import copy
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..attack.loop import frozen_unet, optimize_embeddings
from ..attack.parts import DiffusionLoss, RandomNormal
from ..config_files import to_dict
from ..errors import DoriError
from ..images import load_image, save_png
from ..models import (
    encode_images,
    encode_prompts,
    model_name,
    model_record,
    pipeline_location,
    save_pipeline_folder,
    testbed_folder,
)
from ..progress import Progress
from ..prompts import PromptSet, load_reference_folder, require_references
from ..runs import Processes, RunFolder, default_run_dir, json_text, read_jsonl, safe_filename
from ..seeding import item_generator
from ..weight_groups import group_of
from .checkpoints import (
    checkpoint_bytes,
    checkpoints_to_write,
    latest_checkpoint,
    pipeline_bytes,
    release_checkpoints,
    require_disk,
    resume_finished,
    save_checkpoint,
)
from .config import SURROGATES, FinetuneConfig
from .retain import check_retain, load_retain_set
from .sampling import image_groups, step_batch
from .surrogates import make_surrogates, palette_image

logger = logging.getLogger(__name__)

STEPS_FILE = "steps.jsonl"
STAGE = "adversarial fine-tuning"


@dataclass
class FinetuneResult:
    path: Path
    pipeline: Path | None
    """The saved pipeline folder (None when ``config.save_pipeline`` is off)."""
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


def _surrogate_stage(pipe, config: FinetuneConfig, run: RunFolder, prompt_set: PromptSet, references, gallery,
                     descriptor) -> torch.Tensor:
    """Surrogate images (cached in the run folder), as latents ``(N, C, h, w)``."""
    index = run.path / "surrogates.json"
    records = prompt_set.records
    if not index.exists():
        if config.surrogate == "nemo":
            rows, images = _nemo_surrogates(pipe, config, records, references, gallery, descriptor)
        elif config.surrogate == "palette":
            rows, images = _palette_surrogates(pipe, config, records, references, gallery, descriptor)
        elif Path(config.surrogate).is_dir():
            rows, images = _given_surrogates(pipe, config, records, references, gallery, descriptor)
        else:  # checked here, not in validate(): a finished or resumed run reads its surrogates from its own folder
            raise DoriError(f"surrogate: must be one of {', '.join(SURROGATES)} or a folder of <prompt id>.png images, "
                            f"got {config.surrogate!r}")
        (run.path / "surrogates").mkdir(exist_ok=True)
        for row, image in zip(rows, images, strict=True):
            row["image"] = f"surrogates/{safe_filename(row['prompt_id'])}.png"
            save_png(image, run.path / row["image"])
        index.write_text(json_text(rows, indent=1))
    rows = json.loads(index.read_text())
    if [r["prompt_id"] for r in rows] != [r.id for r in records]:
        raise DoriError(f"surrogates: {index} was made for other prompts; use another --out")
    return encode_images(pipe, [load_image(run.path / r["image"]) for r in rows])


def _nemo_surrogates(pipe, config: FinetuneConfig, records, references, gallery, descriptor):
    from ..mitigations.base import load_for
    from ..mitigations.nemo import statistics_prompts
    from ..prompts import load_prompt_set

    nemo = load_for(pipe, config.surrogate_mitigation) if config.surrogate_mitigation else None
    fallback = None
    if config.surrogate_fallback:
        fallback = [r.prompt for r in load_prompt_set(config.surrogate_fallback, model_folder=testbed_folder(pipe)).records]
    seeds = list(range(config.seed + 10_000, config.seed + 10_000 + config.surrogate_seeds))
    found, images = make_surrogates(pipe, records, references, descriptor,
                                    statistics_prompts=statistics_prompts(config.statistics, pipe), seeds=seeds,
                                    generation=config.generation, nemo=nemo, gallery=gallery, fallback_prompts=fallback,
                                    bar=config.surrogate_bar(descriptor.threshold))
    return [s.record() for s in found], images


def _at_model_size(pipe, images: list[np.ndarray]) -> torch.Tensor:
    """Images as ``(N, 3, H, W)`` in [0, 1], centre-cropped and resized to the model's resolution."""
    import torch.nn.functional as F

    from ..images import to_rgb, to_tensor
    from ..models import center_square

    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    return torch.cat([F.interpolate(center_square(to_tensor(to_rgb(image))), size=(size, size), mode="bilinear",
                                    antialias=True, align_corners=False) for image in images]).clamp(0, 1)


def _given_surrogates(pipe, config: FinetuneConfig, records, references, gallery, descriptor):
    """The user's surrogate images, resized to the model's resolution, checked against every memorized image."""
    from ..memorization import score_images

    given = load_reference_folder(config.surrogate, [r.id for r in records])
    images = _at_model_size(pipe, [given[r.id] for r in records])
    scored = score_images(descriptor, images, references, dict(enumerate(gallery)))
    return _checked_surrogates(config, records, images, scored, "given", descriptor, "the image for {id!r}")


def _palette_surrogates(pipe, config: FinetuneConfig, records, references, gallery, descriptor):
    """Each prompt's training image at the model's resolution with its pixels shuffled (:func:`palette_image`),
    checked against every memorized image. A prompt's permutations come from a generator keyed by the run's seed and
    its id; one that scores above the bar is replaced by the next, up to ``surrogate_seeds`` of them (a shuffled
    photo keeps its mean colour, which the testbed's colour-layout descriptor sees: the cat's scores 0.32 +- 0.04
    against a bar of 0.39, above it for 3% of permutations)."""
    from ..memorization import score_images

    photos = _at_model_size(pipe, references)
    generators = [item_generator("ft-palette", config.seed, r.id) for r in records]
    images = torch.stack([palette_image(photo, g) for photo, g in zip(photos, generators, strict=True)])
    bar = config.surrogate_bar(descriptor.threshold)
    for attempt in range(config.surrogate_seeds):
        scored = score_images(descriptor, images, references, dict(enumerate(gallery)))
        over = np.nonzero(scored.gallery_max > bar)[0]
        if not len(over) or attempt + 1 == config.surrogate_seeds:
            break
        for i in over:  # each prompt over the bar draws its next permutation
            images[i] = palette_image(photos[i], generators[i])
    return _checked_surrogates(config, records, images, scored, "palette", descriptor,
                               "the palette surrogate of {id!r} (its training image, pixels shuffled; "
                               f"{config.surrogate_seeds} permutations tried)")


def _checked_surrogates(config: FinetuneConfig, records, images: torch.Tensor, scored, level: str, descriptor,
                        what: str):
    """The rows of fixed surrogate images scored against every memorized image (``scored``: their
    :func:`~dori.memorization.score_images`); one above the bar is an error naming it."""
    rows = [{"prompt_id": r.id, "prompt": r.prompt, "seed": None, "score": float(s), "level": level,
             "neurons": 0, "max_score": float(m)}
            for r, s, m in zip(records, scored.sscd_orig, scored.gallery_max, strict=True)]
    bar = config.surrogate_bar(descriptor.threshold)
    high = [row for row in rows if row["max_score"] > bar]
    if high:
        verb = "replicates" if high[0]["max_score"] > descriptor.threshold else "is too close to"
        raise DoriError(f"surrogate: {what.format(id=high[0]['prompt_id'])} {verb} a memorized training image "
                        f"(similarity {high[0]['max_score']:.3f}; a surrogate may score at most {bar:.3f}, "
                        f"surrogate_below {config.surrogate_below:g} x the threshold {descriptor.threshold:.3f})")
    return rows, images


class _Trainer:
    """One adversarial fine-tuning run: the model, its optimiser and losses under accelerate, and the data."""

    def __init__(self, pipe, config: FinetuneConfig, prompt_set: PromptSet, run: RunFolder, accelerator,
                 surrogate_latents: torch.Tensor, references, retain=None):
        self.pipe, self.config, self.run, self.accelerator = pipe, config, run, accelerator
        self.records = prompt_set.records
        self.groups = image_groups(references, config.sample_by)
        self.retain = retain or load_retain_set(config.retain, config.retain_images, testbed_folder(pipe),
                                                generate_with=pipe if config.retain_generate else None,
                                                cache=run.path / "retain", seed=config.seed,
                                                generation=config.generation)
        self.surrogate_latents = surrogate_latents
        self.targets = encode_images(pipe, references)
        self.prompt_embeds = encode_prompts(pipe, [r.prompt for r in self.records])
        # the empty caption's embedding, what ``retain_uncond``'s share of retain pairs is trained under
        self.empty_embed = encode_prompts(pipe, [""])[0] if config.retain_uncond else None
        unet = pipe.unet
        # the UNet before fine-tuning, frozen: the retain target under ``retain_target="teacher"``
        self.teacher = copy.deepcopy(unet).requires_grad_(False).eval() if config.retain_target == "teacher" else None
        if config.lora_rank:
            from peft import LoraConfig

            unet.add_adapter(LoraConfig(r=config.lora_rank, lora_alpha=config.lora_rank, init_lora_weights="gaussian",
                                        target_modules=list(config.lora_targets)))
        unet.requires_grad_(False)
        frozen = set(config.frozen_groups)
        self.trainable = [p for n, p in unet.named_parameters()
                          if (not config.lora_rank or "lora_" in n) and group_of(n) not in frozen]
        if not self.trainable:
            raise DoriError(f"frozen_groups: {', '.join(config.frozen_groups)} hold every layer the LoRA adapts "
                            f"(lora_targets {', '.join(config.lora_targets)}); nothing would train")
        for p in self.trainable:
            p.requires_grad_(True)
        from diffusers.optimization import get_scheduler

        self.rank, self.world = accelerator.process_index, accelerator.num_processes
        self.per_epoch = config.steps_in_epoch(len(self.groups))
        self.total = self.per_epoch * config.epochs
        torch.manual_seed(config.seed)
        optimizer = torch.optim.AdamW(self.trainable, lr=config.lr, weight_decay=config.weight_decay)
        # every process takes every step, and a prepared scheduler steps once per process per step, as in
        # diffusers' training scripts; accelerate checkpoints it with the optimiser
        schedule = get_scheduler("constant_with_warmup" if config.lr_schedule == "constant" else config.lr_schedule,
                                 optimizer, num_warmup_steps=config.lr_warmup_steps * self.world,
                                 num_training_steps=self.total * self.world)
        self.model, self.optimizer, self.lr_scheduler = accelerator.prepare(unet, optimizer, schedule)
        self.state = _TrainState()
        accelerator.register_for_checkpointing(self.state)
        # the moving average of the trained weights (``ema_decay``), checkpointed with the rest
        self.ema = None
        if config.ema_decay:
            from diffusers.training_utils import EMAModel

            self.ema = EMAModel(self.trainable, decay=config.ema_decay)
            accelerator.register_for_checkpointing(self.ema)
        self.inner_loss = DiffusionLoss(pipe, config.inner.pairs)
        self.adv_loss = DiffusionLoss(pipe, config.adv_pairs, unet=self.model, timesteps=config.adv_timesteps)
        self.dm_loss = DiffusionLoss(pipe, 1, unet=self.model)
        if min(config.images_per_step, len(self.groups)) < self.world or config.retain_batch_size < self.world:
            raise DoriError(f"images_per_step, retain_batch_size: each process needs work; with {self.world} processes "
                            f"both must be >= {self.world} (got {min(config.images_per_step, len(self.groups))}, "
                            f"{config.retain_batch_size})")

    # -- resuming ---------------------------------------------------------------------------------
    def resume(self) -> list[dict]:
        """Load the last checkpoint, if any; the step rows written up to it."""
        latest = latest_checkpoint(self.run)
        if latest is not None:
            self.accelerator.load_state(str(latest))
            logger.info("resuming adversarial fine-tuning at step %d", self.state.step)
        require_disk(self.run, checkpoint_bytes(self.accelerator.unwrap_model(self.model), self.trainable,
                                                ema=self.ema is not None),
                     checkpoints_to_write(self.state.step, self.total, self.config.checkpoint_every),
                     pipeline_bytes(self.pipe) if self.config.save_pipeline else 0)
        steps_file = self.run.path / STEPS_FILE
        rows = [r for r in (read_jsonl(steps_file) if steps_file.exists() else []) if r["step"] <= self.state.step]
        if self.accelerator.is_main_process:
            steps_file.write_text("".join(json_text(r) + "\n" for r in rows))
        return rows

    # -- one step -----------------------------------------------------------------------------------
    def batch(self, step: int) -> list[int]:
        """This process's memorized prompts of step ``step`` (:func:`dori.finetune.sampling.step_batch`)."""
        config = self.config
        batch = step_batch(self.groups, step, self.per_epoch, config.images_per_step, config.seed)
        return batch[self.rank :: self.world]

    def triggers(self, step: int, batch: list[int]):
        """Fresh Dori triggers against the current weights: ``(keys, triggers, surrogate latents, last losses)``."""
        config, state = self.config, self.state
        keys, y0, goal, surrogate = [], [], [], []
        for i in batch:
            for init in config.inits:
                key = f"{self.records[i].id}/{init}"
                if config.warm_start and key in state.triggers:
                    start_y = state.triggers[key]
                elif init == "prompt":
                    start_y = self.prompt_embeds[i]
                else:
                    start_y = RandomNormal(seed=config.seed * 100_003 + step)(self.pipe, self.records[i].prompt, 0)
                keys.append(key)
                y0.append(start_y.float())
                goal.append(self.targets[i])
                surrogate.append(self.surrogate_latents[i])
        if not keys:
            return keys, None, None, None
        with frozen_unet(self.pipe.unet):
            found, last = optimize_embeddings(self.inner_loss, torch.stack(y0), torch.stack(goal),
                                              [f"ft{config.seed}/{step}/{k}" for k in keys], config.inner)
        for key, y in zip(keys, found, strict=True):
            state.triggers[key] = y.detach().cpu().clone()
        return keys, found, torch.stack(surrogate), last

    def update(self, step: int, keys, found, surrogate) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[int]]:
        """One optimiser step on L_Adv (the surrogates under the triggers) and L_DM (a retain batch), both
        through one UNet call (DDP wants a single forward per backward); ``(loss, l_adv, l_dm, retain picks)``."""
        config = self.config
        g = item_generator("ft-retain", config.seed, step)
        pick = torch.randint(len(self.retain), (config.retain_batch_size,), generator=g).tolist()[self.rank :: self.world]
        with self.accelerator.accumulate(self.model), self.accelerator.autocast():
            parts = []
            if keys:
                parts.append(self.adv_loss.inputs(found, surrogate,
                                                  [item_generator("ft-adv", config.seed, step, k) for k in keys]))
            if pick:
                latents, captions = self.retain.batch(self.pipe, pick)
                if config.retain_uncond:
                    drop = torch.rand(len(pick), generator=item_generator("ft-uncond", config.seed, step, self.rank))
                    captions[drop < config.retain_uncond] = self.empty_embed
                noisy, t, cond, target = self.dm_loss.inputs(captions, latents,
                                                             [item_generator("ft-dm", config.seed, step, j) for j in pick])
                if self.teacher is not None:
                    with torch.no_grad():
                        target = self.teacher(noisy, t, encoder_hidden_states=cond).sample
                parts.append((noisy, t, cond, target))
            noisy, t, cond, target = (torch.cat(x) for x in zip(*parts, strict=True))
            pred = self.model(noisy, t, encoder_hidden_states=cond).sample
            n_adv = len(keys) * config.adv_pairs
            l_adv = self.adv_loss.reduce(pred[:n_adv], target[:n_adv]).mean() if keys else torch.zeros(())
            l_dm = self.dm_loss.reduce(pred[n_adv:], target[n_adv:]).mean() if pick else torch.zeros(())
            loss = config.adv_weight * l_adv + config.dm_weight * l_dm
            self.accelerator.backward(loss)
            if self.accelerator.sync_gradients and config.max_grad_norm:
                self.accelerator.clip_grad_norm_(self.trainable, config.max_grad_norm)
            self.optimizer.step()
            self.lr_scheduler.step()
            if self.ema is not None and self.accelerator.sync_gradients:
                self.ema.step(self.trainable)
            # freed now, not before the next backward: the next step's Dori search and the checkpoints run
            # without a second copy of the trained weights (3.4 GB for all of SD's UNet in float32)
            self.optimizer.zero_grad(set_to_none=True)
        return loss, l_adv, l_dm, pick

    def train(self, progress: Progress | None) -> None:
        config, state = self.config, self.state
        steps_file = self.run.path / STEPS_FILE
        if progress:
            progress(STAGE, state.step, self.total)
        self.model.train()
        while state.step < self.total:
            t0 = time.perf_counter()
            step = state.step + 1
            keys, found, surrogate, last = self.triggers(step, self.batch(step))
            lr = self.lr_scheduler.get_last_lr()[0]
            loss, l_adv, l_dm, pick = self.update(step, keys, found, surrogate)
            state.step = step
            evaluations = len(keys) * (config.inner.steps * config.inner.pairs + config.adv_pairs) + len(pick)
            row = {"step": step, "epoch": (step - 1) // self.per_epoch + 1, "loss": float(loss.detach()),
                   "l_adv": float(l_adv.detach()), "l_dm": float(l_dm.detach()), "lr": lr,
                   "inner_loss": float(last.mean()) if keys else float("nan"),
                   "unet_evaluations": evaluations * self.world, "seconds": time.perf_counter() - t0}
            if self.ema is not None:
                row["ema_decay"] = self.ema.cur_decay_value
            if self.accelerator.is_main_process:
                with open(steps_file, "a") as f:
                    f.write(json_text(row) + "\n")
            if step % config.checkpoint_every == 0 or step == self.total:
                save_checkpoint(self.accelerator, self.run, step)
            if progress:
                progress(STAGE, step, self.total)
        self.model.eval()

    def finish(self):
        """The trained UNet as a plain, frozen module (a LoRA fused into its weights), holding the moving
        average of its weights where one was kept. The optimiser's state (two moments per trained weight) is
        released: the run's last checkpoint holds it."""
        final = self.accelerator.unwrap_model(self.model)
        self.teacher = None
        if self.ema is not None:
            self.ema.copy_to(self.trainable)
            self.ema = None
        self.optimizer.state.clear()  # (the gradients went with the last step)
        self.accelerator.free_memory()
        if self.config.lora_rank:
            final.fuse_lora()
            final.unload_lora()
        final.requires_grad_(False)
        return final


def adversarial_finetune(pipe, prompts: PromptSet, config: FinetuneConfig | None = None, out: str | Path | None = None,
                         *, overwrite: bool = False, progress: Progress | None = None) -> FinetuneResult:
    """Fine-tune ``pipe.unet`` against Dori for the memorized ``prompts`` (their reference images are the
    training images), resuming from ``out/checkpoints``; saves the pipeline unless ``config.save_pipeline``
    is off (and then drops the checkpoint; a rerun of the finished run reads the UNet from the pipeline
    folder: :mod:`dori.finetune.checkpoints`).

    ``pipe`` keeps the fine-tuned UNet (frozen, in eval mode) when this returns; when the pipeline is
    saved, ``pipe`` records the saved folder as where it comes from (diffusers' ``name_or_path``).
    """
    from accelerate import Accelerator

    config = config or FinetuneConfig()
    config.validate()
    if not prompts.records:
        raise DoriError(f"prompts: {prompts.name!r} holds no prompts")
    references = require_references(prompts, "fine-tuning")
    check_retain(config.retain, config.retain_images, config.retain_generate, testbed_folder(pipe))
    # read (and check) the retain pairs before the run folder exists; generated ones are made inside it
    retain = None if config.retain_generate else load_retain_set(config.retain, config.retain_images,
                                                                 testbed_folder(pipe))
    descriptor = config.descriptor.build(pipe)
    accelerator = Accelerator(mixed_precision=config.mixed_precision, cpu=pipe.unet.device.type == "cpu")
    out = Path(out) if out is not None else default_run_dir("finetune", model_name(pipe))
    # made by the main process first (a process that finds the folder half-made would refuse it)
    run = Processes(pipe).open(out, "finetune", to_dict(config), model=model_record(pipe),
                               resolved={"prompts": prompts.name, "ids": [r.id for r in prompts.records],
                                         "descriptor": descriptor.describe()},
                               overwrite=overwrite, seeds=[config.seed])
    with run.guard():
        summary = resume_finished(run, pipe) if config.save_pipeline else None
        if summary is not None:  # a rerun of a run that ended: its pipeline folder holds the result
            return FinetuneResult(run.path, run.path / "pipeline", summary)
        # every memorized image known: a surrogate must not copy any of them
        gallery = list(prompts.references.values()) + list((prompts.gallery or {}).values())
        if accelerator.is_main_process:
            surrogates = _surrogate_stage(pipe, config, run, prompts, references, gallery, descriptor)
        accelerator.wait_for_everyone()
        if not accelerator.is_main_process:
            surrogates = _surrogate_stage(pipe, config, run, prompts, references, gallery, descriptor)
        trainer = _Trainer(pipe, config, prompts, run, accelerator, surrogates, references, retain)
        trainer.resume()
        trainer.train(progress)
        pipe.unet = trainer.finish()
        rows = [r for r in read_jsonl(run.path / STEPS_FILE) if r["step"] <= trainer.total]
        # the training images the prompts reach (several prompts share one under template memorization)
        summary = {**summarize_finetune(rows, trainer.per_epoch), "prompts": len(prompts.records),
                   "images": len(image_groups(references))}
        pipeline = None
        if accelerator.is_main_process:
            from ..analysis.plots import plot_finetune_losses

            pipeline = save_training_run(pipe, run, config.save_pipeline, summary,
                                         plot_finetune_losses(rows) if rows else None)
        accelerator.wait_for_everyone()
    if config.save_pipeline:
        pipeline = run.path / "pipeline"
        pipe.register_to_config(_name_or_path=str(pipeline))
    return FinetuneResult(run.path, pipeline, summary)


def save_training_run(pipe, run: RunFolder, save_pipeline: bool, summary: dict, figure=None) -> Path | None:
    """What a fine-tuning run leaves (its main process): the pipeline folder (with the testbed's data when
    the model is the testbed) unless ``save_pipeline`` is off, ``figure`` as ``losses.png`` / ``.pdf``, the
    summary (with the pipeline and the base model) and the manifest's ``done``. Once the pipeline folder
    is written the checkpoints go (:mod:`dori.finetune.checkpoints`)."""
    pipeline = None
    if save_pipeline:
        pipeline = save_pipeline_folder(pipe, run.path / "pipeline")
        run.write_manifest({"pipeline": str(pipeline)})
    if figure is not None:
        import matplotlib.pyplot as plt

        figure.savefig(run.path / "losses.png", dpi=120)
        figure.savefig(run.path / "losses.pdf")
        plt.close(figure)
    run.write_summary({**summary, "pipeline": str(pipeline) if pipeline else None,
                       "base_model": pipeline_location(pipe)})
    run.write_manifest({"status": "done"})
    if pipeline is not None:
        release_checkpoints(run)
    return pipeline


def summarize_finetune(rows: list[dict], steps_per_epoch: int) -> dict:
    """Wall time and UNet evaluations per epoch, and the last losses."""
    import numpy as np

    epochs = sorted({r["epoch"] for r in rows})
    per_epoch = [{"epoch": e,
                  "seconds": float(sum(r["seconds"] for r in rows if r["epoch"] == e)),
                  "unet_evaluations": int(sum(r["unet_evaluations"] for r in rows if r["epoch"] == e)),
                  "l_adv": float(np.mean([r["l_adv"] for r in rows if r["epoch"] == e])),
                  "l_dm": float(np.mean([r["l_dm"] for r in rows if r["epoch"] == e]))} for e in epochs]
    return {"steps": len(rows), "steps_per_epoch": steps_per_epoch, "epochs": per_epoch,
            "seconds": float(sum(r["seconds"] for r in rows)),
            "unet_evaluations": int(sum(r["unet_evaluations"] for r in rows))}
