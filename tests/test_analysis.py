import json
import math
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file
from scipy.spatial.distance import pdist

from dori.analysis import (
    ActivationsConfig,
    ScatterConfig,
    WeightsConfig,
    discrepancy,
    iou,
    iou_to_reference,
    load_trigger_set,
    mean_pairwise_iou,
    pairwise_iou,
    pairwise_l2,
    run_activations,
    run_scatter,
    run_weights,
    tsne_embed,
)
from dori.analysis.activations import raw_statistic, wanda_statistic
from dori.analysis.common import analysis_layers, prompt_embeddings, short_name
from dori.attack.loop import AttackConfig
from dori.attack.parts import RandomNormal
from dori.errors import DoriError
from dori.generation import GenerationConfig
from dori.mitigations.nemo import NeMoConfig
from dori.mitigations.wanda import WandaConfig, input_norms
from dori.models import encode_prompts

TINY_ATTACK = dict(starts=3, num_seeds=2, attack=AttackConfig(steps=3, record_at=(0,)),
                   generation=GenerationConfig(num_inference_steps=3), reference_count=10)
TINY_NEMO = NeMoConfig(num_seeds=2, ssim_threshold=0.5, num_inference_steps=5)
TINY_WANDA = WandaConfig(num_inference_steps=3, timesteps=2)


# -- pure functions ---------------------------------------------------------------------------------
def test_tsne_shapes_determinism_and_small_sets():
    points = torch.randn(12, 7, 5, generator=torch.Generator().manual_seed(0))
    a = tsne_embed(points, seed=3)
    assert a.shape == (12, 2) and np.isfinite(a).all()
    assert np.array_equal(a, tsne_embed(points, seed=3))
    assert tsne_embed(points[:4], seed=0).shape == (4, 2)  # perplexity 30 is clipped below n
    with pytest.raises(DoriError, match="points"):
        tsne_embed(points[:2])


def test_iou_of_known_sets():
    assert iou(set(), set()) == 1.0
    assert iou({1, 2}, {3}) == 0.0
    assert iou({1, 2, 3}, {2, 3, 4}) == 0.5
    assert iou({5}, set()) == 0.0
    sets = [{1, 2}, {2}, set()]
    # pairs: ({1,2},{2}) 1/2, ({1,2},{}) 0, ({2},{}) 0
    assert np.allclose(pairwise_iou(sets), [0.5, 0.0, 0.0])
    assert math.isclose(mean_pairwise_iou(sets), 1 / 6)
    assert mean_pairwise_iou([set(), [], np.zeros(0, dtype=int)]) == 1.0
    masks = np.zeros((3, 4, 5), dtype=bool)
    masks[0, 0, :3] = True
    masks[1, 0, 1:4] = True
    assert math.isclose(mean_pairwise_iou(masks[:2]), 2 / 4)
    assert np.allclose(pairwise_iou(list(masks)), [iou(np.flatnonzero(a), np.flatnonzero(b))
                                                 for i, a in enumerate(masks) for b in masks[i + 1 :]])
    assert np.allclose(iou_to_reference([{1}, {1, 2}, set()], {1}), [1.0, 0.5, 0.0])
    with pytest.raises(DoriError, match="sets"):
        mean_pairwise_iou([{1}])


def test_discrepancy_and_pairwise_l2():
    same = torch.ones(4, 6)
    d = discrepancy(same)
    assert d.mean == 0 and d.std == 0 and d.n_pairs == 6 and d.n_members == 4
    x = torch.tensor([[0.0, 0.0], [3.0, 4.0], [6.0, 8.0]])
    d = discrepancy(x)  # pairs: 5, 10, 5
    assert math.isclose(d.mean, 20 / 3) and math.isclose(d.median, 5.0)
    assert math.isclose(d.std, float(np.std([5.0, 10.0, 5.0])))
    points = torch.randn(6, 3, 4)
    assert np.allclose(pairwise_l2(points), pdist(points.reshape(6, -1).double().numpy()))
    assert pairwise_l2(points[:1]).shape == (0,)
    with pytest.raises(DoriError, match="2 set members"):
        discrepancy(points[:1])


