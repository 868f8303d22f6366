"""Whether this CPU runs bfloat16 and float16 natively, and what one convolution and one linear layer cost
in each dtype (seconds, one call after a warm-up), as docs/sd-scale.md reports:

    python benchmarks/cpu_dtypes.py

Without the AVX-512 / AMX half-precision instructions PyTorch emulates the half precisions, and the
convolutions of the UNet and the VAE become the bottleneck of every verb run in them on that CPU.
"""

from __future__ import annotations

import time

import torch
from measure import machine_line

from dori.models import cpu_runs_natively


def seconds(module: torch.nn.Module, x: torch.Tensor) -> float:
    with torch.no_grad():
        module(x)
        t0 = time.perf_counter()
        module(x)
    return time.perf_counter() - t0


def main() -> None:
    print(machine_line("cpu"), f"capability {torch.backends.cpu.get_cpu_capability()}")
    print("| dtype | native | conv 3x3, 128 ch, 128x128 (s) | linear 1280x1280, 1024 rows (s) |")
    print("| --- | --- | --- | --- |")
    base = None
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        torch.manual_seed(0)
        conv = seconds(torch.nn.Conv2d(128, 128, 3, padding=1).to(dtype), torch.randn(1, 128, 128, 128, dtype=dtype))
        linear = seconds(torch.nn.Linear(1280, 1280).to(dtype), torch.randn(1024, 1280, dtype=dtype))
        base = base or (conv, linear)
        print(f"| {str(dtype).removeprefix('torch.')} | {cpu_runs_natively(dtype)} | {conv:.3f} ({conv / base[0]:.0f}x) "
              f"| {linear:.4f} ({linear / base[1]:.1f}x) |")


if __name__ == "__main__":
    main()
