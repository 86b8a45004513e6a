"""Row filters: every reason code, its detail, the order of checks and the counting."""

from __future__ import annotations

import io

import pytest
from PIL import Image

from dalle_lightning.stages.filters import (
    DEFAULT_BOILERPLATE_PATTERNS,
    KEEP,
    CaptionFilter,
    Decision,
    FilterChain,
    ImageFilter,
    RowFilter,
    decode_image,
    reject,
)


def jpeg(width: int = 64, height: int = 64) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (200, 30, 30)).save(buffer, format="JPEG")
    return buffer.getvalue()


def image_row(width: int = 640, height: int = 480, data: bytes | None = None) -> dict:
    return {"image": jpeg() if data is None else data, "original_width": width, "original_height": height}


@pytest.fixture
def captions() -> CaptionFilter:
    return CaptionFilter(min_len=5, max_len=40)


@pytest.mark.parametrize(
    ("caption", "reason"),
    [
        (None, "caption_empty"),
        ("", "caption_empty"),
        ("   \n\t", "caption_empty"),
        ("  cat ", "caption_too_short"),
        ("a" * 41, "caption_too_long"),
        ("  " + "a" * 40 + "  ", None),
        ("Image", "caption_boilerplate"),
        ("IMG_2031", "caption_boilerplate"),
        ("img1234 at the beach", "caption_boilerplate"),
        ("Untitled document", "caption_boilerplate"),
        ("holiday-beach.JPG", "caption_boilerplate"),
        ("dog on grass stock photo", "caption_boilerplate"),
        ("Click here to enlarge", "caption_boilerplate"),
        ("No description available", "caption_boilerplate"),
        ("2019 -- 04", "caption_boilerplate"),
        ("a red circle above a blue square", None),
        ("an image of a dog", None),
    ],
)
def test_caption_reasons(captions: CaptionFilter, caption: str | None, reason: str | None) -> None:
    assert captions({"caption": caption}).reason == reason


def test_caption_details_name_the_values(captions: CaptionFilter) -> None:
    assert captions({"caption": "cat"}).detail == "caption has 3 characters after strip, minimum is 5"
    assert "41 characters after strip, maximum is 40" in captions({"caption": "b" * 41}).detail
    detail = captions({"caption": "a stock photo"}).detail
    assert "'a stock photo'" in detail and "stock (photo" in detail


def test_caption_filter_rejects_bad_settings() -> None:
    with pytest.raises(ValueError, match="min_len"):
        CaptionFilter(min_len=0, max_len=10)
    with pytest.raises(ValueError, match="max_len"):
        CaptionFilter(min_len=10, max_len=5)
    with pytest.raises(ValueError, match=r"boilerplate_patterns: invalid regular expression '\('"):
        CaptionFilter(5, 10, ["("])
    assert CaptionFilter(5, 10, ()).decide({"caption": "image"}) == KEEP
    assert "^untitled" in DEFAULT_BOILERPLATE_PATTERNS


@pytest.mark.parametrize(
    ("row", "reason"),
    [
        (image_row(640, 480), None),
        (image_row(1000, 500), None),  # exactly 2
        (image_row(500, 1000), None),  # exactly 1/2
        (image_row(1001, 500), "aspect_ratio"),
        (image_row(100, 300), "aspect_ratio"),
        (image_row(31, 40), "too_small"),
        (image_row(20, 200), "too_small"),  # too small is checked before the aspect ratio
        (image_row(data=b"not an image"), "undecodable"),
        (image_row(data=jpeg()[:200]), "undecodable"),  # truncated
        (image_row(data=b""), "undecodable"),
    ],
)
def test_image_reasons(row: dict, reason: str | None) -> None:
    assert ImageFilter(min_aspect=0.5, max_aspect=2.0, min_side=32)(row).reason == reason


def test_image_details_and_size_fallbacks() -> None:
    images = ImageFilter()
    assert images(image_row(300, 100)).detail == "original aspect ratio 3 (300x100) outside [0.5, 2]"
    assert images(image_row(20, 20)).detail == "original size 20x20, smaller side < 32"
    assert images(image_row(data=b"xx")).detail.startswith(
        "image bytes do not decode: UnidentifiedImageError"
    )
    # no original size recorded: the stored size, then the decoded size (64x64 here) is used
    assert images({"image": jpeg(), "width": 300, "height": 100}).reason == "aspect_ratio"
    assert images({"image": jpeg(20, 20)}).reason == "too_small"
    assert images({"image": jpeg()}).keep


def test_image_filter_uses_an_already_decoded_image() -> None:
    images = ImageFilter()
    decoded, error = decode_image(b"garbage")
    assert decoded is None and error
    row = {"image": jpeg(), "decoded": None, "decode_error": "broken on purpose"}
    assert images(row).detail == "image bytes do not decode: broken on purpose"
    with pytest.raises(ValueError, match="min_side"):
        ImageFilter(min_side=0)
    with pytest.raises(ValueError, match="min_aspect"):
        ImageFilter(min_aspect=3, max_aspect=2)


def test_chain_first_rejection_wins_and_counts() -> None:
    chain = FilterChain([ImageFilter(), CaptionFilter(5, 100)])
    rows = [
        {**image_row(), "caption": "a dog on a sofa"},
        {**image_row(), "caption": "dog"},
        {**image_row(data=b"x"), "caption": "dog"},  # undecodable and too short: the image filter runs first
        {**image_row(10, 10), "caption": "a dog on a sofa"},
    ]
    decisions = chain.apply(rows)
    assert [d.reason for d in decisions] == [None, "caption_too_short", "undecodable", "too_small"]
    assert dict(chain.counts) == {"kept": 1, "caption_too_short": 1, "undecodable": 1, "too_small": 1}
    image_filter, caption_filter = chain.filters
    assert dict(image_filter.counts) == {"kept": 2, "undecodable": 1, "too_small": 1}
    assert dict(caption_filter.counts) == {"kept": 1, "caption_too_short": 1}
    assert set(chain.reasons) == {
        "undecodable",
        "too_small",
        "aspect_ratio",
        "caption_empty",
        "caption_too_short",
        "caption_too_long",
        "caption_boilerplate",
    }


def test_decision_and_base_class() -> None:
    assert KEEP.keep and Decision().keep
    assert not reject("x", "because").keep
    with pytest.raises(ValueError, match="reason code"):
        reject("", "no code")

    class Sloppy(RowFilter):
        reasons = ("declared",)

        def decide(self, row):
            return reject("undeclared", "oops")

    with pytest.raises(AssertionError, match="undeclared"):
        Sloppy()({})