# -- building blocks on the testbed -------------------------------------------------------------------
def test_analysis_layers_pair_value_and_ffn_layers_by_block(testbed_pipe):
    values, ffns = analysis_layers(testbed_pipe.unet, NeMoConfig().layers)
    assert len(values) == len(ffns) >= 2
    for v, f in zip(values, ffns, strict=True):
        assert v.endswith("attn2.to_v") and f.endswith("ff.net.2")
        assert v.rsplit(".attn2", 1)[0] == f.rsplit(".ff", 1)[0]
        assert not v.startswith("up_blocks")
    assert short_name("down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_v") == "down 1.0"
    assert short_name("mid_block.attentions.0.transformer_blocks.0.ff.net.2") == "mid 0"


def test_wanda_statistic_is_wandas_first_step_input_norm(testbed_pipe):
    _, ffns = analysis_layers(testbed_pipe.unet, NeMoConfig().layers)
    y = encode_prompts(testbed_pipe, ["a cup of coffee on a saucer, top view photo", "a photo of grass"])
    config = WandaConfig(num_inference_steps=3, seed=4)
    ours = wanda_statistic(testbed_pipe, ffns, y, seed=4, num_inference_steps=3)
    for i in range(2):
        theirs = input_norms(testbed_pipe, ffns, None, config, prompt_embeds=y[i : i + 1])
        for name in ffns:
            assert torch.allclose(ours[name][i], theirs[name][0], rtol=1e-4, atol=1e-4)
    by_prompt = input_norms(testbed_pipe, ffns, ["a photo of grass"], config)
    assert all(torch.allclose(by_prompt[n], input_norms(testbed_pipe, ffns, None, config, prompt_embeds=y[1:])[n],
                              atol=1e-5) for n in ffns)
    with pytest.raises(DoriError, match="exactly one"):
        input_norms(testbed_pipe, ffns, ["a"], config, prompt_embeds=y)


def test_nemo_localises_an_embedding_like_its_prompt(testbed_pipe):
    from dori.mitigations.nemo import ActivationStatistics, localize_prompt, value_layers

    layers = value_layers(testbed_pipe.unet, TINY_NEMO.layers)
    stats = ActivationStatistics.compute(testbed_pipe, layers, ["a photo of grass", "a photo of gravel", "a colour wheel"])
    prompt = "a cup of coffee on a saucer, top view photo"
    config = replace(TINY_NEMO, refine=False)  # refinement reuses the same searcher; keep the test short
    by_prompt = localize_prompt(testbed_pipe, layers, prompt, stats, 0.5, config)
    by_embed = localize_prompt(testbed_pipe, layers, "label", stats, 0.5, config,
                               prompt_embeds=encode_prompts(testbed_pipe, [prompt])[0])
    assert by_embed.prompt == "label"
    assert (by_embed.memorized, by_embed.refined, by_embed.initial) == (by_prompt.memorized, by_prompt.refined,
                                                                        by_prompt.initial)
    with pytest.raises(DoriError, match="prompt_embeds"):
        localize_prompt(testbed_pipe, layers, "x", stats, 0.5, TINY_NEMO, prompt_embeds=torch.zeros(2, 77, 64))


# -- end to end: scatter, activations, weights ---------------------------------------------------------
@pytest.fixture(scope="module")
def scatter_run(testbed_pipe, tmp_path_factory):
    folder = tmp_path_factory.mktemp("analysis") / "scatter"
    path, summary = run_scatter(testbed_pipe, ScatterConfig(**TINY_ATTACK), folder)
    return path, summary


def test_scatter_run_folder(testbed_pipe, scatter_run):
    path, summary = scatter_run
    for name in ("manifest.json", "table.parquet", "distances.parquet", "summary.json", "scatter.png", "scatter.pdf",
                 "attack/manifest.json", "attack/triggers.safetensors"):
        assert (path / name).is_file(), name
    assert json.loads((path / "manifest.json").read_text())["status"] == "done"
    table = pd.read_parquet(path / "table.parquet")
    assert {"kind", "key", "restart", "status", "tsne_x", "tsne_y", "distance_to_start", "distance_to_prompt",
            "norm"} <= set(table.columns)
    assert table.kind.value_counts().to_dict() == {"start": 3, "trigger": 3, "prompt": 1}
    assert np.isfinite(table[["tsne_x", "tsne_y"]].to_numpy()).all()
    saved = json.loads((path / "summary.json").read_text())
    for key in ("prompt_id", "n_starts", "n_succeeded", "success_share", "distances", "ratio_mean", "ratio_median",
                "n_reference_prompts", "note"):
        assert key in saved, key
    assert saved["n_starts"] == 3 and saved["n_reference_prompts"] == 10
    assert "scaled down" in saved["note"] and "starts 3 (paper 100)" in saved["note"]
    distances = pd.read_parquet(path / "distances.parquet")
    trig = distances[distances.group == "triggers"].distance
    ref = distances[distances.group == "non-memorized prompts"].distance
    assert len(trig) == 3 and len(ref) == 45
    assert math.isclose(saved["ratio_mean"], trig.mean() / ref.mean(), rel_tol=1e-9)
    # the starts are the attack's own initial embeddings, redrawn from the RandomNormal initialiser
    prompt = saved["prompt"]
    for file in sorted((path / "attack" / "triggers").glob("*.safetensors")):
        tensors = load_file(str(file))
        restart = int(file.stem.rsplit("r", 1)[1])
        assert torch.equal(tensors["initial"], RandomNormal(0)(testbed_pipe, prompt, restart))
        row = table[(table.kind == "trigger") & (table.restart == restart)].iloc[0]
        assert math.isclose(row.distance_to_start, float((tensors["trigger"] - tensors["initial"]).norm()), rel_tol=1e-5)


