"""Row filters of the filter stage: one module per family member, each returning a reason when it drops a row."""

from dalle_lightning.stages.filters.base import KEEP, KEPT, Decision, FilterChain, RowFilter, reject
from dalle_lightning.stages.filters.caption import DEFAULT_BOILERPLATE_PATTERNS, CaptionFilter
from dalle_lightning.stages.filters.image import ImageFilter, decode_image

__all__ = [
    "DEFAULT_BOILERPLATE_PATTERNS",
    "KEEP",
    "KEPT",
    "CaptionFilter",
    "Decision",
    "FilterChain",
    "ImageFilter",
    "RowFilter",
    "decode_image",
    "reject",
]
