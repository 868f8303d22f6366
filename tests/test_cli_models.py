"""Every verb through the CLI on a user's own model, in the two layouts people have: tiny SD 1.x (PNDM,
epsilon) and SD 2.x (DDIM, v prediction, linear projections, head-dimension list, another
cross-attention width) pipelines saved to folders, with an SSCD-format descriptor and references."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from dori.cli import app
from tests.helpers import write_prompts_with_references, write_sscd

runner = CliRunner()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("user")
    memorized, refs = write_prompts_with_references(folder / "memorized", ["a podcast cover", "a floor texture"])
    nonmem, nonmem_refs = write_prompts_with_references(folder / "nonmem", ["a harbour", "a bowl of fruit", "a tree"])
    retain = folder / "retain"
    retain.mkdir()
    rng = np.random.default_rng(1)
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(retain / f"{i}.png")
        (retain / f"{i}.txt").write_text(f"an ordinary photo {i}")
    (folder / "fast.yaml").write_text(
        "attack_config: {steps: 3}\nattack_seeds: 1\n"
        "generation: {num_inference_steps: 3}\n"
        "nemo: {num_seeds: 2, num_inference_steps: 5, ssim_threshold: -1.0}\n"
        "wanda: {num_inference_steps: 3, timesteps: 2}\n"
        "scatter: {attack: {steps: 2, record_at: [0]}, num_seeds: 1, reference_count: 3, starts: 2}\n"
        "activations: {max_triggers: 2, num_inference_steps: 5, successful_only: false}\n"
        "weights: {max_triggers: 2, successful_only: false, methods: [wanda], wanda: {num_inference_steps: 3, timesteps: 2}}\n"
        "robustness: {wen: {iterations: 1}, detection_seeds: 1}\n")
    (folder / "finetune.yaml").write_text("settings:\n  images_per_step: 1\n  retain_batch_size: 2\n  adv_pairs: 2\n"
                                          "  inner: {pairs: 2}\n  descriptor: {threshold: 1.0}\n")
    return {"memorized": str(memorized), "refs": str(refs), "nonmem": str(nonmem), "nonmem_refs": str(nonmem_refs),
            "retain": str(retain), "sscd": str(write_sscd(folder / "sscd.pt")), "fast": str(folder / "fast.yaml"),
            "finetune": str(folder / "finetune.yaml")}


def _ok(args):
    result = runner.invoke(app, args)
    assert result.exit_code == 0, (args[:2], result.output[-3000:])
    return result


def test_every_verb_on_a_users_model(tiny_pipeline_folder, files, tmp_path, monkeypatch):
    monkeypatch.setenv("DORI_CACHE", str(tmp_path / "cache"))
    model = ["--model", str(tiny_pipeline_folder)]
    data = ["--prompts", files["memorized"], "--references", files["refs"], "--descriptor", files["sscd"]]
    runs = tmp_path / "runs"
    _ok(["evaluate", *model, *data, "--seeds", "2", "--steps", "3", "--out", str(runs / "evaluate")])
    manifest = json.loads((runs / "evaluate" / "manifest.json").read_text())
    assert manifest["model"]["location"] == str(tiny_pipeline_folder) and manifest["resolved"]["descriptor"]["kind"] == "sscd"
    _ok(["mitigate", "nemo", *model, "--prompts", files["memorized"], "--statistics", files["nonmem"],
         "--num-seeds", "2", "--num-inference-steps", "5", "--ssim-threshold", "-1", "--out", str(runs / "nemo")])
    _ok(["prune", *model, "--prompts", files["memorized"], "--steps", "3", "--timesteps", "2", "--out", str(runs / "wanda")])
    _ok(["ablate", *model, "--layer", "*ff.net.2", "--out", str(runs / "ablation")])
    result = _ok(["attack", *model, *data, "--steps", "2", "--seeds", "1", "--eval-steps", "2", "--mitigation",
                  str(runs / "nemo" / "nemo.safetensors"), "--mitigation", str(runs / "wanda" / "wanda.safetensors"),
                  "--out", str(runs / "attack")])
    assert "nemo.safetensors" in result.output
    _ok(["finetune", *model, "--prompts", files["memorized"], "--references", files["refs"], "--descriptor",
         files["sscd"], "--retain", files["retain"], "--surrogate", files["retain"].replace("retain", "nonmem/refs"),
         "--epochs", "1", "--steps-per-epoch", "1", "--inner-steps", "2", "--config", files["finetune"],
         "--out", str(runs / "finetune")])
    assert (runs / "finetune" / "finetune" / "pipeline" / "model_index.json").is_file()
    _ok(["evaluate", "--model", str(runs / "finetune" / "finetune" / "pipeline"), *data, "--seeds", "1", "--steps", "2",
         "--mitigation", str(runs / "ablation" / "ablation.safetensors"), "--out", str(runs / "evaluate-ft")])
    _ok(["analyze", "scatter", *model, *data, "--starts", "2", "--steps", "2", "--seeds", "1", "--eval-steps", "2",
         "--reference-prompts", files["nonmem"], "--reference-count", "3", "--out", str(runs / "scatter")])
    result = _ok(["analyze", "activations", "--triggers", str(runs / "scatter"), "--all-triggers", "--memorized",
                  files["nonmem"], "--steps", "5", "--out", str(runs / "activations")])  # the model: the triggers' run's
    # where each set's cross-attention looks (the table's title wraps at the runner's width)
    assert "share on the first token / effective tokens attended" in " ".join(result.output.split())
    attention = json.loads((runs / "activations" / "summary.json").read_text())["attention"]
    assert set(attention["sets"]) == {"Y_mem", "Y_adv", "Y_0"} and len(attention["layers"]) >= 1
    _ok(["analyze", "weights", "--triggers", str(runs / "scatter"), "--all-triggers", "--memorized", files["nonmem"],
         "--method", "wanda", "--wanda-steps", "3", "--timesteps", "2", "--out", str(runs / "weights")])
    _ok(["report", str(runs / "evaluate"), str(runs / "attack"), str(runs / "weights"), "--out", str(runs / "page.html")])
    assert (runs / "page.html").stat().st_size > 1000


def test_the_paper_in_one_command_on_a_users_model(tiny_pipeline_folder, files, tmp_path, monkeypatch):
    monkeypatch.setenv("DORI_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "paper"
    _ok(["demo", "--model", str(tiny_pipeline_folder), "--prompts", files["memorized"], "--references", files["refs"],
         "--non-memorized", files["nonmem"], "--non-memorized-references", files["nonmem_refs"], "--descriptor",
         files["sscd"], "--seeds", "2", "--limit", "2", "--config", files["fast"], "--out", str(out)])
    rows = {row["name"]: row for row in json.loads((out / "summary.json").read_text())}
    inference = {f"{m}{suffix}" for m in ("wen", "ren", "random-tokens") for suffix in ("", "+dori", "+dori-adaptive")}
    assert {"memorized", "non-memorized", "nemo", "wanda", "non-memorized+dori", "nemo+dori", "wanda+dori", "dori",
            "dori-low-noise-norm", *inference} == set(rows)
    assert rows["wen+dori-adaptive"]["adaptive"] is True and rows["wen+dori"]["adaptive"] is False
    board = {r["method"]: r for r in json.loads((out / "leaderboard.json").read_text())["rows"]}
    assert set(board) == {"none", "nemo", "wanda", "wen", "ren", "random-tokens"}
    assert board["wen"]["unet_evaluations_per_image"] > board["none"]["unet_evaluations_per_image"] > 0
    detection = json.loads((out / "detection.json").read_text())
    assert {(r["detector"], r["positives"]) for r in detection["separations"]} == {
        (d, g) for d in ("noise-norm", "nemo") for g in ("memorized", "dori", "dori-low-noise-norm")}
    assert rows["memorized"]["n"] == 4 and rows["memorized"]["paper_mr"] == 0.98
    assert rows["nemo+dori"]["mr_by_step"] and rows["nemo"]["utility"]["sscd_gen_mean"] <= 1.0 + 1e-6
    for name in ("scatter", "activations", "weights", "mr_vs_steps"):
        assert (out / f"{name}.png").is_file(), name
    grid = json.loads((out / "grid.json").read_text())
    assert len(grid["rows"]) == 2 * 2 and "nemo+dori" in grid["columns"]
    assert "report.html" in {p.name for p in out.iterdir()}
    # the same command again resumes: nothing is computed twice
    again = _ok(["demo", "--model", str(tiny_pipeline_folder), "--prompts", files["memorized"], "--references",
                 files["refs"], "--non-memorized", files["nonmem"], "--non-memorized-references", files["nonmem_refs"],
                 "--descriptor", files["sscd"], "--seeds", "2", "--limit", "2", "--config", files["fast"],
                 "--out", str(out)])
    assert "memorized" in again.output
    missing = runner.invoke(app, ["demo", "--model", str(tiny_pipeline_folder), "--descriptor", files["sscd"],
                                  "--out", str(tmp_path / "nothing")])
    assert missing.exit_code == 2 and "--references" in missing.output


def test_leaderboard_on_a_users_model_and_merged_with_another(tiny_pipeline_folder, files, tmp_path, monkeypatch):
    """`dori leaderboard --model --references --descriptor` writes leaderboard.json / .parquet with a row per
    mitigation; `--merge` joins two files into one table and keeps a row seen twice once."""
    import pandas as pd

    monkeypatch.setenv("DORI_CACHE", str(tmp_path / "cache"))
    common = ["leaderboard", "--model", str(tiny_pipeline_folder), "--prompts", files["memorized"], "--references",
              files["refs"], "--non-memorized", files["nonmem"], "--descriptor", files["sscd"], "--seeds", "1",
              "--limit", "1", "--config", files["fast"]]
    first = _ok([*common, "--out", str(tmp_path / "a")])
    assert "random-tokens" in first.output and "leaderboard.json" in first.output
    rows = json.loads((tmp_path / "a" / "leaderboard.json").read_text())["rows"]
    assert [r["method"] for r in rows] == ["none", "nemo", "wanda", "wen", "ren", "random-tokens"]
    assert all(0 <= r["mr"] <= 1 and 0 <= r["mr_dori"] <= 1 for r in rows)
    assert pd.read_parquet(tmp_path / "a" / "leaderboard.parquet")["method"].tolist() == [r["method"] for r in rows]
    for row in rows[1:]:
        assert row["fit_seconds"] is not None and row["fit_seconds"] >= 0
    second = tmp_path / "b"
    second.mkdir()
    (second / "leaderboard.json").write_text(json.dumps({"format": 1, "meta": {}, "rows": [
        {**rows[0], "model": "another-model", "machine": "elsewhere"}]}))
    _ok(["leaderboard", "--merge", str(tmp_path / "a"), "--merge", str(tmp_path / "a" / "leaderboard.parquet"),
         "--merge", str(second), "--out", str(tmp_path / "merged")])
    merged = pd.read_parquet(tmp_path / "merged" / "leaderboard.parquet")
    assert len(merged) == len(rows) + 1 and set(merged["model"]) == {rows[0]["model"], "another-model"}
    bad = runner.invoke(app, ["leaderboard", "--merge", str(tmp_path / "nothing.json")])
    assert bad.exit_code == 2 and "does not exist" in bad.output


def test_presets_set_every_verb_and_are_recorded(sd1_folder, files, tmp_path, monkeypatch):
    monkeypatch.setenv("DORI_CACHE", str(tmp_path / "cache"))
    model = ["--model", str(sd1_folder)]
    shown = _ok(["evaluate", *model, "--preset", "paper-sd1", "--show-config"]).output
    for line in ("scheduler: DDIMScheduler", "num_inference_steps: 50", "guidance_scale: 7.0", "preprocess: nemo",
                 "prompts: webster-sd1-vm", "seed: 2"):
        assert line in shown, line
    assert "num_inference_steps: 4" in _ok(["evaluate", *model, "--preset", "paper-sd1", "--steps", "4",
                                            "--show-config"]).output  # the command line wins
    nemo = _ok(["mitigate", "nemo", *model, "--preset", "paper-sd1", "--show-config"]).output
    assert "ssim_threshold: 0.428" in nemo and "ms_ssim_betas: official" in nemo
    assert "ssim_threshold: 0.428" not in _ok(["mitigate", "nemo", *model, "--preset", "paper-sd2", "--show-config"]).output
    assert "prompts: sd2-219" in _ok(["attack", *model, "--preset", "paper-sd2", "--show-config"]).output
    bad = runner.invoke(app, ["evaluate", *model, "--preset", "paper-sd9", "--show-config"])
    assert bad.exit_code == 2 and "paper-sd1" in bad.output
    _ok(["evaluate", *model, "--preset", "paper-sd1", "--prompts", files["memorized"], "--references", files["refs"],
         "--descriptor", files["sscd"], "--seeds", "1", "--steps", "2", "--out", str(tmp_path / "run")])
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["preset"] == "paper-sd1" and manifest["model"]["scheduler"] == "DDIMScheduler"  # the folder ships PNDM
    assert manifest["config"]["generation"]["guidance_scale"] == 7.0
    assert manifest["config"]["descriptor"]["preprocess"] == "nemo"
