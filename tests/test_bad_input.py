"""Bad input through the CLI: every class gives exit code 2, one line on stderr, no traceback and no
partial output; a corrupted or foreign mitigation is refused before it can change an image."""

from __future__ import annotations

import json
import os
import shutil
import stat

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from dori.cli import app
from tests.helpers import write_prompts_with_references, write_sscd

runner = CliRunner()


@pytest.fixture(scope="module")
def setup(sd1_folder, tmp_path_factory):
    """The tiny SD 1.x model, its inputs, and a NeMo (per prompt) and a Wanda fitted on it."""
    root = tmp_path_factory.mktemp("bad")
    os.environ["DORI_CACHE"] = str(root / "cache")
    prompts, refs = write_prompts_with_references(root / "mem", ["a podcast cover", "a floor texture"])
    other, _ = write_prompts_with_references(root / "other", ["a harbour at dusk"])
    files = {"model": str(sd1_folder), "prompts": str(prompts), "refs": str(refs), "other": str(other),
             "sscd": str(write_sscd(root / "sscd.pt")), "root": root}
    ok(["mitigate", "nemo", "--model", files["model"], "--prompts", files["prompts"], "--num-seeds", "2",
        "--num-inference-steps", "5", "--ssim-threshold", "-1", "--out", str(root / "nemo")])
    ok(["prune", "--model", files["model"], "--prompts", files["prompts"], "--steps", "3", "--timesteps", "2",
        "--out", str(root / "wanda")])
    files["nemo"], files["wanda"] = str(root / "nemo" / "nemo.safetensors"), str(root / "wanda" / "wanda.safetensors")
    return files


def ok(args):
    result = runner.invoke(app, args)
    assert result.exit_code == 0, (args[:2], result.output[-3000:])
    return result


def refused(args, *, contains: str = "", out=None):
    """Exit code 2, one error line on stderr, no traceback, and (``out``) nothing created."""
    result = runner.invoke(app, args)
    assert result.exit_code == 2, (args[:2], result.exit_code, result.output[-3000:], repr(result.exception))
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    assert "Traceback" not in result.output
    assert contains.lower() in lines[0].lower(), lines[0]
    if out is not None:
        assert not os.path.exists(out), f"{out} was created"
    return lines[0]


def evaluate_args(files, *extra, out):
    return ["evaluate", "--model", files["model"], "--prompts", files["prompts"], "--references", files["refs"],
            "--descriptor", files["sscd"], "--seeds", "1", "--steps", "2", *extra, "--out", str(out)]


def copy_artefact(path: str, to) -> str:
    to.mkdir(parents=True, exist_ok=True)
    target = to / os.path.basename(path)
    shutil.copy(path, target)
    shutil.copy(path.replace(".safetensors", ".json"), str(target).replace(".safetensors", ".json"))
    return str(target)


def test_out_that_is_a_file_or_cannot_be_written(setup, tmp_path):
    a_file = tmp_path / "a-file"
    a_file.write_text("keep me")
    refused(evaluate_args(setup, out=a_file), contains="is a file")
    refused(["ablate", "--model", setup["model"], "--layer", "*ff.net.2", "--out", str(a_file)], contains="is a file")
    refused(["report", str(tmp_path / "nothing-here"), "--out", str(tmp_path)], contains="runs")
    refused(["report", str(setup["root"] / "nemo"), "--out", str(a_file / "page.html")], contains="is a file")
    assert a_file.read_text() == "keep me"
    # /proc takes no new files: the same refusal as a read-only filesystem, whoever runs the test
    refused(evaluate_args(setup, out="/proc/dori-run"), contains="cannot create files", out="/proc/dori-run")
    refused(["report", str(setup["root"] / "nemo"), "--out", "/proc/dori-page.html"], contains="cannot create files")
    refused(["mitigate", "nemo", "--model", setup["model"], "--prompts", setup["prompts"], "--out", "/proc/x/y"],
            contains="cannot create files")


def test_damaged_mitigation_files_are_refused(setup, tmp_path):
    for name in ("nemo", "wanda"):
        flipped = copy_artefact(setup[name], tmp_path / f"flip-{name}")
        data = bytearray(open(flipped, "rb").read())
        data[-8:] = bytes(255 - b for b in data[-8:])
        open(flipped, "wb").write(bytes(data))
        refused(evaluate_args(setup, "--mitigation", flipped, out=tmp_path / "o1"), contains="damaged",
                out=tmp_path / "o1")
        cut = copy_artefact(setup[name], tmp_path / f"cut-{name}")
        open(cut, "wb").write(open(setup[name], "rb").read()[:40])
        refused(evaluate_args(setup, "--mitigation", cut, out=tmp_path / "o2"), contains="damaged", out=tmp_path / "o2")


