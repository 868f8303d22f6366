"""The fine-tuning unlearning baselines of Table 2 (ESD) and the training loop they share, on tiny SD 1.x /
2.x pipelines and the testbed."""

from __future__ import annotations

import pytest
import torch

from dori.errors import DoriError
from dori.finetune.unlearning import train_unlearning
from dori.mitigations import MITIGATIONS, MitigateConfig, load_mitigation, mitigated, run_mitigate
from dori.mitigations.esd import ESDConfig, ESDObjective, trainable_names
from dori.models import encode_prompts, load_pipeline
from dori.seeding import item_generator

from .conftest import tiny_components


def tiny_pipe(layout: str, tokenizer):
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline(**tiny_components(layout, tokenizer))


def sample_by_hand(pipe, unet, context, guidance, noise, steps, k):
    """Guided sampling to step ``k``. DDIM (the SD 2.x pipeline's sampler) is written out: x0 and eps from
    the model's output, then the step to the previous timestep (alpha_bar of timestep 0 past the end, as
    set_alpha_to_one=False gives); PNDM (SD 1.x's) keeps its multistep state, so its own ``step`` is used."""
    scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config)
    scheduler.set_timesteps(steps)
    alphas = pipe.scheduler.alphas_cumprod
    x = noise * scheduler.init_noise_sigma
    for t in scheduler.timesteps[:k]:
        out = unet(torch.cat([x, x]), t, encoder_hidden_states=context).sample
        uncond, cond = out.chunk(2)
        out = uncond + guidance * (cond - uncond)
        if pipe.scheduler.config.prediction_type != "v_prediction":
            x = scheduler.step(out, t, x).prev_sample
            continue
        a = alphas[int(t)]
        prev = int(t) - 1000 // steps
        a_prev = alphas[prev] if prev >= 0 else alphas[0]
        x0, eps = a.sqrt() * x - (1 - a).sqrt() * out, a.sqrt() * out + (1 - a).sqrt() * x
        x = a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps
    return x, scheduler.timesteps[k]


@pytest.mark.parametrize("layout", ["sd1", "sd2"])
def test_esd_loss_equals_a_hand_computed_value(clip_tokenizer, layout):
    """The objective's loss for fixed draws equals ESD's formula computed by hand: the frozen model's
    guided sampling to step k, then MSE(trained(x, t, c), e_c - eta (e_c - e_0))."""
    pipe = tiny_pipe(layout, clip_tokenizer)
    config = ESDConfig(num_inference_steps=5, negative_guidance=1.5, start_guidance=3.0)
    objective = ESDObjective(pipe, ["a cat", "a dog"], config)
    step = next(s for s in range(1, 50) if objective.draw(s)[1] >= 2)  # a draw that samples at least 2 steps
    index, k, noise = objective.draw(step)
    g = item_generator("esd", 0, step)
    assert k == int(torch.randint(5, (1,), generator=g)) and index == (step - 1) % 2
    assert torch.equal(noise, torch.randn((1, 4, 8, 8), generator=g))
    trained = tiny_pipe(layout, clip_tokenizer).unet  # the same initial weights, then moved a little
    with torch.no_grad():
        for p in trained.parameters():
            p.add_(0.01 * torch.randn_like(p))
    with torch.no_grad():
        c, e = encode_prompts(pipe, ["a dog" if index else "a cat"]), encode_prompts(pipe, [""])
        x, t = sample_by_hand(pipe, pipe.unet, torch.cat([e, c]), 3.0, noise, 5, k)
        e_c, e_0 = pipe.unet(x, t, encoder_hidden_states=c).sample, pipe.unet(x, t, encoder_hidden_states=e).sample
        expected = ((trained(x, t, encoder_hidden_states=c).sample - (e_c - 1.5 * (e_c - e_0))) ** 2).mean()
        loss, parts = objective.loss(trained, step)
    assert parts["k"] == k
    assert loss.item() == pytest.approx(expected.item(), rel=1e-4, abs=1e-7)


