"""Images in and out: uint8 arrays, float tensors in [0, 1], PNG files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .errors import DoriError


def to_rgb(image: np.ndarray) -> np.ndarray:
    """A grey ``(H, W)`` image as ``(H, W, 3)``; colour images unchanged."""
    return image if image.ndim == 3 else np.repeat(image[..., None], 3, axis=-1)


def to_tensor(images) -> torch.Tensor:
    """uint8 ``(N, H, W, 3)`` / ``(H, W, 3)`` arrays or float tensors -> float ``(N, 3, H, W)`` in [0, 1]."""
    if isinstance(images, torch.Tensor) and images.dtype.is_floating_point:
        return images if images.ndim == 4 else images[None]
    array = np.asarray(images)
    if array.ndim == 3:
        array = array[None]
    tensor = torch.from_numpy(array.astype(np.float32))
    if array.dtype == np.uint8:
        tensor = tensor / 255.0
    return tensor.permute(0, 3, 1, 2).contiguous()


def load_image(path: Path) -> np.ndarray:
    """A file as uint8 ``(H, W, 3)``; a file that is not a readable image is a :class:`DoriError`."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            return np.asarray(image.convert("RGB"))
    except (OSError, UnidentifiedImageError) as exc:
        raise DoriError(f"references: {path} is not a readable image") from exc


def save_png(image: torch.Tensor, path: Path) -> None:
    """Write ``(3, H, W)`` in [0, 1] as a PNG (through a temporary file, so a kill leaves no torn image)."""
    from PIL import Image

    array = (image.permute(1, 2, 0).clamp(0, 1).numpy() * 255).round().astype(np.uint8)
    tmp = path.with_suffix(".tmp.png")
    Image.fromarray(array).save(tmp)
    tmp.replace(path)
