"""Adversarial fine-tuning on the shipped testbed: resume, fresh triggers, the saved pipeline, robustness."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from dori.attack.loop import AttackConfig
from dori.descriptors import DescriptorConfig
from dori.errors import DoriError
from dori.finetune import FinetuneConfig, adversarial_finetune
from dori.finetune.trainer import STAGE

LIMIT = 2


@pytest.fixture(scope="module")
def surrogate_folder(tmp_path_factory):
    """Surrogates for the first memorized photos: seen-once crops (they do not replicate the photos)."""
    from PIL import Image

    from dori.prompts import load_prompt_set

    memorized = load_prompt_set("testbed:memorized")
    seen = load_prompt_set("testbed:seen-once")
    folder = tmp_path_factory.mktemp("surrogates")
    for record, other in zip(memorized.records, seen.records, strict=False):
        # ids hold a slash ("memorized/astronaut"): "/" may be written "_"
        Image.fromarray(seen.references[other.id]).save(folder / f"{record.id.replace('/', '_')}.png")
    return folder


def _config(surrogates, **changes) -> FinetuneConfig:
    base = FinetuneConfig.testbed(epochs=2, steps_per_epoch=2, images_per_step=2, checkpoint_every=1,
                                  retain_batch_size=4, adv_pairs=2, inner=AttackConfig(steps=2, pairs=2, record_at=()),
                                  surrogate=str(surrogates))
    return base.replace(**changes)


def _fresh():
    from dori.models import load_pipeline

    return load_pipeline("testbed")


def _memorized(limit: int = LIMIT):
    from dori.prompts import load_prompt_set

    return load_prompt_set("testbed:memorized").subset(limit)


def _steps(folder) -> list[dict]:
    """A run folder's step rows (``steps.jsonl``)."""
    return [json.loads(line) for line in (folder / "steps.jsonl").read_text().splitlines()]


def _stopped_and_resumed(config: FinetuneConfig, folder, after_step: int):
    """A run stopped (Ctrl-C) after step ``after_step`` and run again: the pipe it ended with."""

    def interrupt(stage, step, total, info=""):
        if step == after_step:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        adversarial_finetune(_fresh(), _memorized(), config, folder, progress=interrupt)
    pipe = _fresh()
    adversarial_finetune(pipe, _memorized(), config, folder)
    return pipe


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, surrogate_folder):
    pipe = _fresh()
    result = adversarial_finetune(pipe, _memorized(), _config(surrogate_folder), tmp_path_factory.mktemp("ft") / "run")
    return pipe, result