def test_scatter_rerun_does_not_redo_the_attack(testbed_pipe, scatter_run, monkeypatch):
    from dori.attack.loop import EmbeddingAttack

    path, summary = scatter_run
    before = (path / "attack" / "records.rank0.jsonl").read_bytes()

    def no_attack(*args, **kwargs):
        raise AssertionError("the attack ran again")

    monkeypatch.setattr(EmbeddingAttack, "run", no_attack)
    again, summary2 = run_scatter(testbed_pipe, ScatterConfig(**TINY_ATTACK), path)
    assert again == path and (path / "attack" / "records.rank0.jsonl").read_bytes() == before
    assert summary2["ratio_mean"] == summary["ratio_mean"]
    with pytest.raises(DoriError, match="prompt_id"):
        run_scatter(testbed_pipe, ScatterConfig(**TINY_ATTACK, prompt_id="memorized/nope"), path.parent / "other")


def test_activations_run_folder(testbed_pipe, scatter_run, tmp_path):
    path, scatter = scatter_run
    if scatter["n_succeeded"] == 0:
        with pytest.raises(DoriError, match="--all-triggers"):
            load_trigger_set(path, successful_only=True)
    out, summary = run_activations(testbed_pipe, ActivationsConfig(triggers=str(path), successful_only=False),
                                   tmp_path / "act")
    for name in ("manifest.json", "table.parquet", "summary.json", "activations.png", "activations.pdf",
                 "activations.safetensors"):
        assert (out / name).is_file(), name
    table = pd.read_parquet(out / "table.parquet")
    assert {"method", "layer_id", "layer", "set", "n", "n_pairs", "mean", "std", "median"} <= set(table.columns)
    assert set(table["set"]) == {"Y_mem", "Y_adv", "Y_0"}  # Y_0: the triggers' starts, a control
    assert len(table) == 2 * 3 * 3  # methods x testbed layers x sets
    assert set(table[table["set"] == "Y_adv"].n) == {3} and set(table[table["set"] == "Y_mem"].n) == {4}
    acts = load_file(str(out / "activations.safetensors"))
    for row in table.itertuples():
        assert math.isclose(row.mean, discrepancy(acts[f"{row.method}/{row.set}/{row.layer}"]).mean, rel_tol=1e-9)
    assert (table["mean"] > 0).all()
    saved = json.loads((out / "summary.json").read_text())
    for key in ("n_adv", "n_mem", "methods", "note", "error_bars"):
        assert key in saved
    assert saved["n_adv"] == 3 and saved["n_mem"] == 4
    assert set(saved["methods"]) == {"nemo", "wanda"} and len(saved["methods"]["nemo"]["ratio_adv_over_mem"]) == 3
    # where each set's cross-attention looks, per value layer's block
    attention = saved["attention"]
    assert [short_name(n) for n in attention["layers"]] == ["down 0.0", "down 1.0", "mid 0"]
    tokens = testbed_pipe.tokenizer.model_max_length
    for name, members in (("Y_mem", 4), ("Y_adv", 3), ("Y_0", 3)):
        measured = attention["sets"][name]
        for layer, first, effective in zip(attention["layers"], measured["first_token"], measured["effective_tokens"],
                                           strict=True):
            assert 0 < first < 1 and 1 <= effective <= tokens
            assert acts[f"attention/{name}/{layer}/first_token"].shape == (members,)
            assert math.isclose(first, float(acts[f"attention/{name}/{layer}/first_token"].mean()), rel_tol=1e-6)


