"""Every verb on a pipeline of Stable Diffusion v1.4's shape (random weights, the published configs), at
reduced cost, with the time and peak memory of each; and the UNet's time per call, to estimate what
the paper's experiments cost.

    python benchmarks/sd_scale.py                       # CPU: 256x256 (latents 32x32), 2-5 steps, one prompt
    python benchmarks/sd_scale.py --device cuda --dtype bfloat16 --size 512

Each verb runs as its own process through the CLI (``python -m dori ...``), so its peak resident
memory is its own. Prints Markdown tables (UNet calls; verbs) and writes them as JSON to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch
from measure import machine_line


def inputs(folder: Path, size: int) -> dict[str, Path]:
    """A prompt file with a reference image, a non-memorized prompt file, retain pairs, an SSCD stand-in."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    (folder / "refs").mkdir(exist_ok=True)
    Image.fromarray(rng.integers(0, 255, (size, size + 64, 3), dtype=np.uint8)).save(folder / "refs" / "p0.png")
    (folder / "surrogates").mkdir(exist_ok=True)
    Image.fromarray(np.full((size, size, 3), 128, dtype=np.uint8)).save(folder / "surrogates" / "p0.png")
    (folder / "prompts.csv").write_text("id,prompt\np0,The No Limits Business Woman Podcast\n")
    (folder / "nonmem.txt").write_text("a photo of a harbour at dawn\na bowl of fruit on a table\n")
    from dori.sd_shapes import write_sscd_stand_in

    write_sscd_stand_in(folder / "sscd.pt", channels=32, dim=512, kernel=7, stride=4)
    return {"prompts": folder / "prompts.csv", "refs": folder / "refs", "nonmem": folder / "nonmem.txt",
            "sscd": folder / "sscd.pt", "surrogates": folder / "surrogates"}


def unet_times(folder: Path, device: str, dtype: torch.dtype, latent: int, repeats: int) -> list[dict]:
    """Median seconds of one UNet forward and forward+backward (gradient to the conditioning only, as the
    attack) at batch 1 and 8."""
    from dori.models import load_pipeline

    pipe = load_pipeline(folder, device=device, dtype=dtype)
    unet = pipe.unet
    rows = []
    for batch in (1, 8):
        x = torch.randn(batch, 4, latent, latent, device=device, dtype=dtype)
        t = torch.full((batch,), 500, device=device)
        y = torch.randn(batch, 77, unet.config.cross_attention_dim, device=device, dtype=dtype)
        for kind in ("forward", "forward+backward"):
            times = []
            for _ in range(repeats + 1):
                cond = y.clone().requires_grad_(kind != "forward")
                if device.startswith("cuda"):
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                with torch.set_grad_enabled(kind != "forward"):
                    out = unet(x, t, encoder_hidden_states=cond).sample
                    if kind != "forward":
                        out.float().pow(2).mean().backward()
                if device.startswith("cuda"):
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - t0)
            rows.append({"batch": batch, "call": kind, "seconds": float(np.median(times[1:])),
                         "spread": [float(min(times[1:])), float(max(times[1:]))]})
            print(f"  UNet {kind:17s} batch {batch}: {rows[-1]['seconds']:.3f} s", flush=True)
    return rows


def free_bytes(path: Path) -> int:
    """Free space of the disk that holds ``path`` (its nearest existing folder)."""
    while not path.exists():
        path = path.parent
    return shutil.disk_usage(path).free


def run_verb(name: str, args: list[str]) -> dict:
    """One CLI command as its own process: wall seconds, peak resident memory, exit code; the size of its
    ``--out`` when it ends and the most the disk's free space fell while it ran (sampled every 0.2 s; it
    counts temporary files too, and any other process writing to the same disk)."""
    import threading

    from dori.runs import folder_bytes

    out = Path(args[args.index("--out") + 1])
    free_before = lowest = free_bytes(out)
    done = threading.Event()

    def watch() -> None:
        nonlocal lowest
        while not done.wait(0.2):
            lowest = min(lowest, free_bytes(out))

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "dori", *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    output = proc.stdout.read().decode(errors="replace")
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    seconds = time.perf_counter() - t0
    done.set()
    watcher.join()
    row = {"verb": name, "seconds": round(seconds, 1), "peak_rss_gib": round(usage.ru_maxrss / 2**20, 2),
           "out_gb": round(folder_bytes(out) / 1e9, 2), "peak_disk_gb": round((free_before - lowest) / 1e9, 2),
           "exit": proc.returncode}
    print(f"  {name:28s} {seconds:7.1f} s  peak {row['peak_rss_gib']:5.2f} GiB  out {row['out_gb']:5.2f} GB  "
          f"peak disk {row['peak_disk_gb']:5.2f} GB  exit {proc.returncode}", flush=True)
    if proc.returncode != 0:
        print(output[-3000:])
    return row