def test_resume_ends_with_the_weights_of_an_uninterrupted_run(tmp_path, surrogate_folder, uninterrupted):
    pipe_a, result_a = uninterrupted
    config = _config(surrogate_folder)

    def interrupt(stage, step, total, info=""):
        if step == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        adversarial_finetune(_fresh(), _memorized(), config, tmp_path / "run", progress=interrupt)
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["step-000003"]
    assert json.loads((tmp_path / "run" / "manifest.json").read_text())["status"] == "interrupted"
    pipe_b = _fresh()
    seen = []
    result_b = adversarial_finetune(pipe_b, _memorized(), config, tmp_path / "run",
                                    progress=lambda stage, s, t, info="": seen.append(s))
    assert seen[0] == 3 and seen[-1] == 4  # it went on from the checkpoint, not from 0
    a, b = pipe_a.unet.state_dict(), pipe_b.unet.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    original = _fresh().unet.state_dict()
    assert not all(torch.equal(a[k], original[k]) for k in a)  # it did train
    rows = [json.loads(line) for line in (tmp_path / "run" / "steps.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert result_b.summary["unet_evaluations"] == result_a.summary["unet_evaluations"]


def test_a_finished_run_keeps_no_checkpoint_and_its_rerun_reads_the_pipeline(uninterrupted, surrogate_folder,
                                                                             monkeypatch):
    """The pipeline folder holds the result, so the checkpoint (UNet + Adam's moments) goes; running the
    finished run again trains nothing and ends with the trained weights."""
    import dori.finetune.trainer as loop

    pipe_a, result_a = uninterrupted
    assert not (result_a.path / "checkpoints").exists()

    def no_training(*args, **kwargs):
        raise AssertionError("a finished run trained again")

    monkeypatch.setattr(loop, "optimize_embeddings", no_training)
    pipe_b = _fresh()
    result_b = adversarial_finetune(pipe_b, _memorized(), _config(surrogate_folder), result_a.path)
    a, b = pipe_a.unet.state_dict(), pipe_b.unet.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not pipe_b.unet.training and not any(p.requires_grad for p in pipe_b.unet.parameters())
    assert result_b.summary == result_a.summary and result_b.pipeline == result_a.pipeline


def test_a_checkpoint_is_the_size_the_disk_check_expects_and_too_little_disk_is_refused(
        tmp_path, surrogate_folder, monkeypatch):
    """The estimate behind the disk check (the UNet and two Adam moments per trained weight) is within
    a few percent of a real checkpoint; a folder without that room is refused before the first step."""
    from collections import namedtuple

    import dori.finetune.checkpoints as checkpoints

    def interrupt(stage, step, total, info=""):
        if step == 1:
            raise KeyboardInterrupt

    config = _config(surrogate_folder)
    with pytest.raises(KeyboardInterrupt):
        adversarial_finetune(_fresh(), _memorized(), config, tmp_path / "run", progress=interrupt)
    written = sum(f.stat().st_size for f in (tmp_path / "run" / "checkpoints").rglob("*") if f.is_file())
    unet = _fresh().unet
    expected = checkpoints.checkpoint_bytes(unet, list(unet.parameters()))
    assert abs(written - expected) / expected < 0.05, (written, expected)

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(checkpoints.shutil, "disk_usage", lambda path: usage(10**12, 0, expected // 2))
    seen = []
    with pytest.raises(DoriError, match=r"out: .*GB free; the run needs about"):
        adversarial_finetune(_fresh(), _memorized(), config, tmp_path / "small",
                             progress=lambda stage, s, t, info="": seen.append((stage, s)))
    assert STAGE not in {stage for stage, _ in seen}  # refused before training started


def test_l_adv_uses_fresh_triggers_against_the_current_weights(tmp_path, surrogate_folder, monkeypatch):
    import dori.finetune.trainer as loop

    calls = []
    original = loop.optimize_embeddings

    def spy(objective, y0, targets, keys, config):
        weights = objective.unet.conv_in.weight.detach().clone()
        y, loss = original(objective, y0, targets, keys, config)
        calls.append((weights, y0.clone(), y.clone()))
        return y, loss

    monkeypatch.setattr(loop, "optimize_embeddings", spy)
    adversarial_finetune(_fresh(), _memorized(), _config(surrogate_folder, warm_start=False), tmp_path / "run")
    assert len(calls) == 4  # one Dori run per fine-tuning step
    for (w0, _, y_prev), (w1, start, y_next) in zip(calls, calls[1:], strict=False):
        assert not torch.equal(w0, w1)  # each attack sees the weights the last step changed
        assert not torch.equal(y_prev, y_next)
        assert not torch.equal(start, y_next)  # the triggers were optimised, not reused
    # the prompt-init starts are the prompt embeddings every step (no warm start): fresh attacks
    assert torch.equal(calls[0][1][0], calls[2][1][0])


def test_retain_uncond_trains_that_share_of_retain_pairs_under_the_empty_caption(tmp_path, surrogate_folder,
                                                                                   monkeypatch):
    from dori.attack.parts import DiffusionLoss
    from dori.models import encode_prompts

    seen = []
    original = DiffusionLoss.inputs

    def spy(self, y, targets, generators):
        if self.pairs == 1:  # the retain term's loss (L_Adv's draws 2 pairs here)
            seen.append(y.detach().clone())
        return original(self, y, targets, generators)

    monkeypatch.setattr(DiffusionLoss, "inputs", spy)
    pipe = _fresh()
    empty = encode_prompts(pipe, [""])[0]
    adversarial_finetune(pipe, _memorized(), _config(surrogate_folder, retain_uncond=0.5, retain_batch_size=16,
                                                     save_pipeline=False), tmp_path / "run")
    rows = torch.cat(seen)
    dropped = torch.tensor([torch.equal(row, empty) for row in rows])
    assert len(rows) == 4 * 16
    assert 0.25 <= dropped.float().mean() <= 0.75  # about half, and captions otherwise
    seen.clear()
    adversarial_finetune(_fresh(), _memorized(), _config(surrogate_folder, retain_uncond=0.0, save_pipeline=False),
                         tmp_path / "plain")
    assert not any(torch.equal(row, empty) for row in torch.cat(seen))
    assert FinetuneConfig().retain_uncond == 0  # the paper's term by default; the testbed setting drops 20%


def test_retain_target_teacher_regresses_the_model_before_fine_tuning(tmp_path, surrogate_folder, uninterrupted):
    """Under ``teacher`` the first step's L_DM compares the UNet with its own copy (0 up to rounding), later
    steps with the weights before fine-tuning, also after a resume; under ``data`` it is the diffusion loss."""
    config = _config(surrogate_folder, retain_target="teacher")
    adversarial_finetune(_fresh(), _memorized(), config, tmp_path / "run")
    rows, data = _steps(tmp_path / "run"), _steps(uninterrupted[1].path)
    assert rows[0]["l_dm"] < 1e-8 < data[0]["l_dm"]
    assert all(0 < r["l_dm"] < d["l_dm"] for r, d in zip(rows[1:], data[1:], strict=True))
    _stopped_and_resumed(config, tmp_path / "resumed", after_step=2)
    again = _steps(tmp_path / "resumed")
    assert [r["l_dm"] for r in again] == [r["l_dm"] for r in rows]  # the teacher is not the checkpoint's UNet
    with pytest.raises(DoriError, match="retain_target: must be one of data, teacher"):
        FinetuneConfig(retain_target="frozen").validate()
    with pytest.raises(DoriError, match="retain_uncond"):
        FinetuneConfig(retain_uncond=1.5).validate()


def test_a_cosine_schedule_warms_up_decays_and_resumes_where_it_stopped(tmp_path, surrogate_folder, uninterrupted):
    """diffusers' schedule over the run's 4 steps after 1 warm-up step; accelerate's checkpoint holds its place,
    so a resumed run takes the same rates and ends with the same weights."""
    config = _config(surrogate_folder, lr_schedule="cosine", lr_warmup_steps=1)
    pipe_a = _fresh()
    adversarial_finetune(pipe_a, _memorized(), config, tmp_path / "run")
    rows = _steps(tmp_path / "run")
    lr = config.lr
    assert [r["lr"] for r in rows] == pytest.approx([0.0, lr, 0.75 * lr, 0.25 * lr])
    assert [r["lr"] for r in _steps(uninterrupted[1].path)] == [lr] * 4
    pipe_b = _stopped_and_resumed(config, tmp_path / "resumed", after_step=2)
    assert [r["lr"] for r in _steps(tmp_path / "resumed")] == [r["lr"] for r in rows]
    a, b = pipe_a.unet.state_dict(), pipe_b.unet.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(DoriError, match="lr_schedule: must be one of constant, cosine, linear"):
        FinetuneConfig(lr_schedule="step").validate()
    with pytest.raises(DoriError, match="lr_warmup_steps"):
        FinetuneConfig(lr_warmup_steps=-1).validate()


def test_a_moving_average_of_the_weights_is_the_result_and_resumes(tmp_path, surrogate_folder, uninterrupted):
    """With ema_decay the weights train along the same path (the losses of the run without it), and the
    result is their moving average with diffusers' warm-up: w_1 after step 1, then d_k * average + (1 - d_k)
    * w_k with d_k = min(ema_decay, k / (9 + k)); an interrupted run resumes the average from its checkpoint."""
    config = _config(surrogate_folder, ema_decay=0.2)  # the warm-up's 2/11 at step 2, then the cap 0.2
    pipe_a = _fresh()
    weights = []

    def snapshot(stage, step, total, info=""):
        if stage == STAGE and step > len(weights):
            weights.append({k: v.detach().clone() for k, v in pipe_a.unet.state_dict().items()})

    adversarial_finetune(pipe_a, _memorized(), config, tmp_path / "run", progress=snapshot)
    rows = _steps(tmp_path / "run")
    assert [r["loss"] for r in rows] == [r["loss"] for r in _steps(uninterrupted[1].path)]
    decays = [0.0] + [min(0.2, k / (9 + k)) for k in range(2, len(weights) + 1)]
    assert [r["ema_decay"] for r in rows] == pytest.approx(decays)
    average = dict(weights[0])
    for d, w in zip(decays[1:], weights[1:], strict=True):
        average = {k: d * average[k] + (1 - d) * w[k] for k in w}
    final, last, plain_final = pipe_a.unet.state_dict(), weights[-1], uninterrupted[0].unet.state_dict()
    assert all(torch.equal(last[k], plain_final[k]) for k in last)  # the path without the average
    assert all(torch.allclose(final[k], average[k], atol=1e-6) for k in final)
    assert any(not torch.allclose(final[k], last[k], atol=1e-6) for k in final)
    resumed = _stopped_and_resumed(config, tmp_path / "resumed", after_step=2).unet.state_dict()
    assert all(torch.equal(final[k], resumed[k]) for k in final)
    with pytest.raises(DoriError, match=r"ema_decay: must be in \[0, 1\)"):
        FinetuneConfig(ema_decay=1.0).validate()


def test_saved_folder_is_a_normal_pipeline(uninterrupted):
    from diffusers import StableDiffusionPipeline

    from dori.models import load_pipeline, pipeline_location
    from dori.prompts import prompts_for

    pipe, result = uninterrupted
    loaded = StableDiffusionPipeline.from_pretrained(result.pipeline)
    state = pipe.unet.state_dict()
    assert all(torch.equal(state[k], v) for k, v in loaded.unet.state_dict().items())
    assert pipeline_location(pipe) == str(result.pipeline)  # the trained pipe says where it now lives
    again = load_pipeline(str(result.pipeline))
    assert len(prompts_for(again, "testbed:memorized")) == len(prompts_for(pipe, "testbed:memorized")) >= 4
    summary = json.loads((result.path / "summary.json").read_text())
    assert summary["steps"] == 4 and len(summary["epochs"]) == 2
    assert all(e["unet_evaluations"] > 0 for e in summary["epochs"])
    assert (result.path / "losses.png").exists()


def test_surrogate_that_replicates_is_refused(tmp_path):
    from PIL import Image

    from dori.prompts import load_prompt_set

    memorized = load_prompt_set("testbed:memorized")
    folder = tmp_path / "surrogates"
    (folder / "memorized").mkdir(parents=True)  # the sub-folder spelling of "memorized/astronaut.png"
    for record in memorized.records:
        Image.fromarray(memorized.references[record.id]).save(folder / f"{record.id}.png")
    with pytest.raises(DoriError, match="surrogate: the image for .memorized/astronaut. replicates a memorized"):
        adversarial_finetune(_fresh(), _memorized(), _config(folder), tmp_path / "run")


def test_surrogates_stay_below_the_share_of_the_threshold_they_are_given(tmp_path, surrogate_folder):
    """`surrogate_below`: a surrogate must score below that share of the threshold against every memorized
    photo, whether pruned generations (none under the bar is an error naming it) or given images."""
    from dori.finetune.surrogates import make_surrogates
    from dori.mitigations.nemo import statistics_prompts
    from dori.prompts import load_prompt_set

    pipe, prompts = _fresh(), _memorized(1)
    references = [prompts.references[r.id] for r in prompts.records]
    descriptor = DescriptorConfig().build(pipe)
    kwargs = dict(statistics_prompts=statistics_prompts(None, pipe)[::20], seeds=[10_000, 10_001],
                  gallery=list(load_prompt_set("testbed:memorized").references.values()))
    (first,), _ = make_surrogates(pipe, prompts.records, references, descriptor, **kwargs)
    assert first.max_score < descriptor.threshold
    with pytest.raises(DoriError, match=r"below -1\.000 \(the threshold is"):
        make_surrogates(pipe, prompts.records, references, descriptor, bar=-1.0, **kwargs)
    # the seen-once crops pass as surrogates under the threshold, not under a bar of almost 0
    with pytest.raises(DoriError, match="is too close to a memorized training image .* surrogate_below 1e-06"):
        adversarial_finetune(pipe, _memorized(), _config(surrogate_folder, surrogate_below=1e-6), tmp_path / "run")
    with pytest.raises(DoriError, match="surrogate_below"):
        FinetuneConfig(surrogate_below=0).validate()


def test_palette_surrogates_are_the_training_images_pixels_shuffled(tmp_path):
    """`surrogate="palette"`: each prompt's surrogate holds its training image's pixels, every colour as often, in
    another order, and scores under the bar; a bar it cannot pass is an error naming the prompt."""
    from dori.finetune.surrogates import palette_image
    from dori.images import load_image

    def pixels(array: np.ndarray) -> list:
        return sorted(map(tuple, array.reshape(-1, 3).tolist()))

    image = torch.rand(3, 8, 8)
    shuffled = palette_image(image, torch.Generator().manual_seed(0))
    assert pixels(shuffled.permute(1, 2, 0).numpy()) == pixels(image.permute(1, 2, 0).numpy())
    assert not torch.equal(shuffled, image)
    assert torch.equal(shuffled, palette_image(image, torch.Generator().manual_seed(0)))

    pipe, prompts = _fresh(), _memorized()
    config = _config("palette", epochs=1, steps_per_epoch=1, save_pipeline=False)
    bar = config.surrogate_bar(DescriptorConfig().build(pipe).threshold)  # the testbed setting's: 0.75 x threshold
    result = adversarial_finetune(pipe, prompts, config, tmp_path / "run")
    rows = json.loads((result.path / "surrogates.json").read_text())
    assert [row["level"] for row in rows] == ["palette"] * LIMIT
    for row, record in zip(rows, prompts.records, strict=True):
        surrogate, photo = load_image(result.path / row["image"]), prompts.references[record.id]
        assert surrogate.shape == photo.shape  # the testbed's photos are at the model's resolution
        assert pixels(surrogate) == pixels(photo) and not np.array_equal(surrogate, photo)
        assert row["max_score"] <= bar
    with pytest.raises(DoriError, match=r"the palette surrogate of .memorized/astronaut. \(its training image, pixels "
                                        r"shuffled; 8 permutations tried\) is too close to a memorized training image "
                                        r".* surrogate_below 1e-06"):
        adversarial_finetune(_fresh(), prompts, config.replace(surrogate_below=1e-6), tmp_path / "bar")
    with pytest.raises(DoriError, match="surrogate: must be one of nemo, palette or a folder .* got 'palete'"):
        adversarial_finetune(_fresh(), prompts, config.replace(surrogate="palete"), tmp_path / "typo")


def test_a_palette_permutation_over_the_bar_is_replaced_by_the_next(tmp_path, monkeypatch):
    """A permutation whose surrogate scores above the bar (here: the first of each prompt, made the photo itself) is
    replaced by the prompt's next permutation."""
    import dori.finetune.trainer as trainer
    from dori.finetune.surrogates import palette_image
    from dori.images import load_image

    calls = []

    def first_unshuffled(image, generator):
        calls.append(palette_image(image, generator))
        return image.clone() if len(calls) <= LIMIT else calls[-1]  # each prompt's first draw: the photo, a copy

    monkeypatch.setattr(trainer, "palette_image", first_unshuffled)
    pipe, prompts = _fresh(), _memorized()
    config = _config("palette", epochs=1, steps_per_epoch=1, save_pipeline=False)
    bar = config.surrogate_bar(DescriptorConfig().build(pipe).threshold)
    result = adversarial_finetune(pipe, prompts, config, tmp_path / "run")
    rows = json.loads((result.path / "surrogates.json").read_text())
    assert len(calls) == 2 * LIMIT  # one rejected draw per prompt, then its next permutation kept
    for row, record in zip(rows, prompts.records, strict=True):
        assert not np.array_equal(load_image(result.path / row["image"]), prompts.references[record.id])
        assert row["max_score"] <= bar


def test_bad_settings_name_the_field():
    with pytest.raises(DoriError, match="inits"):
        FinetuneConfig(inits=("other",)).validate()
    with pytest.raises(DoriError, match="mixed_precision"):
        FinetuneConfig(mixed_precision="fp8").validate()
    with pytest.raises(DoriError, match="lora_rank"):
        FinetuneConfig(lora_rank=-1).validate()


def test_lora_variant_trains_only_adapters_and_saves_plain_weights(tmp_path, surrogate_folder):
    pipe = _fresh()
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    result = adversarial_finetune(pipe, _memorized(), _config(surrogate_folder, lora_rank=4, epochs=1), tmp_path / "run")
    after = pipe.unet.state_dict()
    assert after.keys() == before.keys()  # fused and unloaded: a plain UNet again
    changed = [k for k in after if not torch.equal(after[k], before[k])]
    assert changed and all(any(t in k for t in ("to_q", "to_k", "to_v", "to_out")) for k in changed)
    from diffusers import UNet2DConditionModel

    UNet2DConditionModel.from_pretrained(result.pipeline / "unet")


def test_frozen_weight_groups_keep_their_values_and_the_rest_trains(tmp_path, surrogate_folder):
    from dori.weight_groups import group_of

    pipe = _fresh()
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    adversarial_finetune(pipe, _memorized(), _config(surrogate_folder, frozen_groups=("cross_kv", "rest"), epochs=1),
                         tmp_path / "run")
    after = pipe.unet.state_dict()
    changed = {group_of(k) for k in after if not torch.equal(after[k], before[k])}
    assert changed == {"cross_qo", "self_attn", "ff"}
    with pytest.raises(DoriError, match="frozen_groups: 'attn2' not a weight group; allowed: cross_kv"):
        FinetuneConfig(frozen_groups=("attn2",)).validate()
    with pytest.raises(DoriError, match="frozen_groups: freezes every weight group"):
        FinetuneConfig(frozen_groups=("cross_kv", "cross_qo", "self_attn", "ff", "rest")).validate()
    # the LoRA's default targets (to_q, to_k, to_v, to_out.0) are the projections of both attentions
    lora_frozen = _config(surrogate_folder, frozen_groups=("cross_kv", "cross_qo", "self_attn"), lora_rank=4, epochs=1)
    with pytest.raises(DoriError, match="frozen_groups: cross_kv, cross_qo, self_attn hold every layer the LoRA"):
        adversarial_finetune(_fresh(), _memorized(), lora_frozen, tmp_path / "lora")


def test_adv_timesteps_confine_the_adversarial_rows_of_each_update(tmp_path, surrogate_folder):
    pipe = _fresh()
    updates: list[torch.Tensor] = []

    def record(unet, args, kwargs):
        if any(p.requires_grad for p in unet.parameters()):  # an update, not the inner attack (frozen weights)
            updates.append(args[1].clone())

    config = _config(surrogate_folder, adv_timesteps=(990, 1000), epochs=1)
    handle = pipe.unet.register_forward_pre_hook(record, with_kwargs=True)
    try:
        adversarial_finetune(pipe, _memorized(), config, tmp_path / "run")
    finally:
        handle.remove()
    n_adv = config.images_per_step * len(config.inits) * config.adv_pairs
    assert len(updates) == config.steps_per_epoch
    assert all(len(t) == n_adv + config.retain_batch_size for t in updates)
    assert all(((t[:n_adv] >= 990) & (t[:n_adv] < 1000)).all() for t in updates)
    assert any((t[n_adv:] < 990).any() for t in updates)  # the retain term keeps every timestep
    with pytest.raises(DoriError, match=r"adv_timesteps: must be None \(every training timestep\) or \[low, high\)"):
        FinetuneConfig(adv_timesteps=(600, 500)).validate()


def test_finetuned_testbed_resists_the_attack_that_breaks_nemo(tmp_path, surrogate_folder):
    """One photo: Dori (50 steps from the prompt) restores replication on the NeMo-pruned testbed but
    not after a short adversarial fine-tuning."""
    from dataclasses import replace

    from dori.attack.run import AttackRunConfig, run_attack
    from dori.mitigations import MitigateConfig, run_mitigate

    pipe = _fresh()
    fitted = run_mitigate(pipe, MitigateConfig("nemo", "testbed:memorized", limit=1), tmp_path / "nemo")
    nemo = fitted.mitigation
    assert nemo.results[0].memorized and nemo.results[0].n_neurons() > 0
    attack = AttackRunConfig(limit=1, num_seeds=4, seed=300, attack=AttackConfig(record_at=(0, 50)))
    _, pruned = run_attack(pipe, replace(attack, mitigations=(str(fitted.artefact),)), tmp_path / "attack-nemo")
    assert pruned[0]["mr_by_step"]["0"] <= 0.25  # NeMo stops the caption itself
    assert pruned[0]["mr"] >= 0.75
    config = FinetuneConfig.testbed(epochs=4, steps_per_epoch=6, surrogate=str(surrogate_folder))
    adversarial_finetune(pipe, _memorized(1), config, tmp_path / "ft")
    _, robust = run_attack(pipe, attack, tmp_path / "attack-ft")
    assert robust[0]["mr"] <= 0.25
    assert np.mean(robust[0]["scores"]) < np.mean(pruned[0]["scores"])


def test_the_demo_fine_tunes_against_its_finetune_prompts(tmp_path, surrogate_folder, monkeypatch):
    """`finetune_prompts` is what the demo's fine-tuning attacks (whole: the demo's `limit` is for the
    memorized rows); the cached fit is keyed by it, so another prompt set is never served the first one's."""
    from dori.demo import DemoConfig, _Demo
    from dori.runs import RunFolder

    monkeypatch.setenv("DORI_CACHE", str(tmp_path / "cache"))
    pipe = _fresh()
    config = _config(surrogate_folder, epochs=1, steps_per_epoch=1)
    attacked, folders = [], []
    for prompts in (None, "testbed:memorized"):
        demo_config = DemoConfig(limit=1, finetune_config=config, finetune_prompts=prompts)
        demo = _Demo(pipe, demo_config, RunFolder(tmp_path / f"demo-{prompts}", "demo", demo_config.to_dict()), None)
        ft_pipe, result = demo.finetuned()
        manifest = json.loads((result.path / "manifest.json").read_text())
        attacked.append(manifest["resolved"]["ids"])
        folders.append(result.path)
        assert result.path.is_relative_to(tmp_path / "cache") and ft_pipe.unet is not pipe.unet
    everything = [r.id for r in _memorized(None).records]
    assert attacked == [everything[:1], everything] and folders[0] != folders[1]
    with pytest.raises(DoriError, match="finetune_prompts"):
        DemoConfig(finetune_prompts=" ").validate()
    # a prompt without its training image is refused before the demo's folder is made
    from dori.demo import run_demo

    extra = tmp_path / "extra.jsonl"
    extra.write_text(json.dumps({"id": "extra", "prompt": "a photo of a boat"}) + "\n")
    with pytest.raises(DoriError, match="finetune_prompts.*'extra'"):
        run_demo(pipe, DemoConfig(finetune_prompts=f"testbed:memorized+{extra}"), tmp_path / "refused")
    assert not (tmp_path / "refused").exists()


def test_each_training_image_is_attacked_equally_often_through_its_captions_in_turn(tmp_path, surrogate_folder):
    """`sample_by="image"`: an image that six captions reach (a template photo) gets the share of the attacks
    that an image with one caption gets, through each of its captions in turn; `"prompt"` gives every caption
    an equal share. With an image per prompt the two draw the same batches."""
    from collections import Counter

    from dori.finetune.sampling import image_groups, step_batch

    photos = [np.full((4, 4, 3), v, np.uint8) for v in range(8)]
    references = [photos[0]] * 6 + photos[1:]  # prompts 0-5 share a photo, 6-12 have one each
    assert image_groups(references) == [[0, 1, 2, 3, 4, 5], *([i] for i in range(6, 13))]
    assert image_groups(references, "prompt") == [[i] for i in range(13)]
    # the testbed setting: 12 steps of 4 prompts per epoch, 5 epochs
    for how in ("image", "prompt"):
        picks = Counter(i for s in range(1, 61) for i in step_batch(image_groups(references, how), s, 12, 4, seed=3))
        shared = sum(picks[i] for i in range(6))
        if how == "image":  # 30 attacks per photo; the shared one's six captions 5 each
            assert shared == 30 and {picks[i] for i in range(6, 13)} == {30} and {picks[i] for i in range(6)} == {5}
        else:  # every prompt 3 or 4 times an epoch: the shared photo, 6 of 13 prompts, gets 4-8 times any other's
            assert min(picks.values()) >= 15 and max(picks.values()) <= 20 and shared >= 4 * max(picks.values())
    distinct = [np.full((4, 4, 3), v, np.uint8) for v in range(8)]
    batches = {how: [step_batch(image_groups(distinct, how), s, 12, 4, 3) for s in range(1, 25)]
               for how in ("image", "prompt")}
    assert batches["image"] == batches["prompt"] and len({tuple(b) for b in batches["image"]}) > 2
    with pytest.raises(DoriError, match="sample_by"):
        FinetuneConfig(sample_by="caption").validate()
    # a run over two captions of one photo: one training image, both captions attacked
    prompts = _memorized(2)
    first, second = (r.id for r in prompts.records)
    prompts.references[second] = prompts.references[first]
    result = adversarial_finetune(_fresh(), prompts, _config(surrogate_folder, epochs=1, steps_per_epoch=2,
                                                              images_per_step=1), tmp_path / "run")
    assert (result.summary["prompts"], result.summary["images"]) == (2, 1)
