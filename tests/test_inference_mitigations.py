"""Inference-time mitigations (Wen et al., Ren et al., random token addition), the adaptive attack that
passes through them, and the detectors scored under attack: on tiny SD 1.x / SD 2.x pipelines and the
testbed."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dori.attack.parts import DiffusionLoss, NoiseNormPenalty, ThroughAdjustments, WithMitigations
from dori.detection import noise_norm_scores, roc_auc, separation, tpr_at_fpr
from dori.generation import GenerationConfig, epsilon_scale, generate
from dori.mitigations.base import load_mitigation
from dori.mitigations.random_tokens import RandomTokens, RandomTokensConfig, augment_caption
from dori.mitigations.ren import RenConfig, RenRescaling, RescaledCrossAttention, _Rows, token_lengths
from dori.mitigations.sampling_calls import empty_embedding, unconditional_rows
from dori.mitigations.wen import WenAdjustment, WenConfig
from dori.models import encode_prompts, initial_latents
from dori.seeding import item_generator
from tests.conftest import tiny_components


def _pipe(layout: str, tokenizer):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(**tiny_components(layout, tokenizer))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _unet_output(pipe, y, seed=0):
    x = initial_latents(pipe, [seed] * len(y))
    with torch.no_grad():
        return pipe.unet(x, torch.tensor([500] * len(y)), encoder_hidden_states=y).sample


# -- Ren et al. -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("layout", ["sd1", "sd2"])
def test_ren_scales_exactly_the_bos_logit_of_conditional_rows_and_masks_the_padding(clip_tokenizer, layout):
    pipe = _pipe(layout, clip_tokenizer)
    attn = next(m for n, m in pipe.unet.named_modules() if n.endswith("attn2"))
    torch.manual_seed(1)
    batch, heads, queries, keys, dim = 2, attn.heads, 5, 77, 8
    query, key = torch.randn(batch * heads, queries, dim), torch.randn(batch * heads, keys, dim)
    plain = (torch.bmm(query, key.transpose(1, 2)) * attn.scale).view(batch, heads, queries, keys)
    rows = _Rows()
    rows.conditional = torch.tensor([False, True])
    rows.visible = torch.tensor([7, 9])
    out = RescaledCrossAttention(rows, 1.25).logits(attn, query, key, batch).view(batch, heads, queries, keys)
    expected = plain.clone()
    expected[1, :, :, 0] *= 1.25
    expected[0, :, :, 7:] = float("-inf")
    expected[1, :, :, 9:] = float("-inf")
    assert torch.equal(torch.isinf(out), torch.isinf(expected))
    torch.testing.assert_close(out[~torch.isinf(out)], expected[~torch.isinf(expected)])
    assert not torch.equal(out[1, :, :, 0], plain[1, :, :, 0]) and torch.equal(out[0, :, :, 0], plain[0, :, :, 0])


@pytest.mark.parametrize("layout", ["sd1", "sd2"])
def test_ren_with_scale_one_and_no_mask_is_the_model_and_remove_restores_it(clip_tokenizer, layout):
    pipe = _pipe(layout, clip_tokenizer)
    y = encode_prompts(pipe, ["a cat on a mat", "a dog"])
    before = _unet_output(pipe, y)
    processors = {n: m.processor for n, m in pipe.unet.named_modules() if n.endswith("attn2")}
    with RenRescaling(RenConfig(scale=1.0, mask=False)).apply(pipe):
        same = _unet_output(pipe, y)
    with RenRescaling().apply(pipe):
        changed = _unet_output(pipe, y)
    torch.testing.assert_close(same, before, rtol=1e-4, atol=1e-5)
    assert (changed - before).abs().max() > 1e-4
    assert torch.equal(_unet_output(pipe, y), before)
    assert all(m.processor is processors[n] for n, m in pipe.unet.named_modules() if n.endswith("attn2"))


def test_ren_finds_the_guidance_rows_and_each_prompts_length_during_generation(clip_tokenizer):
    pipe = _pipe("sd1", clip_tokenizer)
    prompts = ["a cat", "a very small red cat on a mat"]
    seen = []
    mitigation = RenRescaling()
    with mitigation.apply(pipe):
        layer = next(m for n, m in pipe.unet.named_modules() if n.endswith("attn2"))
        rows = layer.processor.rows

        def record(_module, _args):
            seen.append((rows.conditional.clone(), rows.visible.clone()))

        hook = layer.register_forward_pre_hook(record)
        generate(pipe, [0, 1], prompts, config=GenerationConfig(num_inference_steps=2, batch_size=2))
        hook.remove()
    lengths = token_lengths(clip_tokenizer(prompts, padding="max_length", max_length=77, return_tensors="pt").input_ids,
                            clip_tokenizer.eos_token_id)
    assert lengths.tolist() == [4, 10]  # BOS + tokens + the first end token
    conditional, visible = seen[0]
    assert conditional.tolist() == [False, False, True, True]
    assert visible.tolist() == [4, 10, 4, 10]  # the unconditional rows take their conditional row's length


def test_ren_masks_a_trigger_with_the_length_of_the_prompt_it_is_applied_for(clip_tokenizer):
    pipe = _pipe("sd1", clip_tokenizer)
    trigger = torch.randn(1, 77, 32)
    captured = {}
    with RenRescaling().apply(pipe, prompt="a cat"):
        layer = next(m for n, m in pipe.unet.named_modules() if n.endswith("attn2"))

        def record(_module, _args):
            captured.setdefault("v", layer.processor.rows.visible.clone())

        hook = layer.register_forward_pre_hook(record)
        _unet_output(pipe, trigger)
        hook.remove()
    assert captured["v"].tolist() == [4]


# -- Wen et al. -------------------------------------------------------------------------------------------
def test_wen_adjustment_lowers_the_noise_norm_it_minimises_and_keeps_bos(testbed_pipe):
    pipe = testbed_pipe
    y = encode_prompts(pipe, ["a portrait photo of astronaut eileen collins in front of the flag"])
    noise = initial_latents(pipe, [3])
    before = noise_norm_scores(pipe, y, [3])
    wen = WenAdjustment(WenConfig(target_loss=0.0, iterations=10))
    adjusted = wen.adjust(pipe, y, noise)
    after = noise_norm_scores(pipe, adjusted, [3])
    assert after < 0.8 * before
    assert wen.adjusted_norms[-1] == pytest.approx(float(after), rel=1e-4)
    decay = (1 - 0.05 * 0.01) ** 10  # AdamW's decoupled weight decay is all that moves BOS
    torch.testing.assert_close(adjusted[0, 0], y[0, 0] * decay)
    assert not torch.allclose(adjusted[0, 1:], y[0, 1:])
    untouched = WenAdjustment(WenConfig(target_loss=1e6)).adjust(pipe, y, noise)
    assert torch.equal(untouched, y)  # already below the target: no step


def test_wen_hook_adjusts_sampling_loops_only_and_generation_uses_the_adjusted_embedding(clip_tokenizer):
    pipe = _pipe("sd2", clip_tokenizer)
    prompts = ["a cat", "a dog on a mat"]
    wen = WenAdjustment(WenConfig(target_loss=0.0, iterations=3, adaptive_steps=3))
    config = GenerationConfig(num_inference_steps=3, batch_size=2)
    y = encode_prompts(pipe, prompts)
    with wen.apply(pipe):
        mitigated = generate(pipe, [0, 1], prompts, config=config)
        training_style = _unet_output(pipe, y)  # one timestep per row: not a sampling call
    adjusted = wen.adjust(pipe, y, initial_latents(pipe, [0, 1]))
    direct = generate(pipe, [0, 1], prompt_embeds=adjusted, config=config)
    plain = generate(pipe, [0, 1], prompts, config=config)
    torch.testing.assert_close(mitigated.images, direct.images, rtol=1e-4, atol=1e-4)
    assert (mitigated.images - plain.images).abs().max() > 1e-4
    assert torch.equal(training_style, _unet_output(pipe, y))
    assert mitigated.noise_norm.shape == (2, 3)  # the tracker saw the loop's steps only
    assert float(mitigated.noise_norm[:, 0].mean()) < float(plain.noise_norm[:, 0].mean())


# -- random token addition ----------------------------------------------------------------------------------
def test_random_tokens_augments_captions_deterministically_and_leaves_empty_and_triggers_alone(clip_tokenizer):
    pipe = _pipe("sd1", clip_tokenizer)
    config = RandomTokensConfig(repeat_num=2)
    text = augment_caption("a cat on a mat", config, clip_tokenizer)
    assert text == augment_caption("a cat on a mat", config, clip_tokenizer)
    words = text.split(" ")
    assert len(words) == 7 and sum(w.isdigit() for w in words) == 2
    assert [w for w in words if not w.isdigit()] == ["a", "cat", "on", "a", "mat"]
    mitigation = RandomTokens(config)
    with mitigation.apply(pipe):
        augmented = encode_prompts(pipe, ["a cat on a mat", ""])
    torch.testing.assert_close(augmented[0], encode_prompts(pipe, [text])[0])
    torch.testing.assert_close(augmented[1], encode_prompts(pipe, [""])[0])
    words_style = augment_caption("a cat", RandomTokensConfig(style="rand_word_add", repeat_num=1), clip_tokenizer)
    assert len(words_style.split(" ")) >= 3


# -- the adaptive and the non-adaptive attack ---------------------------------------------------------------
def _targets(pipe, n=2):
    return torch.randn(n, 4, pipe.unet.config.sample_size, pipe.unet.config.sample_size,
                       generator=torch.Generator().manual_seed(5))


@pytest.mark.parametrize("layout", ["sd1", "sd2"])
def test_the_attack_gradient_flows_through_ren_when_applied(clip_tokenizer, layout):
    pipe = _pipe(layout, clip_tokenizer)
    pipe.unet.requires_grad_(False)
    loss = DiffusionLoss(pipe, pairs=2)
    y0 = encode_prompts(pipe, ["a cat", "a dog"])

    def grad():
        y = y0.clone().requires_grad_(True)
        loss(y, _targets(pipe), [item_generator("t", i) for i in range(2)]).sum().backward()
        return y.grad

    plain = grad()
    with RenRescaling().apply(pipe, prompt="a cat"):
        through = grad()
    assert torch.isfinite(through).all() and (through - plain).abs().max() > 1e-6
    assert torch.equal(through[:, 4:], torch.zeros_like(through[:, 4:]))  # masked positions get no gradient


def test_through_adjustments_is_the_objective_at_the_adjusted_trigger_with_straight_through_gradient(clip_tokenizer):
    pipe = _pipe("sd1", clip_tokenizer)
    pipe.unet.requires_grad_(False)
    inner = DiffusionLoss(pipe, pairs=2)
    wen = WenAdjustment(WenConfig(target_loss=0.0, iterations=2))
    through = ThroughAdjustments(inner, pipe, [wen])
    targets = _targets(pipe)
    y = encode_prompts(pipe, ["a cat", "a dog"]).requires_grad_(True)
    value = through(y, targets, [item_generator("t", i) for i in range(2)])
    value.sum().backward()
    gens = [item_generator("t", i) for i in range(2)]
    noise = torch.stack([torch.randn(tuple(targets.shape[1:]), generator=g) for g in gens])
    adjusted = wen.adjust(pipe, y.detach(), noise).requires_grad_(True)
    expected = inner(adjusted, targets, gens)
    expected.sum().backward()
    torch.testing.assert_close(value, expected)
    torch.testing.assert_close(y.grad, adjusted.grad)


def test_non_adaptive_checks_apply_the_mitigation_only_to_their_generations(testbed_pipe):
    pipe = testbed_pipe
    y = encode_prompts(pipe, ["a cup of coffee on a saucer, top view photo"])
    seen = []

    def check(y, which):
        seen.append(encode_prompts(pipe, ["a cat"]))
        return which

    tokens = RandomTokens(RandomTokensConfig(seed=3))
    wrapped = WithMitigations(check, pipe, [tokens])
    assert wrapped(y, [0]) == [0]
    augmented = encode_prompts(pipe, [augment_caption("a cat", tokens.config, pipe.tokenizer)])
    torch.testing.assert_close(seen[0], augmented)
    torch.testing.assert_close(encode_prompts(pipe, ["a cat"]), encode_prompts(pipe, ["a cat"]))  # removed after


# -- detection ------------------------------------------------------------------------------------------------
def test_roc_auc_and_tpr_at_fpr_match_hand_computed_values():
    pos, neg = [0.9, 0.8, 0.4], [0.5, 0.4, 0.1, 0.05]
    # pairs: 0.9 > all 4, 0.8 > all 4, 0.4 > 2 and ties 1 -> (4 + 4 + 2 + 0.5) / 12
    assert roc_auc(pos, neg) == pytest.approx(10.5 / 12)
    assert tpr_at_fpr(pos, neg, 0.01) == pytest.approx(2 / 3)  # above the highest negative
    assert tpr_at_fpr(pos, neg, 0.25) == pytest.approx(2 / 3)  # flags above 0.4: one negative (0.5), 0.4 is not
    assert tpr_at_fpr(pos, neg, 0.5) == pytest.approx(1.0)  # flags above 0.1: two negatives, every positive
    row = separation("noise-norm", "memorized", pos, "non-memorized", neg)
    assert row.n_positive == 3 and row.positive_median == pytest.approx(0.8)


@pytest.mark.parametrize("layout", ["sd1", "sd2"])
def test_noise_norm_scores_equal_the_norm_tracked_during_generation(clip_tokenizer, layout):
    pipe = _pipe(layout, clip_tokenizer)
    y = encode_prompts(pipe, ["a cat", "a dog"])
    scores = noise_norm_scores(pipe, y, [4, 5], steps=3)
    gens = generate(pipe, [4, 5, 4, 5], prompt_embeds=y.repeat_interleave(2, 0),
                    config=GenerationConfig(num_inference_steps=3))
    torch.testing.assert_close(scores, gens.noise_norm[:, 0].view(2, 2).mean(1), rtol=1e-4, atol=1e-6)


def test_noise_norm_penalty_adds_the_weighted_excess_of_the_first_step_norm(clip_tokenizer):
    pipe = _pipe("sd2", clip_tokenizer)
    pipe.unet.requires_grad_(False)
    inner = DiffusionLoss(pipe, pairs=2)
    penalty = NoiseNormPenalty(pipe, inner, weight=2.0, target=0.01, steps=3)
    y, targets = encode_prompts(pipe, ["a cat", "a dog"]), _targets(pipe)
    value = penalty(y, targets, [item_generator("p", i) for i in range(2)])
    gens = [item_generator("p", i) for i in range(2)]
    base = inner(y, targets, gens)
    noise = torch.stack([torch.randn(tuple(targets.shape[1:]), generator=g) for g in gens])
    from copy import deepcopy

    sched = deepcopy(pipe.scheduler)
    sched.set_timesteps(3)
    t = sched.timesteps[0]
    x = sched.scale_model_input(noise * sched.init_noise_sigma, t)
    with torch.no_grad():
        cond = pipe.unet(x, t, encoder_hidden_states=y).sample
        uncond = pipe.unet(x, t, encoder_hidden_states=empty_embedding(pipe).expand(2, -1, -1)).sample
    norm = epsilon_scale(pipe.scheduler, t) * (cond - uncond).flatten(1).norm(dim=1)
    expected = base + 2.0 * torch.relu(norm - 0.01) / np.sqrt(targets[0].numel())
    torch.testing.assert_close(value, expected, rtol=1e-4, atol=1e-6)
    assert penalty.pairs == 4


def test_unconditional_rows_are_the_empty_prompts(clip_tokenizer):
    pipe = _pipe("sd1", clip_tokenizer)
    empty = empty_embedding(pipe)
    states = torch.cat([empty, encode_prompts(pipe, ["a cat"]), empty])
    assert unconditional_rows(states, empty).tolist() == [True, False, True]


# -- the verbs on your own model ------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["wen", "ren", "random-tokens"])
def test_mitigate_and_attack_with_an_inference_mitigation_on_your_own_model(tiny_pipeline_folder, tmp_path, method):
    """`dori mitigate wen|ren|random-tokens --model` then `dori attack --mitigation --no-adaptive` and
    `--adaptive` on tiny SD 1.x / SD 2.x folders with an SSCD file: both runs finish and record the flag."""
    import json

    from typer.testing import CliRunner

    from dori.cli import app
    from tests.helpers import write_prompts_with_references, write_sscd

    runner = CliRunner()
    csv, refs = write_prompts_with_references(tmp_path / "data", ["a cat"])
    settings = {"wen": ["--iterations", "1", "--adaptive-steps", "2"], "ren": [], "random-tokens": []}[method]
    fit = runner.invoke(app, ["mitigate", method, "--model", str(tiny_pipeline_folder), "--prompts", str(csv),
                              "--out", str(tmp_path / "fit"), *settings])
    assert fit.exit_code == 0, fit.output
    path = tmp_path / "fit" / f"{method}.safetensors"
    assert load_mitigation(path).name == method
    sscd = write_sscd(tmp_path / "sscd.pt")
    for flag in ("--no-adaptive", "--adaptive"):
        out = tmp_path / f"attack{flag}"
        result = runner.invoke(app, ["attack", "--model", str(tiny_pipeline_folder), "--prompts", str(csv),
                                     "--references", str(refs), "--descriptor", str(sscd), "--mitigation", str(path),
                                     flag, "--steps", "1", "--seeds", "1", "--eval-steps", "2", "--out", str(out)])
        assert result.exit_code == 0, result.output
        manifest = json.loads((out / "manifest.json").read_text())
        assert manifest["config"]["adaptive"] is (flag == "--adaptive")


def test_wen_config_refuses_bad_values():
    from dori.errors import DoriError

    for bad in ({"lr": 0}, {"iterations": -1}, {"target_loss": float("nan")}, {"adaptive_steps": 0}):
        with pytest.raises(DoriError, match=next(iter(bad))):
            WenConfig(**bad).validate()
    with pytest.raises(DoriError, match="style"):
        RandomTokensConfig(style="emoji").validate()
    with pytest.raises(DoriError, match="scale"):
        RenConfig(scale=0).validate()


