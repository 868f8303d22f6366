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


def test_esd_is_a_registered_weights_mitigation_whose_folder_loads(testbed_pipe, tmp_path):
    """``dori mitigate esd``: ``iterations`` counts per caption, the artefact holds only cross-attention
    tensors (esd-x), the pipeline it was fitted on is left as it was, the saved folder loads as a pipeline
    whose UNet is the mitigated one."""
    assert MITIGATIONS.get("esd").kind == "weights"
    before = {k: v.clone() for k, v in testbed_pipe.unet.state_dict().items()}
    result = run_mitigate(testbed_pipe, MitigateConfig("esd", "testbed:memorized", limit=2,
                                                       settings={"iterations": 2, "lr": 1e-3}), tmp_path / "esd")
    assert all(torch.equal(before[k], v) for k, v in testbed_pipe.unet.state_dict().items())
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
