import json
import os
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest

from dori.descriptors import DescriptorConfig
from dori.errors import DoriError
from dori.evaluate import EvaluateConfig, run_evaluate
from dori.generation import GenerationConfig
from tests.helpers import write_prompts_with_references, write_sscd

PROMPTS = ["a red circle", "a blue square", "a photo of a cat"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory, sd1_folder):
    folder = tmp_path_factory.mktemp("eval")
    csv, refs = write_prompts_with_references(folder, PROMPTS)
    sscd = write_sscd(folder / "sscd.pt")
    return {"model": str(sd1_folder), "prompts": str(csv), "references": str(refs), "descriptor": str(sscd)}


@pytest.fixture(scope="module")
def pipe(setup):
    from dori.models import load_pipeline

    return load_pipeline(setup["model"])


def config_for(setup, **kw):
    return EvaluateConfig(num_seeds=3, generation=GenerationConfig(num_inference_steps=3, batch_size=4),
                          prompts=setup["prompts"], references=setup["references"],
                          descriptor=DescriptorConfig(setup["descriptor"]), **kw)


def test_records_summary_and_per_prompt_table(tmp_path, setup, pipe):
    result = run_evaluate(pipe, config_for(setup), tmp_path / "run")
    assert len(result.records) == 9 and {r["key"] for r in result.records} == {f"p{i}#{s}" for i in range(3) for s in range(3)}
    assert all(-1 <= r["sscd_orig"] <= 1 and r["noise_norm_first"] > 0 for r in result.records)
    assert all((tmp_path / "run" / r["image"]).is_file() for r in result.records)
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["status"] == "done" and manifest["resolved"]["descriptor"]["kind"] == "sscd"
    assert manifest["model"]["location"] == setup["model"] and manifest["config"]["prompts"] == setup["prompts"]
    table = pd.read_parquet(tmp_path / "run" / "prompts.parquet")
    assert list(table["n"]) == [3, 3, 3]
    assert (table["sscd_orig_max"] >= table["sscd_orig_median"]).all()
    row = result.summary["rows"][0]
    assert row["n"] == 9 and 0 <= row["mr"] <= 1


def test_rerun_adds_nothing_and_other_config_refuses(tmp_path, setup, pipe):
    first = run_evaluate(pipe, config_for(setup), tmp_path / "run")
    again = run_evaluate(pipe, config_for(setup), tmp_path / "run")
    assert [r["key"] for r in again.records] == [r["key"] for r in first.records]
    assert sum(1 for _ in open(tmp_path / "run" / "records.rank0.jsonl")) == 9
    with pytest.raises(DoriError, match="another config"):
        run_evaluate(pipe, config_for(setup, seed=5), tmp_path / "run")


def _cli(setup, out, *extra):
    return [sys.executable, "-m", "dori", "evaluate", "--model", setup["model"], "--prompts", setup["prompts"],
            "--references", setup["references"], "--descriptor", setup["descriptor"], "--seeds", "4",
            "--steps", "3", "--batch-size", "1", "--out", str(out), *extra]


def _records(folder):
    table = pd.read_parquet(folder / "records.parquet")
    return table.drop(columns=["image"]).sort_values("key").reset_index(drop=True)