def test_raw_activation_maps(testbed_pipe, scatter_run, tmp_path):
    """``statistic="raw"``: the saved vectors are the whole to_v output / ff.net.2 input maps, flattened;
    a map larger than ``raw_max_features`` keeps a scaled subset of its coordinates."""
    path, _ = scatter_run
    config = ActivationsConfig(triggers=str(path), successful_only=False, statistic="raw")
    out, summary = run_activations(testbed_pipe, config, tmp_path / "raw")
    assert summary["statistic"] == "raw"
    acts = load_file(str(out / "activations.safetensors"))
    values, ffns = analysis_layers(testbed_pipe.unet, config.value_layers, config.ffn_layers)
    mem_layer = next(iter(values))
    y_mem = acts[f"nemo/Y_mem/{mem_layer}"]
    n_mem = y_mem.shape[0]
    assert y_mem.shape[1] == testbed_pipe.tokenizer.model_max_length * values[mem_layer].out_features
    # the raw to_v map of a member is to_v of its embedding, flattened
    _, _, mem = prompt_embeddings(testbed_pipe, config.memorized, n_mem)
    with torch.no_grad():
        expected = values[mem_layer](mem.to(values[mem_layer].weight.dtype)).flatten(1).float()
    torch.testing.assert_close(y_mem, expected, rtol=1e-5, atol=1e-5)
    ffn_layer = next(iter(ffns))
    assert acts[f"wanda/Y_mem/{ffn_layer}"].shape[1] > ffns[ffn_layer].in_features  # positions x channels
    # subsampled: every kept coordinate is a full one scaled by sqrt(total / kept)
    full = raw_statistic(testbed_pipe, values, ffns, mem, num_inference_steps=10)
    small = raw_statistic(testbed_pipe, values, ffns, mem, num_inference_steps=10, max_features=100)
    for layer, whole in full.items():
        assert small[layer].shape == (len(mem), min(100, whole.shape[1]))
        scale = (whole.shape[1] / small[layer].shape[1]) ** 0.5
        matches = (small[layer][:, :, None] / scale - whole[:, None, :]).abs().amax(0) < 1e-5
        assert bool(matches.any(1).all()), layer
    with pytest.raises(DoriError, match="statistic"):
        ActivationsConfig(triggers=str(path), statistic="mean").validate()


def test_weights_run_folder_and_resume(testbed_pipe, scatter_run, tmp_path, monkeypatch):
    path, _ = scatter_run
    config = WeightsConfig(triggers=str(path), successful_only=False, nemo=TINY_NEMO, wanda=TINY_WANDA)
    out, summary = run_weights(testbed_pipe, config, tmp_path / "weights")
    for name in ("manifest.json", "table.parquet", "summary.json", "weights.png", "weights.pdf"):
        assert (out / name).is_file(), name
    table = pd.read_parquet(out / "table.parquet")
    assert {"method", "layer_id", "layer", "comparison", "n_sets", "n_pairs", "iou_mean", "iou_std", "empty_sets",
            "all_empty", "mean_selected"} <= set(table.columns)
    assert len(table) == 2 * 3 * 3  # methods x layers x comparisons
    assert ((table.iou_mean >= 0) & (table.iou_mean <= 1)).all()
    assert (table[table.all_empty].iou_mean == 1.0).all()
    records = [json.loads(line) for line in (out / "records.rank0.jsonl").read_text().splitlines()]
    assert len(records) == 2 * (3 + 4) and len({r["key"] for r in records}) == len(records)
    # Wanda's Y_adv IoU, recomputed from the saved masks
    wanda = {r["name"]: load_file(str(out / "masks" / r["file"])) for r in records if r["method"] == "wanda"}
    layer = table[table.method == "wanda"].layer.iloc[0]
    adv = [m[layer].bool().numpy() for name, m in wanda.items() if name.startswith("Y_adv|")]
    row = table[(table.method == "wanda") & (table.layer == layer) & (table.comparison == "Y_adv")].iloc[0]
    assert math.isclose(row.iou_mean, mean_pairwise_iou(adv), rel_tol=1e-9)
    saved = json.loads((out / "summary.json").read_text())
    for key in ("n_adv", "n_mem", "methods", "note", "iou_convention"):
        assert key in saved
    assert {"Y_mem", "Y_adv", "Y_adv vs original", "clearly_below_1"} <= set(saved["methods"]["nemo"])

    import dori.mitigations.nemo as nemo
    import dori.mitigations.wanda as wanda_module

    def fail(*args, **kwargs):
        raise AssertionError("localised again")

    monkeypatch.setattr(nemo, "localize_prompt", fail)
    monkeypatch.setattr(wanda_module, "input_norms", fail)
    _, again = run_weights(testbed_pipe, config, out)
    assert again["methods"]["wanda"]["Y_adv"] == summary["methods"]["wanda"]["Y_adv"]


