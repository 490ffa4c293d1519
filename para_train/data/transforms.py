"""Image bytes -> training pixels: decode, resize the shorter side, square crop, optional flip.

Random crops and flips draw from a generator the caller seeds per sample, so a resumed run
produces the same pixels as an uninterrupted one. Every sample becomes a square crop; aspect-ratio
buckets (batches of one shape per bucket) are not implemented yet.
"""
from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image


def decode_image(data: bytes, resolution: int, crop: str = "center", flip: bool = False,
                 rng: np.random.Generator | None = None) -> torch.Tensor:
    """Encoded image bytes -> float tensor (3, R, R) in [-1, 1]: shorter side resized to R, square crop.

    `crop="random"` and `flip=True` need `rng`. Raises whatever PIL raises for bytes it cannot decode.
    """
    assert crop == "center" or rng is not None, "random crops need a seeded generator"
    img = Image.open(io.BytesIO(data))
    img.draft("RGB", (resolution, resolution))  # JPEG: decode at a reduced size when the image is much larger
    img = img.convert("RGB")
    w, h = img.size
    if (w, h) != (resolution, resolution):
        scale = resolution / min(w, h)
        img = img.resize((max(resolution, round(w * scale)), max(resolution, round(h * scale))), Image.BICUBIC)
        w, h = img.size
        if crop == "random":
            left, top = int(rng.integers(0, w - resolution + 1)), int(rng.integers(0, h - resolution + 1))
        else:
            left, top = (w - resolution) // 2, (h - resolution) // 2
        img = img.crop((left, top, left + resolution, top + resolution))
    # Layout and scaling in numpy: torch's parallel copy kernels are slow when the cores are busy.
    arr = np.asarray(img).transpose(2, 0, 1)
    if flip and rng.random() < 0.5:
        arr = arr[:, :, ::-1]
    return torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32) / 127.5 - 1.0)