def test_sigkill_then_resume_gives_the_uninterrupted_records(tmp_path, setup):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    subprocess.run(_cli(setup, tmp_path / "full"), check=True, env=env, capture_output=True)
    proc = subprocess.Popen(_cli(setup, tmp_path / "killed"), env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    records = tmp_path / "killed" / "records.rank0.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and (not records.exists() or len(records.read_text().splitlines()) < 3):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done_before = len(records.read_text().splitlines())
    assert 3 <= done_before < 12, "the kill should land mid-run"
    assert not (tmp_path / "killed" / "records.parquet").exists()
    subprocess.run(_cli(setup, tmp_path / "killed"), check=True, env=env, capture_output=True)
    resumed, full = _records(tmp_path / "killed"), _records(tmp_path / "full")
    assert resumed["key"].is_unique and len(resumed) == 12
    pd.testing.assert_frame_equal(resumed, full, check_exact=False, atol=1e-5)


def test_two_processes_give_the_records_of_one(tmp_path, setup):
    """``dori --processes 2 evaluate`` starts two processes (one thread each on these 2 cores) that share the
    images; the records are those of one process, and the results table is printed once."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    one = subprocess.run(_cli(setup, tmp_path / "one"), check=True, env=env, capture_output=True, text=True)
    two_cli = _cli(setup, tmp_path / "two")
    result = subprocess.run([*two_cli[:3], "--processes", "2", *two_cli[3:]], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert {p.name for p in (tmp_path / "two").glob("records.rank*.jsonl")} == {"records.rank0.jsonl", "records.rank1.jsonl"}
    pd.testing.assert_frame_equal(_records(tmp_path / "two"), _records(tmp_path / "one"), check_exact=False, atol=1e-5)
    assert one.stdout.count("run folder:") == 1 and result.stdout.count("run folder:") == 1


def test_sscd_gen_against_a_baseline_run(tmp_path, setup, pipe):
    run_evaluate(pipe, config_for(setup), tmp_path / "base")
    same = run_evaluate(pipe, config_for(setup, baseline=str(tmp_path / "base")), tmp_path / "same")
    assert all(r["sscd_gen"] > 0.99 for r in same.records)
    assert "sscd_gen_median" in pd.read_parquet(tmp_path / "same" / "prompts.parquet")
    with pytest.raises(DoriError, match="has no image for"):
        run_evaluate(pipe, config_for(setup, baseline=str(tmp_path / "base"), seed=50), tmp_path / "other")
    assert not (tmp_path / "other").exists()


def test_attack_and_nemo_share_their_work_among_processes(tmp_path, setup):
    """``accelerate launch`` with 2 processes: each attacks / localises its share, the records and the saved
    mitigation are those of one process."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "DORI_CACHE": str(tmp_path / "cache")}
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "dori"]
    common = ["--model", setup["model"], "--prompts", setup["prompts"]]
    attack = ["attack", *common, "--references", setup["references"], "--descriptor", setup["descriptor"],
              "--steps", "2", "--seeds", "1", "--eval-steps", "2", "--restarts", "2"]
    nemo = ["mitigate", "nemo", *common, "--statistics", setup["prompts"], "--num-seeds", "2",
            "--num-inference-steps", "5", "--ssim-threshold", "0.2"]
    for name, args in (("attack", attack), ("nemo", nemo)):
        one = subprocess.run([sys.executable, "-m", "dori", *args, "--out", str(tmp_path / f"{name}-1")], env=env,
                             capture_output=True, text=True)
        assert one.returncode == 0, one.stderr[-2000:]
        two = subprocess.run(launch + [*args, "--out", str(tmp_path / f"{name}-2")], env=env, capture_output=True,
                             text=True)
        assert two.returncode == 0, two.stderr[-2000:]
        files = {p.name for p in (tmp_path / f"{name}-2").glob("records.rank*.jsonl")}
        assert files == {"records.rank0.jsonl", "records.rank1.jsonl"}
        a, b = (pd.read_parquet(tmp_path / f"{name}-{k}" / "records.parquet") for k in (1, 2))
        assert list(a["key"]) == list(b["key"]) and len(a) == (6 if name == "attack" else 3)
    from dori.mitigations import load_mitigation

    single, shared = (load_mitigation(tmp_path / f"nemo-{k}" / "nemo.safetensors") for k in (1, 2))
    assert [r.prompt for r in single.results] == [r.prompt for r in shared.results]
    assert all(single.selection(r.prompt) == shared.selection(r.prompt) for r in single.results)


def test_a_weights_mitigation_fitted_by_two_processes_is_that_of_one(tmp_path, setup):
    """``dori --processes 2 mitigate esd``: both processes run the same training (the run folder made by the
    main one first), and the fitted tensors equal a single process's up to floating-point noise (accelerate
    averages the two processes' gradients): under 1% of what the two steps changed, per tensor."""

    from dori.mitigations import load_mitigation

    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "DORI_CACHE": str(tmp_path / "cache")}
    args = ["mitigate", "esd", "--model", setup["model"], "--prompts", setup["prompts"], "--limit", "2",
            "--iterations", "2", "--num-inference-steps", "2", "--lr", "1e-3", "--checkpoint-every", "1"]
    for name, prefix in (("one", []), ("two", ["--processes", "2"])):
        result = subprocess.run([sys.executable, "-m", "dori", *prefix, *args, "--out", str(tmp_path / name)], env=env,
                                capture_output=True, text=True)
        assert result.returncode == 0, result.stderr[-2000:]
    one, two = (load_mitigation(tmp_path / name / "esd.safetensors") for name in ("one", "two"))
    assert one.tensors.keys() == two.tensors.keys() and one.tensors
    from dori.models import load_pipeline

    before = dict(load_pipeline(setup["model"]).unet.named_parameters())
    for k in one.tensors:
        change = (one.tensors[k] - before[k.removeprefix("unet.")].detach()).norm()
        assert change > 1e-3 and (one.tensors[k] - two.tensors[k]).norm() < change / 100, k

