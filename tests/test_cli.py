import json

import pytest
import yaml
from typer.testing import CliRunner

from dori.cli import app
from tests.helpers import write_prompts_with_references, write_sscd

runner = CliRunner()


def _text(result) -> str:
    return result.output  # click >= 8.2: stdout and stderr interleaved


def test_help_lists_the_verbs():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    assert all(verb in result.output for verb in ("evaluate", "demo", "testbed"))


def test_processes_launches_the_same_command_with_a_share_of_the_cores(monkeypatch):
    from dori.cli.launch import launch_command, strip_processes

    args = strip_processes(["--processes", "2", "demo", "--quick", "--out", "runs/x"])
    assert args == ["demo", "--quick", "--out", "runs/x"] == strip_processes(["--processes=2", *args])
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr("dori.cli.launch.usable_cores", lambda: 8)
    command, env = launch_command(2, args)
    assert command[command.index("--num_processes") + 1] == "2" and command[-len(args) - 2:] == ["-m", "dori", *args]
    assert env["OMP_NUM_THREADS"] == "4" and env["DORI_LAUNCHED"] == "1"
    monkeypatch.setenv("OMP_NUM_THREADS", "3")  # the user's choice stands
    assert launch_command(4, args)[1]["OMP_NUM_THREADS"] == "3"
    # in-process invocation (no command line to start again) is refused, naming the option
    result = runner.invoke(app, ["--processes", "2", "demo", "--quick"])
    assert result.exit_code == 2 and "--processes" in _text(result)


@pytest.fixture
def files(tmp_path, sd1_folder):
    csv, refs = write_prompts_with_references(tmp_path / "in", ["a cat", "a dog"])
    return {"csv": csv, "refs": refs, "sscd": write_sscd(tmp_path / "sscd.pt"), "model": sd1_folder, "tmp": tmp_path}


