"""Image preprocessing shared by dVAE training (random crops) and tokenization (centre crops).

The paper (Appendix A.2) trains the dVAE on random crops resized to the model
size and encodes the dataset with a centre crop; both return uint8 HWC arrays
here, and :func:`to_tensor` turns a batch of them into floats in [0, 1].
"""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image


def decode_image(data: bytes) -> Image.Image:
    """Decode encoded image bytes to an RGB PIL image; ``ValueError`` if they are not an image."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            return image.convert("RGB")
    except Exception as err:
        raise ValueError(f"cannot decode image bytes ({len(data)} bytes): {err}") from err


def center_crop_resize(image: Image.Image, size: int) -> np.ndarray:
    """The largest centred square, resized to ``size``×``size`` → uint8 array (size, size, 3)."""
    w, h = image.size
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    crop = image.crop((left, top, left + side, top + side))
    if side != size:
        crop = crop.resize((size, size), Image.Resampling.BICUBIC if side < size else Image.Resampling.LANCZOS)
    return np.asarray(crop, dtype=np.uint8)


def random_crop_resize(
    image: Image.Image, size: int, rng: np.random.Generator, min_scale: float = 0.85
) -> np.ndarray:
    """A random square crop with side in [min_scale, 1] × the short side, resized to ``size`` (uint8 HWC).

    ``min_scale=1`` gives a random square crop of full short side (only the
    position varies), which on square images equals the centre crop.
    """
    if not 0.0 < min_scale <= 1.0:
        raise ValueError(f"min_scale must be in (0, 1], got {min_scale}")
    w, h = image.size
    short = min(w, h)
    side = max(1, int(round(short * rng.uniform(min_scale, 1.0))))
    left = int(rng.integers(0, w - side + 1))
    top = int(rng.integers(0, h - side + 1))
    crop = image.crop((left, top, left + side, top + side))
    if side != size:
        crop = crop.resize((size, size), Image.Resampling.BICUBIC if side < size else Image.Resampling.LANCZOS)
    return np.asarray(crop, dtype=np.uint8)


def to_tensor(images: list[np.ndarray] | np.ndarray) -> torch.Tensor:
    """uint8 images (N, H, W, 3) → float tensor (N, 3, H, W) in [0, 1]."""
    array = np.stack(images) if isinstance(images, list) else images
    return torch.from_numpy(np.ascontiguousarray(array)).permute(0, 3, 1, 2).float().div_(255.0)


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """Float tensor (N, 3, H, W) in [0, 1] → uint8 array (N, H, W, 3)."""
    return images.clamp(0, 1).mul(255).round().byte().permute(0, 2, 3, 1).cpu().numpy()
