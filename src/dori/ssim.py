"""(Multi-scale) SSIM on small tensors, as NeMo uses it on noise differences.

NeMo compares min-max scaled noise differences with MS-SSIM (Gaussian window 11, sigma 1.5, three
scales with betas 0.33). Latents smaller than that window (the testbed's are 8x8) cannot take it, so
the window shrinks to the largest odd size that fits and the scales to those whose side is still at
least the window; :func:`ssim_settings` says what is used, and callers record it.

``normalize_betas`` (the default) rescales the betas to sum to 1, so that a single scale gives plain
SSIM; the official code uses them as given (torchmetrics' convention), which for SD's 64x64 latents
gives ``value ** 0.99`` of the normalised one: ``normalize_betas=False`` reproduces it, as a fixed
threshold such as NeMo's 0.428 needs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

NEMO_BETAS = (0.33, 0.33, 0.33)


def ssim_settings(size: int, kernel_size: int = 11, betas: tuple[float, ...] = NEMO_BETAS) -> tuple[int, tuple[float, ...]]:
    """Effective ``(kernel_size, betas)`` for images of side ``size``."""
    kernel = min(kernel_size, size if size % 2 else size - 1)
    scales = 1
    while scales < len(betas) and size // (2**scales) >= kernel:
        scales += 1
    return kernel, tuple(betas[:scales])


def _window(kernel: int, sigma: float, channels: int, device, dtype) -> torch.Tensor:
    coords = torch.arange(kernel, device=device, dtype=dtype) - (kernel - 1) / 2
    g = torch.exp(-(coords**2) / (2 * sigma**2))
    g = g / g.sum()
    return (g[:, None] * g[None, :]).expand(channels, 1, kernel, kernel).contiguous()


def _ssim_cs(x: torch.Tensor, y: torch.Tensor, window: torch.Tensor, data_range: float) -> tuple[torch.Tensor, torch.Tensor]:
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    groups = x.shape[1]
    mu_x, mu_y = F.conv2d(x, window, groups=groups), F.conv2d(y, window, groups=groups)
    sxx = F.conv2d(x * x, window, groups=groups) - mu_x**2
    syy = F.conv2d(y * y, window, groups=groups) - mu_y**2
    sxy = F.conv2d(x * y, window, groups=groups) - mu_x * mu_y
    cs = (2 * sxy + c2) / (sxx + syy + c2)
    lum = (2 * mu_x * mu_y + c1) / (mu_x**2 + mu_y**2 + c1)
    return (lum * cs).flatten(1).mean(1), cs.flatten(1).mean(1)


def ms_ssim(x: torch.Tensor, y: torch.Tensor, kernel_size: int = 11, betas: tuple[float, ...] = NEMO_BETAS,
            sigma: float = 1.5, data_range: float = 1.0, normalize_betas: bool = True) -> torch.Tensor:
    """MS-SSIM per pair: ``x``, ``y`` ``(N, C, H, W)`` -> ``(N,)``. Contrast terms are clamped at 0."""
    kernel, betas = ssim_settings(min(x.shape[-2:]), kernel_size, betas)
    window = _window(kernel, sigma, x.shape[1], x.device, x.dtype)
    weights = torch.tensor(betas, device=x.device, dtype=x.dtype)
    if normalize_betas:
        weights = weights / weights.sum()
    values = []
    for scale in range(len(betas)):
        ssim, cs = _ssim_cs(x, y, window, data_range)
        if scale < len(betas) - 1:
            values.append(cs.clamp(min=0))
            x, y = F.avg_pool2d(x, 2), F.avg_pool2d(y, 2)
        else:
            values.append(ssim.clamp(min=0))
    return torch.prod(torch.stack(values, dim=1) ** weights, dim=1)