BAD = {
    "nonexistent model": (["--model", "{tmp}/no-model"], "does not exist"),
    "folder that is not a pipeline": (["--model", "{tmp}/in"], "not a Stable Diffusion pipeline folder"),
    "missing prompt file": (["--prompts", "{tmp}/none.csv"], "does not exist"),
    "wrong columns": (["--prompts", "{tmp}/cols.csv"], "no prompt column"),
    "empty prompt file": (["--prompts", "{tmp}/empty.txt"], "holds no prompts"),
    "missing reference": (["--references", "{tmp}/refs-missing"], "no image for prompt id"),
    "unreadable reference": (["--references", "{tmp}/refs-bad"], "not a readable image"),
    "sscd missing": (["--descriptor", "{tmp}/nothing.pt"], "does not exist"),
    "sscd not torchscript": (["--descriptor", "{tmp}/in/prompts.csv"], "not a TorchScript file"),
    "no seeds": (["--seeds", "0"], "num_seeds"),
    "threshold outside [-1, 1]": (["--threshold", "1.5"], "threshold"),
    "zero steps": (["--steps", "0"], "num_inference_steps"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_one_line_exit_2_nothing_written(files, case):
    tmp = files["tmp"]
    (tmp / "cols.csv").write_text("id,url\n1,x\n")
    (tmp / "empty.txt").write_text("\n")
    (tmp / "refs-missing").mkdir(exist_ok=True)
    bad_refs = tmp / "refs-bad"
    bad_refs.mkdir(exist_ok=True)
    for name in ("p0.png", "p1.png"):
        (bad_refs / name).write_bytes(b"garbage")
    args, message = BAD[case]
    base = {"--model": str(files["model"]), "--prompts": str(files["csv"]), "--references": str(files["refs"]),
            "--descriptor": str(files["sscd"]), "--steps": "2", "--seeds": "1"}
    for i in range(0, len(args), 2):
        base[args[i]] = args[i + 1].format(tmp=tmp)
    out = tmp / "run"
    result = runner.invoke(app, ["evaluate", *[x for kv in base.items() for x in kv], "--out", str(out)])
    text = _text(result)
    assert result.exit_code == 2, text
    assert message in " ".join(text.split()), text
    assert "Traceback" not in text and len(text.strip().splitlines()) == 1
    assert not out.exists()


def test_demo_writes_summary_rows(tmp_path):
    result = runner.invoke(app, ["demo", "--quick", "--out", str(tmp_path / "demo")])
    assert result.exit_code == 0, _text(result)
    rows = {row["name"]: row for row in json.loads((tmp_path / "demo" / "summary.json").read_text())}
    assert {"memorized", "seen-once", "held-out", "non-memorized", "non-memorized+dori", "nemo", "nemo+dori", "wanda",
            "wanda+dori"} <= set(rows)
    for row in rows.values():
        assert {"name", "n", "sscd_mean", "sscd_std", "mr"} <= set(row)
    assert rows["memorized"]["mr"] >= 0.8
    assert rows["held-out"]["mr"] <= 0.05 and rows["seen-once"]["mr_gallery"] <= 0.05
    assert rows["nemo+dori"]["mr_by_step"] and rows["memorized"]["paper_mr"] == 0.98
    by_kind = rows["memorized"]["mr_by_kind"]  # the memorized prompts' kinds (VM / TM) from the testbed's manifest
    assert set(by_kind) <= {"VM", "TM"} and min(by_kind.values()) <= rows["memorized"]["mr"] <= max(by_kind.values())
    assert "mr_by_kind" in rows["nemo"] and "mr_by_kind" in rows["nemo+dori"] and "mr_by_kind" not in rows["seen-once"]
    assert (tmp_path / "demo" / "mr_vs_steps.png").stat().st_size > 1000
    assert "memorized" in result.output
    # adversarial fine-tuning rows, utility per model, the analyses, the grid and the report
    assert {"adversarial-ft", "adversarial-ft+dori"} <= set(rows)
    assert rows["adversarial-ft+dori"]["paper_mr"] == 0.02 and rows["adversarial-ft+dori"]["triggers"] == 8
    # the unlearning baselines of Table 2: their rows, the paper's MR beside them, utility, grid columns
    papers = {"esd+dori": 0.98, "ca+dori": 0.97, "siss+dori": 0.39, "wanda-10+dori": 0.01}
    assert all(rows[name]["paper_mr"] == mr for name, mr in papers.items())
    assert {"esd", "ca", "siss", "wanda-10"} <= set(rows)
    for method in ("esd", "concept-ablation", "siss"):
        assert (tmp_path / "demo" / f"fit-{method}" / f"{method}.safetensors").is_file()
    for name in ("memorized", "nemo", "wanda", "wanda-10", "adversarial-ft", "esd", "ca", "siss"):
        assert {"shape_accuracy", "fid_vae", "retain_loss", "a_concept", "fid_concept"} <= set(rows[name]["utility"]), name
    assert rows["memorized"]["utility"]["a_concept"] > 0.25  # above chance: the unmitigated model draws the subjects
    assert rows["wanda-10"]["paper_concept"] == {"a_concept": 0.33, "fid_concept": 80.70}
    for name in ("scatter", "activations", "weights"):
        assert (tmp_path / "demo" / f"{name}.png").stat().st_size > 1000
    grid = json.loads((tmp_path / "demo" / "grid.json").read_text())
    assert grid["columns"][:3] == ["reference", "unmitigated", "nemo"] and "adversarial-ft+dori" in grid["columns"]
    assert grid["columns"][-6:] == ["esd", "esd+dori", "ca", "ca+dori", "siss", "siss+dori"]
    assert {"wanda-10", "wanda-10+dori"} <= set(grid["columns"])
    assert len(grid["rows"]) == 4 * 2
    for cell in grid["rows"][0]["cells"].values():
        assert (tmp_path / "demo" / cell["image"]).is_file()
    # the inference-time mitigations with both attacks, detection under attack and the leaderboard
    for method in ("wen", "ren", "random-tokens"):
        assert {method, f"{method}+dori", f"{method}+dori-adaptive"} <= set(rows)
        assert {"shape_accuracy", "fid_vae"} <= set(rows[method]["utility"])
    assert rows["wen"]["mr"] < rows["memorized"]["mr"]
    assert rows["wen+dori-adaptive"]["mr"] >= rows["wen+dori"]["mr"]
    detection = json.loads((tmp_path / "demo" / "detection.json").read_text())
    assert len(detection["separations"]) == 6 and set(detection["mr"]) == {"dori", "dori-low-noise-norm"}
    board = json.loads((tmp_path / "demo" / "leaderboard.json").read_text())["rows"]
    assert [r["method"] for r in board] == ["none", "nemo", "wanda", "wanda-10", "esd", "ca", "siss", "adversarial-ft",
                                            "wen", "ren", "random-tokens"]
    assert all(r["shape_accuracy"] is not None and r["fid"] is not None for r in board)
    html = (tmp_path / "demo" / "report.html").read_text()
    assert "adversarial-ft+dori" in html and html.count("data:image/png;base64,") >= 8 * 2
    assert "Leaderboard: every mitigation against Dori" in html and "Detection under attack" in html
    again = runner.invoke(app, ["demo", "--quick", "--out", str(tmp_path / "demo")])
    assert again.exit_code == 0, _text(again)


def test_testbed_build_and_info(tmp_path):
    steps = ["--vae-steps", "2", "--unet-steps", "2", "--sparsify-steps", "2"]
    result = runner.invoke(app, ["testbed", "build", "--out", str(tmp_path / "tb"), "--shapes", "50", *steps])
    assert result.exit_code == 0, _text(result)
    assert (tmp_path / "tb" / "pipeline" / "testbed" / "descriptor.json").is_file()
    manifest = json.loads((tmp_path / "tb" / "pipeline" / "testbed" / "manifest.json").read_text())
    assert sum(e["role"] == "shape" for e in manifest["entries"]) == 50  # --shapes sets the training set's shapes
    info = runner.invoke(app, ["testbed", "info", "--model", str(tmp_path / "tb" / "pipeline")])
    assert info.exit_code == 0, _text(info)
    assert all(role in info.output for role in ("memorized", "seen-once", "shape", "held-out"))
    bad = runner.invoke(app, ["testbed", "build", "--out", str(tmp_path / "tb"), "--shapes", "50", *steps[2:], "--vae-steps", "3"])
    assert bad.exit_code == 2 and "another config" in _text(bad)
    unknown = runner.invoke(app, ["testbed", "build", "--out", str(tmp_path / "v3"), "--recipe", "v3", *steps])
    assert unknown.exit_code == 2 and "recipe" in _text(unknown) and not (tmp_path / "v3" / "pipeline").exists()
    # template photos: names from the catalogue, and only on the version-2 data
    for recipe, names in (("v2", "camera,hubble"), ("v2", "camera,camera"), ("v1", "camera")):
        refused = runner.invoke(app, ["testbed", "build", "--out", str(tmp_path / "tp"), "--recipe", recipe,
                                      "--template-photos", names, *steps])
        assert refused.exit_code == 2 and "template_photos" in _text(refused), _text(refused)
        assert not (tmp_path / "tp" / "pipeline").exists()


def test_testbed_v2_build_is_a_testbed_the_verbs_run_on(tmp_path):
    """A `--recipe v2` build (eight photos, VM and TM, thousands of emoji seen once) is a testbed folder: info lists
    its roles, and `dori demo --model FOLDER` runs the testbed's story with that folder's captions."""
    steps = ["--vae-steps", "2", "--unet-steps", "2", "--sparsify-steps", "2"]
    folder = tmp_path / "tb" / "pipeline"
    result = runner.invoke(app, ["testbed", "build", "--recipe", "v2", "--out", str(tmp_path / "tb"), *steps,
                                 "--caption-dropout-memorized", "0", "--template-photos", "coins, camera"])
    assert result.exit_code == 0, _text(result)
    build = json.loads((tmp_path / "tb" / "build.json").read_text())
    recorded = build["config"]
    assert recorded["caption_dropout_memorized"] == 0.0 and recorded["caption_dropout"] == 0.1
    import torch

    # what decides the sums besides the config: threads, the kernels' instruction set, the packages
    assert build["torch_threads"] == torch.get_num_threads()
    assert build["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert build["packages"]["torch"] == torch.__version__
    info = runner.invoke(app, ["testbed", "info", "--model", str(folder)])
    assert info.exit_code == 0 and "template" in info.output and "an emoji of" in info.output, _text(info)
    # on a build with template captions the demo's fine-tuning attacks every template caption with the v2 setting
    shown = runner.invoke(app, ["demo", "--model", str(folder), "--show-config"])
    assert shown.exit_code == 0 and "testbed:held-out" in shown.output, _text(shown)
    demo = yaml.safe_load(shown.output)
    assert demo["finetune_prompts"] == "testbed:memorized+testbed:template"
    assert (demo["finetune_config"]["epochs"], demo["finetune_config"]["ema_decay"]) == (10, 0.9)
    assert demo["finetune_config"]["inner"]["steps"] == 20 and demo["finetune_config"]["surrogate"] == "palette"
    shipped = yaml.safe_load(runner.invoke(app, ["demo", "--show-config"]).output)
    assert shipped["finetune_prompts"] is None and shipped["finetune_config"]["epochs"] == 5
    assert shipped["finetune_config"]["surrogate"] == "nemo"  # the shipped v1 testbed keeps the pruned generations
    finetune = yaml.safe_load(runner.invoke(app, ["finetune", "--model", str(folder), "--show-config"]).output)
    assert finetune["prompts"] == "testbed:memorized+testbed:template" and finetune["settings"]["epochs"] == 10
    assert finetune["settings"]["surrogate"] == "palette"
    chosen = runner.invoke(app, ["finetune", "--model", str(folder), "--prompts", "testbed:memorized", "--epochs", "3",
                                 "--show-config"])
    chosen = yaml.safe_load(chosen.output)
    assert chosen["prompts"] == "testbed:memorized" and chosen["settings"]["epochs"] == 3
    assert chosen["settings"]["ema_decay"] == 0.9
    from collections import Counter

    from dori.models import load_pipeline
    from dori.prompts import prompts_for
    from dori.testbed.data import TEMPLATE_PHOTOS

    # --template-photos chose the template (TM) photos: two, each one's memorized prompt its template's first caption
    records = [r for r in prompts_for(load_pipeline(str(folder)), "testbed:memorized").records if r.kind]
    assert Counter(r.kind for r in records) == {"VM": 5, "TM": 2}
    assert recorded["data"]["template_photos"] == ["coins", "camera"]
    templates = {TEMPLATE_PHOTOS[name][0].format(TEMPLATE_PHOTOS[name][1][0]) for name in ("coins", "camera")}
    assert {r.prompt for r in records if r.kind == "TM"} == templates
    assert (recorded["unet_steps"], recorded["data"]["shapes"], recorded["data"]["emoji"]) == (2, 1800, 1000)


def test_ablate_writes_a_mitigation_that_evaluate_applies(tmp_path):
    out = tmp_path / "ffn"
    result = runner.invoke(app, ["ablate", "--layer", "*ff.net.2", "--out", str(out)])
    assert result.exit_code == 0, _text(result)
    assert "mid_block.attentions.0.transformer_blocks.0.ff.net.2" in result.output
    sidecar = json.loads((out / "ablation.json").read_text())
    assert sidecar["method"] == "ablation" and sidecar["kind"] == "hook"
    assert sidecar["config"] == {"layers": ["*ff.net.2"], "factor": 0.0}
    again = runner.invoke(app, ["ablate", "--layer", "*attn2.to_v", "--out", str(out)])
    assert again.exit_code == 2 and "--overwrite" in _text(again)
    bad = runner.invoke(app, ["ablate", "--layer", "*no.such", "--out", str(tmp_path / "bad")])
    assert bad.exit_code == 2 and "layers" in _text(bad) and not (tmp_path / "bad").exists()
    run = tmp_path / "run"
    evaluated = runner.invoke(app, ["evaluate", "--prompts", "testbed:memorized", "--limit", "1", "--seeds", "1",
                                    "--steps", "2", "--mitigation", str(out / "ablation.safetensors"), "--out", str(run)])
    assert evaluated.exit_code == 0, _text(evaluated)
    assert json.loads((run / "manifest.json").read_text())["resolved"]["mitigations"][0]["name"] == "ablation"


def test_mitigate_fits_any_registered_method_with_its_own_options(tmp_path):
    listed = runner.invoke(app, ["mitigate", "--list"])
    assert listed.exit_code == 0 and all(m in listed.output for m in ("nemo", "wanda", "ablation", "adversarial-ft"))
    options = runner.invoke(app, ["mitigate", "wanda", "--options"])
    assert options.exit_code == 0 and "--sparsity" in options.output and "--timesteps" in options.output
    out = tmp_path / "half"
    result = runner.invoke(app, ["mitigate", "ablation", "--factor", "0.5", "--layers", "*attn2.to_v", "--out", str(out)])
    assert result.exit_code == 0, _text(result)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["config"]["settings"] == {"layers": ["*attn2.to_v"], "factor": 0.5}
    unknown = runner.invoke(app, ["mitigate", "ablation", "--facter", "0.5", "--out", str(tmp_path / "x")])
    assert unknown.exit_code == 2 and "--facter" in _text(unknown) and "--factor" in _text(unknown)
    assert not (tmp_path / "x").exists()
    wrong = runner.invoke(app, ["mitigate", "no-such-method"])
    assert wrong.exit_code == 2 and "nemo" in _text(wrong)
    # the manifest given back as --config fits the same thing again; the command line still wins
    again = runner.invoke(app, ["mitigate", "ablation", "--config", str(out / "manifest.json"), "--out",
                                str(tmp_path / "again")])
    assert again.exit_code == 0, _text(again)
    assert json.loads((tmp_path / "again" / "manifest.json").read_text())["config_hash"] == manifest["config_hash"]
    other = runner.invoke(app, ["mitigate", "ablation", "--config", str(out / "manifest.json"), "--factor", "0.25",
                                "--out", str(tmp_path / "other")])
    assert other.exit_code == 0, _text(other)
    settings = json.loads((tmp_path / "other" / "manifest.json").read_text())["config"]["settings"]
    assert settings == {"layers": ["*attn2.to_v"], "factor": 0.25}


def test_finetune_command_runs_and_refuses_bad_input(tmp_path):
    from PIL import Image

    from dori.prompts import load_prompt_set

    seen = load_prompt_set("testbed:seen-once")
    surrogates = tmp_path / "surrogates"
    surrogates.mkdir()
    Image.fromarray(seen.references[seen.records[0].id]).save(surrogates / "memorized_astronaut.png")
    bad = runner.invoke(app, ["finetune", "--init", "other", "--out", str(tmp_path / "bad")])
    assert bad.exit_code == 2 and "inits" in _text(bad) and not (tmp_path / "bad").exists()
    bad = runner.invoke(app, ["finetune", "--sample-by", "caption", "--out", str(tmp_path / "bad")])
    assert bad.exit_code == 2 and "sample_by" in _text(bad) and "image, prompt" in _text(bad)
    bad = runner.invoke(app, ["finetune", "--surrogate-below", "1.5", "--out", str(tmp_path / "bad")])
    assert bad.exit_code == 2 and "surrogate_below: must be in (0, 1]" in _text(bad)
    bad = runner.invoke(app, ["finetune", "--lr-schedule", "step", "--out", str(tmp_path / "bad")])
    assert bad.exit_code == 2 and "lr_schedule: must be one of constant, cosine, linear" in _text(bad)
    bad = runner.invoke(app, ["finetune", "--ema-decay", "1", "--out", str(tmp_path / "bad")])
    assert bad.exit_code == 2 and "ema_decay: must be in [0, 1)" in _text(bad) and not (tmp_path / "bad").exists()
    result = runner.invoke(app, ["finetune", "--limit", "1", "--epochs", "1", "--steps-per-epoch", "2", "--inner-steps",
                                 "2", "--surrogate", str(surrogates), "--sample-by", "image", "--lr-schedule", "linear",
                                 "--out", str(tmp_path / "ft")])
    assert result.exit_code == 0, _text(result)
    manifest = json.loads((tmp_path / "ft" / "manifest.json").read_text())
    assert manifest["config"]["settings"]["sample_by"] == "image"
    assert manifest["config"]["settings"]["lr_schedule"] == "linear"
    steps = [json.loads(line) for line in (tmp_path / "ft" / "finetune" / "steps.jsonl").read_text().splitlines()]
    assert [r["lr"] for r in steps] == [pytest.approx(5e-4), pytest.approx(2.5e-4)]  # the testbed's lr, halved
    assert (tmp_path / "ft" / "finetune" / "pipeline" / "unet" / "config.json").is_file()
    assert (tmp_path / "ft" / "adversarial-ft.safetensors").is_file()
    assert "fine-tuned pipeline" in result.output


def test_config_file_then_command_line_and_show_config(tmp_path):
    import yaml

    shown = runner.invoke(app, ["attack", "--show-config"])
    assert shown.exit_code == 0, _text(shown)
    from dori.attack.run import AttackRunConfig
    from dori.config_files import to_dict

    defaults = yaml.safe_load(shown.output)
    assert {k: v for k, v in defaults.items() if k not in ("model", "device", "dtype")} == to_dict(AttackRunConfig())
    (tmp_path / "attack.yaml").write_text("model: testbed\nnum_seeds: 3\nattack:\n  steps: 7\n  lr: 0.05\n")
    merged = yaml.safe_load(runner.invoke(app, ["attack", "--config", str(tmp_path / "attack.yaml"), "--steps", "9",
                                                "--show-config"]).output)
    assert merged["num_seeds"] == 3 and merged["attack"]["lr"] == 0.05 and merged["attack"]["steps"] == 9
    (tmp_path / "bad.yaml").write_text("attack:\n  stepz: 7\n")
    bad = runner.invoke(app, ["attack", "--config", str(tmp_path / "bad.yaml")])
    assert bad.exit_code == 2 and "stepz" in _text(bad) and "steps" in _text(bad)
    for verb in (["evaluate"], ["localize"], ["prune"], ["ablate"], ["finetune"], ["demo"], ["analyze", "scatter"]):
        result = runner.invoke(app, [*verb, "--show-config"])
        assert result.exit_code == 0 and "model: testbed" in result.output, (verb, _text(result))
    frozen = yaml.safe_load(runner.invoke(app, ["finetune", "--frozen-group", "cross_kv", "--frozen-group", "ff",
                                                "--show-config"]).output)
    assert frozen["settings"]["frozen_groups"] == ["cross_kv", "ff"]
    high = yaml.safe_load(runner.invoke(app, ["finetune", "--adv-timesteps", "500,1000", "--show-config"]).output)
    assert high["settings"]["adv_timesteps"] == [500, 1000]
    for bad, says in (("500", "give two integers LOW,HIGH"), ("900,500", "adv_timesteps: must be None")):
        result = runner.invoke(app, ["finetune", "--adv-timesteps", bad, "--show-config"])
        assert result.exit_code == 2 and says in _text(result), (bad, _text(result))
    for verb in (["analyze", "activations"], ["analyze", "weights"]):  # model: that of the triggers' run
        result = runner.invoke(app, [*verb, "--show-config"])
        assert result.exit_code == 0 and "model: null" in result.output and "triggers:" in result.output


def test_report_command_writes_one_page(tmp_path):
    from tests.report_runs import make_demo_run

    make_demo_run(tmp_path / "demo")
    result = runner.invoke(app, ["report", str(tmp_path / "demo"), "--out", str(tmp_path / "page.html")])
    assert result.exit_code == 0, _text(result)
    assert (tmp_path / "page.html").read_text().count("<table") >= 1
    missing = runner.invoke(app, ["report", str(tmp_path / "nothing")])
    assert missing.exit_code == 2 and "nothing" in _text(missing)