def test_esd_trains_the_layers_of_its_variant(clip_tokenizer):
    unet = tiny_pipe("sd2", clip_tokenizer).unet
    x, u = set(trainable_names(unet, "esd-x")), set(trainable_names(unet, "esd-u"))
    assert x and u and not x & u
    assert all(".attn2." in n for n in x) and not any(".attn2." in n for n in u)
    assert "conv_in.weight" in u and not any("norm" in n.split(".")[-2] for n in x | u)
    with pytest.raises(DoriError, match="variant"):
        ESDConfig(variant="esd-z").validate()
    with pytest.raises(DoriError, match="iterations"):
        ESDConfig(iterations=0).validate()


def test_a_resumed_run_ends_with_the_weights_of_an_uninterrupted_one(clip_tokenizer, tmp_path):
    config = ESDConfig(iterations=4, checkpoint_every=2, num_inference_steps=3, lr=1e-3, save_pipeline=False)

    def train(out, progress=None):
        pipe = tiny_pipe("sd1", clip_tokenizer)
        objective = ESDObjective(pipe, ["a cat"], config)
        train_unlearning(pipe, objective, config, out, config=config.to_dict(), stage="ESD", progress=progress)
        return pipe.unet.state_dict()

    whole = train(tmp_path / "whole")

    def stop_at_3(stage, step, total, info=""):
        if step == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(tmp_path / "cut", progress=stop_at_3)
    assert sorted(p.name for p in (tmp_path / "cut" / "checkpoints").iterdir()) == ["step-000002"]
    resumed = train(tmp_path / "cut")
    assert all(torch.equal(whole[k], resumed[k]) for k in whole)
    moved = tiny_pipe("sd1", clip_tokenizer).unet.state_dict()
    assert any(not torch.equal(whole[k], moved[k]) for k in whole)  # training changed something


def test_a_finished_run_keeps_no_checkpoint_and_its_rerun_trains_nothing(clip_tokenizer, tmp_path, monkeypatch):
    """With the pipeline saved the checkpoint goes; the rerun reads the trained UNet from the pipeline folder
    (the objective's loss is never called) and reports the run's summary."""
    config = ESDConfig(iterations=2, checkpoint_every=1, num_inference_steps=3, lr=1e-3)

    def train(out):
        pipe = tiny_pipe("sd1", clip_tokenizer)
        result = train_unlearning(pipe, ESDObjective(pipe, ["a cat"], config), config, out, config=config.to_dict(),
                                  stage="ESD")
        return pipe, result

    pipe_a, first = train(tmp_path / "esd")
    assert first.pipeline is not None and not (tmp_path / "esd" / "checkpoints").exists()

    def no_loss(self, model, draw):
        raise AssertionError("a finished run trained again")

    monkeypatch.setattr(ESDObjective, "loss", no_loss)
    pipe_b, again = train(tmp_path / "esd")
    a, b = pipe_a.unet.state_dict(), pipe_b.unet.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert again.summary == first.summary and again.pipeline == first.pipeline
    assert any(not torch.equal(a[k], v) for k, v in tiny_pipe("sd1", clip_tokenizer).unet.state_dict().items())


def test_esd_is_a_registered_weights_mitigation_whose_folder_loads(testbed_pipe, tmp_path):
    """``dori mitigate esd``: ``iterations`` counts per caption, the artefact holds only cross-attention
    tensors (esd-x), the pipeline it was fitted on is left as it was, the saved folder loads as a pipeline
    whose UNet is the mitigated one."""
    import tempfile
    from pathlib import Path

    assert MITIGATIONS.get("esd").kind == "weights"
    before = {k: v.clone() for k, v in testbed_pipe.unet.state_dict().items()}
    scratch = set(Path(tempfile.gettempdir()).glob("dori-esd-*"))
    result = run_mitigate(testbed_pipe, MitigateConfig("esd", "testbed:memorized", limit=2,
                                                       settings={"iterations": 2, "lr": 1e-3}), tmp_path / "esd")
    assert all(torch.equal(before[k], v) for k, v in testbed_pipe.unet.state_dict().items())
    assert set(Path(tempfile.gettempdir()).glob("dori-esd-*")) == scratch  # the weights' copy is gone with its folder
    esd = load_mitigation(result.artefact)
    assert esd.tensors and all(".attn2." in name for name in esd.tensors)
    assert esd.meta["deviations"] and esd.meta["steps"] == 2 * 2
    saved = load_pipeline(result.summary["pipeline"])
    with mitigated(testbed_pipe, esd):
        assert all(torch.equal(v, saved.unet.state_dict()[k]) for k, v in testbed_pipe.unet.state_dict().items())