def _without_checksum(path: str, tensors: dict, meta_update: dict | None = None) -> None:
    """Rewrite an artefact with other tensor data under an intact header and no checksum (as a file
    edited by hand or by another tool would be)."""
    from safetensors.torch import save_file

    save_file(tensors, path)
    side = path.replace(".safetensors", ".json")
    meta = json.loads(open(side).read())
    meta.pop("sha256")
    meta.update(meta_update or {})
    open(side, "w").write(json.dumps(meta))


def test_garbage_data_under_an_intact_header_is_refused(setup, tmp_path):
    from safetensors.torch import load_file

    wanda = copy_artefact(setup["wanda"], tmp_path / "wanda")
    rng = torch.Generator().manual_seed(0)
    _without_checksum(wanda, {k: torch.randint(0, 256, v.shape, generator=rng, dtype=torch.uint8)
                              for k, v in load_file(wanda).items()})
    refused(evaluate_args(setup, "--mitigation", wanda, out=tmp_path / "o"), contains="not a 0/1 weight mask",
            out=tmp_path / "o")
    # 0/1 masks, but not the ones the sidecar describes
    wanda2 = copy_artefact(setup["wanda"], tmp_path / "wanda2")
    _without_checksum(wanda2, {k: torch.randint(0, 2, v.shape, generator=rng, dtype=torch.uint8)
                               for k, v in load_file(wanda2).items()})
    refused(evaluate_args(setup, "--mitigation", wanda2, out=tmp_path / "o"), contains="damaged", out=tmp_path / "o")
    nemo = copy_artefact(setup["nemo"], tmp_path / "nemo")
    _without_checksum(nemo, {k: torch.full_like(v, 10_000) if v.numel() else torch.tensor([10_000])
                             for k, v in load_file(nemo).items()})
    refused(evaluate_args(setup, "--mitigation", nemo, out=tmp_path / "o"), contains="neuron 10000",
            out=tmp_path / "o")


def test_nan_in_a_sidecar_is_refused(setup, tmp_path):
    nemo = copy_artefact(setup["nemo"], tmp_path / "nemo")
    side = nemo.replace(".safetensors", ".json")
    meta = json.loads(open(side).read())
    meta["config"]["scaling_factor"] = float("nan")
    open(side, "w").write(json.dumps(meta))  # Python writes NaN, which other JSON readers refuse
    refused(evaluate_args(setup, "--mitigation", nemo, out=tmp_path / "o"), contains="scaling_factor",
            out=tmp_path / "o")


def test_a_mitigation_fitted_on_another_model_is_refused(setup, tmp_path, clip_tokenizer):
    from diffusers import StableDiffusionPipeline

    from dori.models import load_pipeline
    from tests.conftest import tiny_components

    other_arch = tmp_path / "sd2"
    StableDiffusionPipeline(**tiny_components("sd2", clip_tokenizer)).save_pretrained(other_arch)
    pipe = load_pipeline(setup["model"])
    with torch.no_grad():  # same architecture, other weights (another checkpoint, a fine-tuned copy)
        for p in pipe.unet.parameters():
            p.add_(0.05 * torch.randn_like(p))
        for p in pipe.text_encoder.parameters():
            p.add_(0.05 * torch.randn_like(p))
    other_weights = tmp_path / "sd1-other"
    pipe.save_pretrained(other_weights)
    for model in (other_arch, other_weights):
        for name in ("nemo", "wanda"):
            line = refused(["evaluate", "--model", str(model), "--prompts", setup["prompts"], "--references",
                            setup["refs"], "--descriptor", setup["sscd"], "--seeds", "1", "--steps", "2",
                            "--mitigation", setup[name], "--out", str(tmp_path / "o")],
                           contains="was fitted on", out=tmp_path / "o")
            assert setup["model"] in line
    # the same model in another dtype is the same model
    ok(evaluate_args(setup, "--mitigation", setup["nemo"], "--mitigation", setup["wanda"], "--dtype", "bfloat16",
                     out=tmp_path / "bf16"))