def test_cli_commands_and_errors(tmp_path):
    import typer
    from typer.testing import CliRunner

    from dori.cli import analyze as cli_analyze

    root = typer.Typer()  # registered as in dori.cli: app.add_typer(analyze.app, name="analyze")
    root.add_typer(cli_analyze.app, name="analyze")
    runner = CliRunner()
    for command in ("scatter", "activations", "weights"):
        result = runner.invoke(root, ["analyze", command, "--help"])
        assert result.exit_code == 0 and "--out" in result.output
    result = runner.invoke(root, ["analyze", "activations", "--triggers", str(tmp_path / "nowhere")])
    assert result.exit_code == 2 and "error:" in result.output and "triggers" in result.output
    result = runner.invoke(root, ["analyze", "weights", "--triggers", str(tmp_path), "--method", "lasso"])
    assert result.exit_code == 2 and "methods" in result.output
    with pytest.raises(DoriError, match="starts"):
        ScatterConfig(starts=1).validate()


def test_attention_concentration_is_the_forward_attention(tiny_pipeline_folder):
    """The shares are those of the attention probabilities diffusers' AttnProcessor computes in the forward
    (recorded from it here), on SD 1.x and SD 2.x layouts; identical tokens give uniform attention."""
    from diffusers.models.attention_processor import AttnProcessor

    from dori.analysis.attention import attention_concentration, cross_attention_layers
    from dori.mitigations.nemo import value_layers
    from dori.models import initial_latents, load_pipeline

    pipe = load_pipeline(str(tiny_pipeline_folder))
    values = value_layers(pipe.unet, NeMoConfig().layers)
    layers = cross_attention_layers(pipe.unet, values)
    embeds = encode_prompts(pipe, ["a photo of an astronaut riding a horse", "a cup of coffee"])
    ours = attention_concentration(pipe, layers, embeds, seed=3, num_inference_steps=4, batch_size=1)

    modules = dict(pipe.unet.named_modules())
    recorded = {}
    pipe.unet.set_attn_processor(AttnProcessor())
    for name in layers:
        attn = modules[name]
        original = attn.get_attention_scores

        def record(query, key, mask=None, original=original, name=name):
            probs = original(query, key, mask)
            recorded[name] = probs
            return probs

        attn.get_attention_scores = record
    scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config)
    scheduler.set_timesteps(4)
    t = scheduler.timesteps[0]
    latent = scheduler.scale_model_input(initial_latents(pipe, [3]) * scheduler.init_noise_sigma, t)
    with torch.no_grad():
        pipe.unet(latent.expand(2, -1, -1, -1), t, encoder_hidden_states=embeds)
    for name in layers:
        probs = recorded[name].reshape(2, -1, *recorded[name].shape[1:])
        first = probs[..., 0].mean((1, 2))
        effective = (-(probs * probs.clamp_min(1e-30).log()).sum(-1)).exp().mean((1, 2))
        torch.testing.assert_close(ours[name]["first_token"], first, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(ours[name]["effective_tokens"], effective, rtol=1e-4, atol=1e-4)
        assert bool((ours[name]["effective_tokens"] < pipe.tokenizer.model_max_length - 1e-3).all())

    same = embeds[:1, :1].expand(1, embeds.shape[1], -1).contiguous()  # every token the first one
    uniform = attention_concentration(pipe, layers, same, num_inference_steps=4)
    tokens = embeds.shape[1]
    for name in layers:
        assert math.isclose(float(uniform[name]["first_token"]), 1 / tokens, rel_tol=1e-4)
        assert math.isclose(float(uniform[name]["effective_tokens"]), tokens, rel_tol=1e-4)
    with pytest.raises(DoriError, match="cross-attention"):
        cross_attention_layers(pipe.unet, {layers[0].replace("attn2", "attn1") + ".to_v": None})