def test_mitigate_uses_the_testbed_setting_only_on_the_testbed(sd1_folder, tmp_path):
    """`dori mitigate esd` on the testbed's prompts takes ESDConfig.testbed(); on another model the official
    defaults; a setting on the command line wins over both."""
    import yaml
    from typer.testing import CliRunner

    from dori.cli import app
    from tests.helpers import write_prompts_with_references

    runner = CliRunner()

    def shown(*args):
        result = runner.invoke(app, ["mitigate", "esd", *args, "--show-config"])
        assert result.exit_code == 0, result.output
        return yaml.safe_load(result.output[result.output.index("method"):])["settings"]

    assert shown()["lr"] == ESDConfig.testbed().lr != ESDConfig().lr
    prompts, refs = write_prompts_with_references(tmp_path, ["a cat", "a dog"])
    other = shown("--model", str(sd1_folder), "--prompts", str(prompts), "--references", str(refs))
    assert other["lr"] == ESDConfig().lr and other["iterations"] == ESDConfig().iterations
    assert shown("--lr", "0.001")["lr"] == 0.001


# -- Concept Ablation and SISS -------------------------------------------------------------------------------
def _records(prompts):
    import numpy as np

    from dori.prompts import PromptRecord, PromptSet

    rng = np.random.default_rng(0)
    records = [PromptRecord(f"p{i}", p) for i, p in enumerate(prompts)]
    return PromptSet("tiny", records, {r.id: rng.integers(0, 255, (16, 16, 3), dtype=np.uint8) for r in records})


def _paraphrase_file(tmp_path, prompts):
    import json

    path = tmp_path / "paraphrases.json"
    path.write_text(json.dumps({f"p{i}": [f"{p} photo", f"a {p}", f"the {p}"] for i, p in enumerate(prompts)}))
    return str(path)


