"""64-bit DCT perceptual hash (pHash) and Hamming distances, for near-duplicate detection.

The hash of an image: convert to grayscale, resize to 32×32, take the
orthonormal 2-D DCT-II (two products with a DCT matrix), keep the top-left
8×8 low-frequency block (DC included) and set one bit per coefficient that is
above the block's median; bits are read row-major, the first one most
significant. This is the classic pHash (as in the ``imagehash`` package).
JPEG re-encoding, small resizes and mild colour changes move few bits;
different images differ in about half of them (see ``tests/…/test_phash.py``).
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

IMAGE_SIZE = 32
"""Side of the grayscale thumbnail the DCT is taken of."""
HASH_SIDE = 8
"""Side of the low-frequency block kept: HASH_SIDE² = 64 bits."""
HASH_BITS = HASH_SIDE * HASH_SIDE
_BIT_WEIGHTS = np.uint64(1) << np.arange(HASH_BITS - 1, -1, -1, dtype=np.uint64)


def dct_matrix(n: int) -> np.ndarray:
    """The orthonormal DCT-II matrix ``C`` (n×n): ``C @ x`` is the DCT of a column vector ``x``."""
    k = np.arange(n)[:, None]
    i = np.arange(n)[None, :]
    matrix = np.sqrt(2.0 / n) * np.cos(np.pi * (2 * i + 1) * k / (2 * n))
    matrix[0] /= np.sqrt(2.0)
    return matrix


_DCT = dct_matrix(IMAGE_SIZE)


def phash(image: Image.Image) -> int:
    """The 64-bit perceptual hash of ``image``, an int in [0, 2**64)."""
    gray = image.convert("L").resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.LANCZOS)
    pixels = np.asarray(gray, dtype=np.float64)  # (32, 32)
    coefficients = _DCT @ pixels @ _DCT.T  # (32, 32), 2-D DCT-II
    low = coefficients[:HASH_SIDE, :HASH_SIDE]  # (8, 8)
    bits = (low > np.median(low)).reshape(-1).astype(np.uint64)
    return int(np.bitwise_or.reduce(bits * _BIT_WEIGHTS))


def phash_bytes(data: bytes) -> int:
    """The perceptual hash of encoded image bytes (JPEG, PNG, …); PIL's errors if they do not decode."""
    with Image.open(io.BytesIO(data)) as image:
        return phash(image)


def _check_hash(name: str, value: int) -> None:
    if not isinstance(value, (int, np.integer)) or not 0 <= int(value) < 2**HASH_BITS:
        raise ValueError(
            f"{name} must be a {HASH_BITS}-bit hash, an int in [0, 2**{HASH_BITS}); got {value!r}"
        )


def hamming(a: int, b: int) -> int:
    """Number of bits in which hashes ``a`` and ``b`` differ (0 … 64)."""
    _check_hash("a", a)
    _check_hash("b", b)
    return (int(a) ^ int(b)).bit_count()


def hamming_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pairwise Hamming distances (len(a) × len(b), uint8) between two uint64 arrays of hashes."""
    a = np.asarray(a, dtype=np.uint64)
    b = np.asarray(b, dtype=np.uint64)
    return np.bitwise_count(a[:, None] ^ b[None, :])
