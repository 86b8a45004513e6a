"""Image grids for people to look at: reconstructions, samples, search hits."""

from __future__ import annotations

import numpy as np
from PIL import Image


def image_grid(rows: list[np.ndarray], *, scale: int = 1, pad: int = 2, background: int = 255) -> Image.Image:
    """Stack rows of uint8 images (each row an array (N, H, W, 3)) into one picture.

    Rows may have different lengths; every image must have the same H×W.
    ``scale`` enlarges by nearest-neighbour (small 32-px images are hard to see).
    """
    if not rows or any(len(r) == 0 for r in rows):
        raise ValueError("image_grid needs at least one non-empty row")
    h, w = rows[0].shape[1:3]
    for i, row in enumerate(rows):
        if row.ndim != 4 or row.shape[1:] != (h, w, 3):
            raise ValueError(f"row {i} has shape {row.shape}, expected (N, {h}, {w}, 3)")
    cols = max(len(r) for r in rows)
    canvas = np.full((len(rows) * (h + pad) + pad, cols * (w + pad) + pad, 3), background, dtype=np.uint8)
    for i, row in enumerate(rows):
        for j, image in enumerate(row):
            top, left = pad + i * (h + pad), pad + j * (w + pad)
            canvas[top : top + h, left : left + w] = image
    picture = Image.fromarray(canvas)
    if scale > 1:
        picture = picture.resize((picture.width * scale, picture.height * scale), Image.Resampling.NEAREST)
    return picture