@pytest.mark.parametrize("layout", ["sd1", "sd2"])
def test_concept_ablation_loss_equals_a_hand_computed_value(clip_tokenizer, layout, tmp_path):
    """For fixed draws: MSE(unet(x_t, t, target caption), unet(x_t, t, anchor caption) without gradient)
    + MSE(unet(x'_t, t', anchor caption'), eps or v), x_t = sqrt(abar) x + sqrt(1 - abar) eps."""
    from dori.mitigations.concept_ablation import ConceptAblationConfig, ConceptAblationObjective

    pipe = tiny_pipe(layout, clip_tokenizer)
    prompts = _records(["a cat", "a dog"])
    config = ConceptAblationConfig(paraphrases=_paraphrase_file(tmp_path, ["a cat", "a dog"]), prior_loss_weight=0.5)
    objective = ConceptAblationObjective(pipe, prompts, config)
    g = torch.Generator().manual_seed(3)
    objective.latents = torch.randn(2, 3, 4, 8, 8, generator=g)  # (flip, image, C, h, w)
    objective.captions, objective.owners = ["a kitten", "a puppy", "a hound"], [0, 1, 1]
    objective.selection = [{"targets": ["a cat"]}, {"targets": ["a dog", "the dog"]}]
    texts = ["a kitten", "a puppy", "a hound", "a cat", "a dog", "the dog"]
    objective.embeds = dict(zip(texts, encode_prompts(pipe, texts), strict=True))
    step = 5
    d = objective.draw(step)
    h = item_generator("concept-ablation", 0, step)
    instance, prior = torch.randint(3, (2,), generator=h), torch.randint(3, (2,), generator=h)
    flips = (torch.rand(4, generator=h) < 0.5).long()
    pick = torch.rand(2, generator=h)
    assert torch.equal(d["instance"], instance) and torch.equal(d["prior"], prior) and torch.equal(d["flips"], flips)
    for j, u, target in zip(instance.tolist(), pick.tolist(), d["targets"], strict=True):
        options = objective.selection[objective.owners[j]]["targets"]
        assert target == options[int(u * len(options))]
    noise, t = torch.randn(4, 4, 8, 8, generator=h), torch.randint(1000, (4,), generator=h)
    assert torch.equal(d["noise"], noise) and torch.equal(d["t"], t)

    unet = pipe.unet
    abar = pipe.scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
    index = torch.cat([instance, prior])
    x0 = torch.stack([objective.latents[f, i] for f, i in zip(flips.tolist(), index.tolist(), strict=True)])
    xt = abar.sqrt() * x0 + (1 - abar).sqrt() * noise
    anchor = torch.stack([objective.embeds[objective.captions[i]] for i in index.tolist()])
    target = torch.stack([objective.embeds[c] for c in d["targets"]])
    with torch.no_grad():
        want_instance = unet(xt[:2], t[:2], encoder_hidden_states=anchor[:2]).sample
        got_instance = unet(xt[:2], t[:2], encoder_hidden_states=target).sample
        prior_pred = unet(xt[2:], t[2:], encoder_hidden_states=anchor[2:]).sample
        prior_target = noise[2:] if layout == "sd1" else abar[2:].sqrt() * noise[2:] - (1 - abar[2:]).sqrt() * x0[2:]
        expected = ((got_instance - want_instance) ** 2).mean() + 0.5 * ((prior_pred - prior_target) ** 2).mean()
        loss, parts = objective.loss(unet, step)
    assert torch.allclose(loss, expected, rtol=1e-5, atol=1e-6)
    assert set(parts) == {"ablation", "prior"}


def _siss_objective(pipe, tmp_path, config):
    from dori.mitigations.siss import SISSObjective

    objective = SISSObjective(pipe, _records(["a cat", "a dog"]), config)
    g = torch.Generator().manual_seed(4)
    objective.keep = [torch.randn(2, 3, 4, 8, 8, generator=g), torch.randn(2, 5, 4, 8, 8, generator=g)]
    objective.delete = [torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)]
    objective.captions = encode_prompts(pipe, ["a cat", "a dog"])
    ac = pipe.scheduler.alphas_cumprod
    objective.gamma, objective.sigma = ac.sqrt(), (1 - ac).sqrt()
    return objective