def verbs(model: Path, files: dict[str, Path], work: Path, device: str, dtype: str, finetune_dtype: str) -> list[dict]:
    common = ["--model", str(model), "--device", device, "--dtype", dtype]
    finetune_common = ["--model", str(model), "--device", device, "--dtype", finetune_dtype]
    data = ["--prompts", str(files["prompts"]), "--references", str(files["refs"]), "--descriptor", str(files["sscd"])]
    gen = work / "generation.yaml"
    gen.write_text("generation: {num_inference_steps: 2, batch_size: 2}\n")
    runs = work / "runs"
    plan = [
        ("evaluate (1 prompt x 2 seeds, 2 steps)", ["evaluate", *common, *data, "--seeds", "2", "--steps", "2",
                                                    "--out", str(runs / "evaluate")]),
        ("mitigate nemo (1 prompt)", ["mitigate", "nemo", *common, "--prompts", str(files["prompts"]), "--out",
                                      str(runs / "nemo"), "--statistics", str(files["nonmem"]), "--num-seeds", "2",
                                      "--num-inference-steps", "5", "--ssim-threshold", "0.2", "--search-batch", "2"]),
        ("mitigate wanda (1 prompt, 3 steps)", ["mitigate", "wanda", *common, "--prompts", str(files["prompts"]),
                                                "--out", str(runs / "wanda"), "--num-inference-steps", "3",
                                                "--timesteps", "2"]),
        ("attack (1 trigger, 3 steps, NeMo)", ["attack", *common, *data, "--steps", "3", "--seeds", "1",
                                               "--eval-steps", "2", "--mitigation", str(runs / "nemo" / "nemo.safetensors"),
                                               "--out", str(runs / "attack")]),
        ("mitigate wen (1 iteration)", ["mitigate", "wen", *common, "--prompts", str(files["prompts"]), "--iterations",
                                        "1", "--out", str(runs / "wen")]),
        ("attack (1 trigger, 2 steps, 2 pairs, through Wen's adjustment)", [
            "attack", *common, *data, "--steps", "2", "--pairs", "2", "--seeds", "1", "--eval-steps", "2",
            "--mitigation", str(runs / "wen" / "wen.safetensors"), "--adaptive", "--out", str(runs / "attack-wen")]),
        (f"finetune (2 steps, Dori 2 steps, {finetune_dtype})", ["finetune", *finetune_common, "--prompts", str(files["prompts"]), "--references",
                                              str(files["refs"]), "--descriptor", str(files["sscd"]), "--retain",
                                              str(files["nonmem"]), "--retain-generate", "--epochs", "1",
                                              "--steps-per-epoch", "2", "--inner-steps", "2", "--surrogate",
                                              str(files["surrogates"]), "--out", str(runs / "finetune"),
                                              "--config", str(work / "finetune.yaml")]),
        ("analyze scatter (2 starts, 2 steps)", ["analyze", "scatter", *common, *data, "--starts", "2", "--steps", "2",
                                                 "--seeds", "1", "--eval-steps", "2", "--reference-prompts",
                                                 str(files["nonmem"]), "--reference-count", "2", "--out",
                                                 str(runs / "scatter")]),
        ("analyze activations", ["analyze", "activations", *common, "--triggers", str(runs / "scatter"), "--all-triggers",
                                 "--memorized", str(files["nonmem"]), "--steps", "5", "--out", str(runs / "activations")]),
        ("analyze weights (Wanda)", ["analyze", "weights", *common, "--triggers", str(runs / "scatter"), "--all-triggers",
                                     "--memorized", str(files["nonmem"]), "--method", "wanda", "--wanda-steps", "3",
                                     "--timesteps", "2", "--out", str(runs / "weights")]),
        ("report", ["report", str(runs / "evaluate"), str(runs / "attack"), "--out", str(runs / "report.html")]),
    ]
    (work / "finetune.yaml").write_text("settings:\n  images_per_step: 1\n  retain_batch_size: 1\n  adv_pairs: 2\n"
                                        "  inner: {pairs: 2}\n  descriptor: {threshold: 1.0}\n"
                                        "  generation: {num_inference_steps: 2, batch_size: 2}\n")
    return [run_verb(name, args) for name, args in plan]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="sd14", choices=("sd14", "sd2-base"))
    parser.add_argument("--size", type=int, default=256, help="Image side (latent side = size / 8).")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--finetune-dtype", default=None, help="dtype of the fine-tuning run (default: --dtype; "
                        "bfloat16 only on a CPU that runs it natively, see dori.models.cpu_runs_natively)")
    parser.add_argument("--skip-timing", action="store_true", help="Only the verbs, not the UNet's time per call.")
    parser.add_argument("--work", type=Path, default=Path("runs/sd-scale"))
    parser.add_argument("--out", type=Path, default=None, help="JSON file of the figures (default <work>/figures.json).")
    parser.add_argument("--skip-verbs", action="store_true")
    args = parser.parse_args()

    from dori.models import parse_dtype
    from dori.sd_shapes import build_sd_shaped, shaped_folder

    print(f"{machine_line(args.device)}, dtype {args.dtype}", flush=True)
    t0 = time.perf_counter()
    latent = args.size // 8
    model = build_sd_shaped(args.shape, shaped_folder(f"{args.shape}-{args.size}"), sample_size=latent)
    built = time.perf_counter() - t0
    shape = json.loads((model / "shape.json").read_text())
    print(f"{args.shape}-shaped pipeline ({shape['parameters']}) in {model} ({built:.0f} s to build or find)",
          flush=True)
    figures = {"machine": {"cores": os.cpu_count(), "torch": torch.__version__, "threads": torch.get_num_threads(),
                           "device": args.device, "dtype": args.dtype, "platform": platform.platform()},
               "shape": shape, "size": args.size}
    if not args.skip_verbs:  # first, in fresh processes: each verb's peak memory is its own
        files = inputs(args.work / "inputs", args.size)
        figures["verbs"] = verbs(model, files, args.work, args.device, args.dtype, args.finetune_dtype or args.dtype)
    if not args.skip_timing:
        figures["unet"] = unet_times(model, args.device, parse_dtype(args.dtype), latent, args.repeats)
        figures["unet_process_peak_rss_gib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)
    out = args.out or args.work / "figures.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(figures, indent=1))
    print(f"figures: {out}")
    if any(v["exit"] != 0 for v in figures.get("verbs", [])):
        sys.exit(1)


if __name__ == "__main__":
    main()