def test_per_prompt_mitigation_on_prompts_it_was_not_fitted_on(setup, tmp_path):
    args = ["evaluate", "--model", setup["model"], "--prompts", setup["other"], "--descriptor", setup["sscd"],
            "--seeds", "1", "--steps", "2", "--mitigation", setup["nemo"]]
    refused([*args, "--out", str(tmp_path / "o")], contains="no selection", out=tmp_path / "o")
    ok([*args, "--mitigation-union", "--out", str(tmp_path / "union")])


def test_failed_run_is_marked_and_reported(setup, tmp_path, monkeypatch):
    import dori.evaluate

    def broken(*args, **kwargs):
        raise RuntimeError("out of memory (simulated)")

    monkeypatch.setattr(dori.evaluate, "score_images", broken)
    result = runner.invoke(app, evaluate_args(setup, out=tmp_path / "run"))
    assert result.exit_code != 0
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["status"] == "failed" and "out of memory" in manifest["error"]
    ok(["report", str(tmp_path / "run"), "--out", str(tmp_path / "page.html")])
    page = (tmp_path / "page.html").read_text()
    assert "failed" in page and "out of memory (simulated)" in page


def test_error_names_the_option(setup, tmp_path):
    refused(["prune", "--model", setup["model"], "--prompts", setup["prompts"], "--steps", "0",
             "--out", str(tmp_path / "o")], contains="--steps", out=tmp_path / "o")


def test_outputs_are_standard_json_and_files_readable(setup, tmp_path):
    ok(["evaluate", "--model", setup["model"], "--prompts", setup["prompts"], "--descriptor", setup["sscd"],
        "--seeds", "1", "--steps", "2", "--out", str(tmp_path / "run")])  # no references: no SSCD scores

    def strict(text):
        return json.loads(text, parse_constant=lambda c: pytest.fail(f"{c} in a JSON output"))

    summary = strict((tmp_path / "run" / "summary.json").read_text())
    assert summary["rows"][0]["mr"] is None
    for line in (tmp_path / "run" / "records.rank0.jsonl").read_text().splitlines():
        assert strict(line)["sscd_orig"] is None
    strict((tmp_path / "run" / "manifest.json").read_text())
    for path in (setup["nemo"], setup["wanda"]):
        for file in (path, path.replace(".safetensors", ".json")):
            assert stat.S_IMODE(os.stat(file).st_mode) & 0o044 == 0o044, file  # readable by group and others
        strict(open(path.replace(".safetensors", ".json")).read())


def test_prompts_longer_than_the_tokenizer_are_counted(setup, tmp_path):
    long = " ".join(["a very detailed photograph of a harbour"] * 20)
    prompts, refs = write_prompts_with_references(tmp_path / "long", [long, "a short one"])
    result = ok(["evaluate", "--model", setup["model"], "--prompts", str(prompts), "--references", str(refs),
                 "--descriptor", setup["sscd"], "--seeds", "1", "--steps", "2", "--out", str(tmp_path / "run")])
    assert "longer than the tokenizer's 77 tokens" in result.output
    records = {r["prompt_id"]: r for r in map(json.loads, (tmp_path / "run" / "records.rank0.jsonl").read_text().splitlines())}
    assert records["p0"]["truncated"] is True and records["p1"]["truncated"] is False
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["truncated_prompts"] == 1


def test_attack_table_shows_the_last_step(setup, tmp_path):
    result = ok(["attack", "--model", setup["model"], "--prompts", setup["prompts"], "--references", setup["refs"],
                 "--descriptor", setup["sscd"], "--steps", "3", "--seeds", "1", "--eval-steps", "2",
                 "--out", str(tmp_path / "run")])
    records = [json.loads(line) for line in (tmp_path / "run" / "records.rank0.jsonl").read_text().splitlines()]
    assert all(list(r["mr_by_step"])[-1] == "3" for r in records)
    assert " 3:" in result.output