@pytest.mark.parametrize("layout", ["sd1", "sd2"])
def test_siss_terms_equal_a_hand_computed_value(clip_tokenizer, layout, tmp_path):
    """SISS's keep and deletion terms for fixed draws, written out from the paper's estimator: one prediction
    at the mixture sample m, w_x |pred - eps_x|^2 and w_a |pred - eps_a|^2 with the defensive-mixture weights
    (v = sqrt(abar) eps - sqrt(1 - abar) y on the v-prediction pipeline)."""
    from dori.mitigations.siss import SISSConfig

    pipe = tiny_pipe(layout, clip_tokenizer)
    config = SISSConfig(batch_size=3, timestep_min=10, timestep_max=990, lambd=0.3)
    objective = _siss_objective(pipe, tmp_path, config)
    for step in (1, 2):
        d = objective.draw(step)
        h = item_generator("siss", 0, step)
        i = (step - 1) % 2
        keep = torch.randint(objective.keep[i].shape[1], (3,), generator=h)
        flips = (torch.rand(2, 3, generator=h) < 0.5).long()
        noise, t = torch.randn(3, 4, 8, 8, generator=h), torch.randint(10, 990, (3,), generator=h)
        deletion = torch.rand(3, generator=h) <= 0.3
        assert d["caption"] == i and torch.equal(d["keep"], keep) and torch.equal(d["t"], t)
        assert torch.equal(d["deletion"], deletion) and torch.equal(d["noise"], noise)
        abar = pipe.scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
        x = torch.stack([objective.keep[i][f, k] for f, k in zip(flips[0].tolist(), keep.tolist(), strict=True)])
        a = objective.delete[i][flips[1]]
        m = torch.stack([(abar[j].sqrt() * (a[j] if deletion[j] else x[j]) + (1 - abar[j]).sqrt() * noise[j])
                         for j in range(3)])
        with torch.no_grad():
            pred = pipe.unet(m, t, encoder_hidden_states=objective.captions[i : i + 1].repeat(3, 1, 1)).sample
            terms, _ = objective.loss(pipe.unet, step)
        want = {}
        for name, y, other in (("keep", x, a), ("delete", a, x)):
            eps = (m - abar.sqrt() * y) / (1 - abar).sqrt()
            target = eps if layout == "sd1" else abar.sqrt() * eps - (1 - abar).sqrt() * y
            log_q_y = -((m - abar.sqrt() * y) ** 2).sum((1, 2, 3)) / (2 * (1 - abar.flatten()))
            log_q_o = -((m - abar.sqrt() * other) ** 2).sum((1, 2, 3)) / (2 * (1 - abar.flatten()))
            # mixture density over the sampled one: ((1 - l) q_x + l q_a) / q_y
            lam_y, lam_o = (0.7, 0.3) if name == "keep" else (0.3, 0.7)
            weight = 1 / (lam_y + lam_o * torch.exp(log_q_o - log_q_y))
            want[name] = (weight.view(-1, 1, 1, 1) * (pred - target) ** 2).sum() / 3
        for name in ("keep", "delete"):
            assert torch.allclose(terms[name], want[name], rtol=1e-4), (name, terms[name], want[name])


def test_siss_update_is_the_keep_gradient_minus_the_rescaled_deletion_gradient(clip_tokenizer, tmp_path):
    """One update of the shared loop over 2 accumulated draws, with plain SGD at lr 1 and no clipping, moves
    the weights by -(g_keep - s / |g_delete| g_delete), each g the mean of the draws' term gradients."""
    from dori.mitigations.siss import SISSConfig

    pipe = tiny_pipe("sd1", clip_tokenizer)
    config = SISSConfig(iterations=1, gradient_accumulation=2, max_grad_norm=None, scaling_norm=0.5,
                        timestep_min=0, save_pipeline=False)
    objective = _siss_objective(pipe, tmp_path, config)
    objective.optimizer = lambda params: torch.optim.SGD(params, lr=1.0)
    objective.prepare = None
    params = list(pipe.unet.parameters())
    before = [p.detach().clone() for p in params]
    sums = {"keep": [torch.zeros_like(p) for p in params], "delete": [torch.zeros_like(p) for p in params]}
    for draw in (1, 2):
        terms, _ = objective.loss(pipe.unet, draw)
        for name in ("keep", "delete"):
            grads = torch.autograd.grad(terms[name] / 2, params, retain_graph=name == "keep", allow_unused=True)
            for s, g in zip(sums[name], grads, strict=True):
                if g is not None:
                    s.add_(g)
    norm = torch.sqrt(sum((g ** 2).sum() for g in sums["delete"]))
    expected = [b - (gk - 0.5 / norm * gd) for b, gk, gd in zip(before, sums["keep"], sums["delete"], strict=True)]
    train_unlearning(pipe, objective, config, tmp_path / "run", config=config.to_dict(), stage="SISS")
    after = list(pipe.unet.parameters())
    assert max(float((a - e).abs().max()) for a, e in zip(after, expected, strict=True)) < 1e-5
    assert any(not torch.equal(a, b) for a, b in zip(after, before, strict=True))


