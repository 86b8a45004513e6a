"""Caption rules: present, of a sensible length, and not boilerplate.

The DALL-E paper (Ramesh et al. 2021, appendix C) discards captions that are
too short and text that is not a description of the image; here that is a
length window in characters (after stripping whitespace) and a list of
regular expressions for captions that are file names, placeholders or
stock-photo boilerplate. Patterns are matched case-insensitively with
``re.search`` against the stripped caption.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from dalle_lightning.stages.filters.base import KEEP, Decision, Row, RowFilter, reject

CAPTION_EMPTY = "caption_empty"
CAPTION_TOO_SHORT = "caption_too_short"
CAPTION_TOO_LONG = "caption_too_long"
CAPTION_BOILERPLATE = "caption_boilerplate"

DEFAULT_BOILERPLATE_PATTERNS: tuple[str, ...] = (
    r"^(image|photo|picture|thumbnail|placeholder)s?$",
    r"^untitled",
    r"^img_?\d+",
    r"^dsc[fn]?_?\d+",
    r"\.(jpe?g|png|gif|webp|bmp|tiff?)$",
    r"stock (photo|image|picture|footage)",
    r"click here",
    r"no description",
    r"image (not found|not available|unavailable)",
    r"^[\W\d_]+$",
)
"""File names, placeholders, stock-photo and web-page boilerplate, captions with no letters."""


def compile_patterns(patterns: Sequence[str], field: str = "boilerplate_patterns") -> list[re.Pattern[str]]:
    """Compile ``patterns`` case-insensitively; ``ValueError`` naming ``field`` and the bad pattern."""
    compiled = []
    for pattern in patterns:
        if not isinstance(pattern, str):
            raise ValueError(f"{field} must hold regular expression strings, got {pattern!r}")
        try:
            compiled.append(re.compile(pattern, re.IGNORECASE))
        except re.error as error:
            raise ValueError(f"{field}: invalid regular expression {pattern!r}: {error}") from None
    return compiled


class CaptionFilter(RowFilter):
    """Reject rows whose ``caption`` is missing, too short, too long or boilerplate."""

    reasons = (CAPTION_EMPTY, CAPTION_TOO_SHORT, CAPTION_TOO_LONG, CAPTION_BOILERPLATE)

    def __init__(
        self,
        min_len: int,
        max_len: int,
        boilerplate_patterns: Sequence[str] = DEFAULT_BOILERPLATE_PATTERNS,
    ) -> None:
        super().__init__()
        if min_len < 1 or max_len < min_len:
            raise ValueError(
                f"caption length bounds must satisfy 1 <= min_len <= max_len, got {min_len}, {max_len}"
            )
        self.min_len = min_len
        self.max_len = max_len
        self.patterns = compile_patterns(boilerplate_patterns)

    def decide(self, row: Row) -> Decision:
        caption = (row.get("caption") or "").strip()
        if not caption:
            return reject(CAPTION_EMPTY, "caption is missing or blank")
        if len(caption) < self.min_len:
            return reject(
                CAPTION_TOO_SHORT,
                f"caption has {len(caption)} characters after strip, minimum is {self.min_len}",
            )
        if len(caption) > self.max_len:
            return reject(
                CAPTION_TOO_LONG,
                f"caption has {len(caption)} characters after strip, maximum is {self.max_len}",
            )
        for pattern in self.patterns:
            if pattern.search(caption):
                return reject(
                    CAPTION_BOILERPLATE, f"caption {caption[:80]!r} matches boilerplate {pattern.pattern!r}"
                )
        return KEEP


def caption_length(caption: str | None) -> int | None:
    """Length in characters of the stripped caption (what the length rules compare), None for no caption."""
    return None if caption is None else len(caption.strip())
