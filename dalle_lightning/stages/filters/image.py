"""Image rules: the original image has a usable shape and the stored bytes decode.

The DALL-E paper (appendix C) discards images whose aspect ratio is outside
[1/2, 2]; we also drop images whose smaller original side is tiny (icons,
tracking pixels). Both rules look at the *original* size the download stage
recorded (``original_width``/``original_height``), falling back to the stored
size and then the decoded size when it is missing. The stored ``image`` bytes
must decode with PIL.

A caller that has already decoded the image (to hash it, say) passes it in
the row under :data:`DECODED` — a PIL image, or None when decoding failed —
so the bytes are not decoded twice.
"""

from __future__ import annotations

import io

from PIL import Image

from dalle_lightning.stages.filters.base import KEEP, Decision, Row, RowFilter, reject

ASPECT_RATIO = "aspect_ratio"
TOO_SMALL = "too_small"
UNDECODABLE = "undecodable"

DECODED = "decoded"
"""Optional row entry: the image already decoded from ``image`` (None if that failed)."""
DECODE_ERROR = "decode_error"
"""Optional row entry next to :data:`DECODED`: why decoding failed."""


def decode_image(data: bytes | None) -> tuple[Image.Image | None, str]:
    """Decode encoded image bytes fully; (image, "") or (None, why it failed)."""
    if not data:
        return None, "no image bytes"
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
        return None, f"{type(error).__name__}: {error}"
    if image.width < 1 or image.height < 1:
        return None, f"decoded image has size {image.width}x{image.height}"
    return image, ""


def _original_size(row: Row, decoded: Image.Image | None) -> tuple[int, int] | None:
    for w_col, h_col in (("original_width", "original_height"), ("width", "height")):
        width, height = row.get(w_col), row.get(h_col)
        if width and height:
            return int(width), int(height)
    return decoded.size if decoded is not None else None


class ImageFilter(RowFilter):
    """Reject undecodable images, tiny originals and originals outside the aspect-ratio window."""

    reasons = (UNDECODABLE, TOO_SMALL, ASPECT_RATIO)

    def __init__(self, min_aspect: float = 0.5, max_aspect: float = 2.0, min_side: int = 32) -> None:
        super().__init__()
        if not 0 < min_aspect <= max_aspect:
            raise ValueError(
                f"aspect bounds must satisfy 0 < min_aspect <= max_aspect, got {min_aspect}, {max_aspect}"
            )
        if min_side < 1:
            raise ValueError(f"min_side must be a positive number of pixels, got {min_side}")
        self.min_aspect = min_aspect
        self.max_aspect = max_aspect
        self.min_side = min_side

    def decide(self, row: Row) -> Decision:
        if DECODED in row:
            decoded, error = row[DECODED], row.get(DECODE_ERROR, "")
        else:
            decoded, error = decode_image(row.get("image"))
        if decoded is None:
            return reject(UNDECODABLE, f"image bytes do not decode: {error or 'unknown error'}")
        width, height = _original_size(row, decoded)
        if min(width, height) < self.min_side:
            return reject(TOO_SMALL, f"original size {width}x{height}, smaller side < {self.min_side}")
        aspect = width / height
        if not self.min_aspect <= aspect <= self.max_aspect:
            return reject(
                ASPECT_RATIO,
                f"original aspect ratio {aspect:.3g} ({width}x{height}) outside "
                f"[{self.min_aspect:.3g}, {self.max_aspect:.3g}]",
            )
        return KEEP