@pytest.mark.parametrize("method", ["concept-ablation", "siss"])
def test_resume_gives_the_uninterrupted_weights_and_the_folder_loads(clip_tokenizer, tmp_path, method):
    """Concept Ablation and SISS on a tiny SD 1.x pipeline with an SSCD file: the generated data and the
    training resume after an interruption to the weights of an uninterrupted run; the fitted mitigation is
    registered, lists its deviations, and its pipeline folder loads with the mitigated UNet."""
    from dori.mitigations.concept_ablation import ConceptAblationConfig
    from dori.mitigations.siss import SISSConfig
    from tests.helpers import write_sscd

    prompts = ["a cat", "a dog"]
    descriptor = {"spec": str(write_sscd(tmp_path / "sscd.pt")), "threshold": 0.999}
    common = dict(iterations=2, checkpoint_every=1, lr=1e-3, num_inference_steps=2, paraphrases=_paraphrase_file(tmp_path, prompts))
    if method == "concept-ablation":
        settings = ConceptAblationConfig(**common, num_class_images=3, paraphrase_images=2, image_threshold=0.999,
                                         anchor_threshold=1.0)
    else:
        settings = SISSConfig(**common, keep_images=3, batch_size=2, gradient_accumulation=2)
    settings = {**settings.to_dict(), "descriptor": descriptor}
    csv, refs = write_prompts_with_references_tmp(tmp_path, prompts)

    def fit(out, progress=None):
        pipe = tiny_pipe("sd1", clip_tokenizer)
        config = MitigateConfig(method, str(csv), references=str(refs), settings=settings)
        return pipe, run_mitigate(pipe, config, out, progress=progress)

    _, whole = fit(tmp_path / "whole")
    fitted = load_mitigation(whole.artefact)
    _, again = fit(tmp_path / "whole")  # the finished run, read back: the same sidecar (its data's figures too)
    refit = load_mitigation(again.artefact)
    assert refit.meta == fitted.meta and all(torch.equal(refit.tensors[k], v) for k, v in fitted.tensors.items())
    stage = {"concept-ablation": "Concept Ablation", "siss": "SISS"}[method]

    def stop(name, step, total, info=""):
        if name.endswith(stage) and step == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        fit(tmp_path / "cut", progress=stop)
    pipe, resumed = fit(tmp_path / "cut")
    a, b = load_mitigation(whole.artefact), load_mitigation(resumed.artefact)
    assert a.tensors.keys() == b.tensors.keys() and all(torch.equal(a.tensors[k], b.tensors[k]) for k in a.tensors)
    assert MITIGATIONS.get(method).kind == "weights" and b.meta["deviations"] and b.meta["steps"] == 4
    saved = load_pipeline(resumed.summary["pipeline"])
    with mitigated(pipe, b):
        assert all(torch.equal(v, saved.unet.state_dict()[k]) for k, v in pipe.unet.state_dict().items())


def write_prompts_with_references_tmp(tmp_path, prompts):
    from tests.helpers import write_prompts_with_references

    return write_prompts_with_references(tmp_path / "in", prompts)


def test_concept_ablation_picks_anchors_and_filters_images_on_the_testbed(testbed_pipe, tmp_path):
    """On the testbed: anchors are the paraphrases that replicate in at most 30% of their generations, the
    targets hold the caption and those at 60% or more, and every kept anchor image scores at most the
    threshold against every memorized photo."""
    from dori.finetune.generated_sets import INDEX
    from dori.mitigations.concept_ablation import ConceptAblationConfig, ConceptAblationObjective
    from dori.prompts import prompts_for
    from dori.runs import read_jsonl

    prompts = prompts_for(testbed_pipe, "testbed:memorized").subset(2)
    config = ConceptAblationConfig.testbed(num_class_images=12, paraphrase_images=4)
    objective = ConceptAblationObjective(testbed_pipe, prompts, config)
    objective.prepare(tmp_path)
    for record, chosen in zip(prompts.records, objective.selection, strict=True):
        scores = chosen["scores"]
        assert chosen["anchors"] and all(scores[p] <= 0.3 for p in chosen["anchors"])
        assert chosen["targets"][0] == record.prompt and all(scores[p] >= 0.6 for p in chosen["targets"][1:])
    rows = [r for i in range(2) for r in read_jsonl(tmp_path / "anchor-images" / f"{i:03d}" / INDEX)]
    assert len(rows) == 24 and all(r["kept"] == (r["similarity"] <= 0.5093) for r in rows)
    assert len(objective.captions) == sum(r["kept"] for r in rows)