# -- malformed files, every verb ------------------------------------------------------------------------
def _malformed(root):
    """Bad files of three kinds: empty, random bytes, a valid file of another kind (an image where text is
    read, a CSV where a binary file is); and folders whose every file (images, manifest, model index,
    records, mitigation, metadata) is one of them."""
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    (root / "empty").write_bytes(b"")
    (root / "random").write_bytes(rng.integers(0, 256, 4096, dtype=np.uint8).tobytes())
    Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(root / "image.png")
    (root / "table.csv").write_text("id,prompt\np0,a cat\n")
    files = {"empty": (root / "empty",) * 2, "random": (root / "random",) * 2,
             "other kind": (root / "image.png", root / "table.csv")}  # (for text options, for binary ones)
    folders = {}
    for name, source in (("empty", root / "empty"), ("random", root / "random"), ("other kind", root / "table.csv")):
        folder = root / f"dir-{name.replace(' ', '-')}"
        folder.mkdir()
        for target in ("p0.png", "p1.png", "manifest.json", "model_index.json", "records.parquet", "x.safetensors",
                       "x.json", "metadata.jsonl"):
            shutil.copy(source, folder / target)
        folders[name] = folder
    return files, folders


def test_every_verb_refuses_malformed_files_without_a_traceback(setup, tmp_path):
    files, folders = _malformed(tmp_path / "bad")
    m, p, r, s = setup["model"], setup["prompts"], setup["refs"], setup["sscd"]
    cases = []
    for kind, (text, binary) in files.items():
        folder = str(folders[kind])
        cases += [
            ["evaluate", "--model", m, "--prompts", str(text), "--references", r, "--descriptor", s],
            ["evaluate", "--model", m, "--prompts", p, "--references", folder, "--descriptor", s],
            ["evaluate", "--model", m, "--prompts", p, "--references", r, "--descriptor", str(binary)],
            ["evaluate", "--model", m, "--prompts", p, "--references", r, "--descriptor", s, "--config", str(text)],
            ["evaluate", "--model", m, "--prompts", p, "--references", r, "--descriptor", s,
             "--mitigation", f"{folder}/x.safetensors"],
            ["evaluate", "--model", m, "--prompts", p, "--references", r, "--descriptor", s, "--baseline", folder],
            ["evaluate", "--model", folder, "--prompts", p, "--references", r, "--descriptor", s],
            ["attack", "--model", m, "--prompts", p, "--references", folder, "--descriptor", s, "--steps", "1"],
            ["attack", "--model", m, "--prompts", p, "--references", r, "--descriptor", s, "--steps", "1",
             "--mitigation", f"{folder}/x.safetensors"],
            ["mitigate", "nemo", "--model", m, "--prompts", str(text)],
            ["mitigate", "nemo", "--model", m, "--prompts", p, "--statistics-file", str(binary)],
            ["prune", "--model", m, "--prompts", p, "--config", str(text)],
            ["finetune", "--model", m, "--prompts", p, "--references", r, "--descriptor", s, "--retain", folder],
            ["analyze", "activations", "--model", m, "--triggers", folder, "--memorized", p],
            ["analyze", "weights", "--model", m, "--triggers", folder, "--memorized", p],
            ["analyze", "scatter", "--model", m, "--prompts", p, "--references", folder, "--descriptor", s],
            ["report", folder],
            ["references", "--prompts", str(text)],
            ["demo", "--model", m, "--prompts", p, "--references", folder, "--descriptor", s],
        ]
    failures = []
    for i, args in enumerate(cases):
        out = tmp_path / f"out-{i}"
        try:
            refused([*args, "--out", str(out)] if args[0] != "report" else [*args, "--out", str(out / "page.html")],
                    out=out)
        except AssertionError as exc:
            failures.append(f"{' '.join(args[:2])} ... {' '.join(a for a in args if '/bad/' in a)}: {str(exc)[:300]}")
    assert not failures, "\n".join(failures)


def test_a_model_with_non_finite_weights_is_refused(setup, tmp_path):
    from dori.models import load_pipeline

    pipe = load_pipeline(setup["model"])
    with torch.no_grad():
        next(pipe.unet.parameters()).view(-1)[0] = float("nan")
    pipe.save_pretrained(tmp_path / "nan-model")
    refused(["evaluate", "--model", str(tmp_path / "nan-model"), "--prompts", setup["prompts"], "--references",
             setup["refs"], "--descriptor", setup["sscd"], "--out", str(tmp_path / "o")], contains="non-finite weights",
            out=tmp_path / "o")


def test_the_weight_probe_reaches_the_last_element_of_any_tensor():
    from dori.fingerprint import _probe

    big = torch.nn.Linear(29491200 // 320, 320, bias=False)  # 2^24 < numel: float32 cannot count to it exactly
    with torch.no_grad():
        big.weight.view(-1)[-1] = 7.0
    probe = _probe({"m": big})
    assert len(probe["m.weight"]) == 8 and probe["m.weight"][-1] == 7.0