def test_paraphrases_are_checked(tmp_path):
    from dori.paraphrases import load_paraphrases

    records = _records(["a cat"]).records
    with pytest.raises(DoriError, match="paraphrases: this method needs"):
        load_paraphrases(None, records, testbed=False)
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(DoriError, match="is not JSON"):
        load_paraphrases(bad, records, testbed=False)
    other = tmp_path / "other.json"
    other.write_text('{"p9": ["x"]}')
    with pytest.raises(DoriError, match="no paraphrases for 'p0'"):
        load_paraphrases(other, records, testbed=False)
    by_text = tmp_path / "text.json"
    by_text.write_text('{"a cat": ["a kitten", " "]}')
    assert load_paraphrases(by_text, records, testbed=False) == {"p0": ["a kitten"]}


@pytest.mark.parametrize("method", ["concept-ablation", "siss"])
def test_mitigate_fits_concept_ablation_and_siss_on_your_own_model(tiny_pipeline_folder, tmp_path, method):
    """`dori mitigate concept-ablation|siss --model --prompts --references --descriptor --paraphrases` on tiny SD 1.x
    and SD 2.x folders: the fitted mitigation and a pipeline folder; without paraphrases Concept Ablation
    stops before writing anything, naming the option."""
    from typer.testing import CliRunner

    from dori.cli import app
    from tests.helpers import write_sscd

    runner = CliRunner()
    csv, refs = write_prompts_with_references_tmp(tmp_path, ["a cat"])
    common = ["mitigate", method, "--model", str(tiny_pipeline_folder), "--prompts", str(csv), "--references",
              str(refs), "--descriptor", str(write_sscd(tmp_path / "sscd.pt")), "--iterations", "1",
              "--num-inference-steps", "2", "--gradient-accumulation", "1"]
    sizes = {"concept-ablation": ["--num-class-images", "2", "--paraphrase-images", "2", "--anchor-threshold", "1",
                                  "--image-threshold", "1"],
             "siss": ["--keep-images", "2", "--keep-threshold", "1"]}[method]
    if method == "concept-ablation":
        bare = runner.invoke(app, [*common, *sizes, "--out", str(tmp_path / "bare")])
        assert bare.exit_code == 2 and "paraphrases:" in bare.output and not (tmp_path / "bare").exists()
    result = runner.invoke(app, [*common, *sizes, "--paraphrases", _paraphrase_file(tmp_path, ["a cat"]),
                                 "--out", str(tmp_path / "fit")])
    assert result.exit_code == 0, result.output
    fitted = load_mitigation(tmp_path / "fit" / f"{method}.safetensors")
    assert fitted.meta["steps"] == 1 and fitted.meta["config"]["descriptor"]["spec"].endswith("sscd.pt")
    assert (tmp_path / "fit" / method / "pipeline" / "unet" / "config.json").is_file()


def test_a_snapshot_on_disk_is_the_weights_and_leaves_no_file(clip_tokenizer, tmp_path):
    """The copy a fit compares with and restores from: memory-mapped from ``path``, equal to the weights,
    independent of later changes to them, and (POSIX) no file left behind."""
    import os

    from dori.mitigations.kinds import snapshot

    pipe = tiny_pipe("sd1", clip_tokenizer)
    copy = snapshot(pipe, path=tmp_path / "before.pt")
    weights = pipe.unet.state_dict()
    assert set(copy) == {f"unet.{k}" for k in weights}
    assert all(torch.equal(copy[f"unet.{k}"], v) for k, v in weights.items())
    with torch.no_grad():
        next(pipe.unet.parameters()).add_(1.0)
    name = next(n for n, _ in pipe.unet.named_parameters())
    assert not torch.equal(copy[f"unet.{name}"], weights[name])
    if os.name == "posix":
        assert not (tmp_path / "before.pt").exists()
