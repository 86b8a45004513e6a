"""Bad-input corpus, web side: one URL list of hostile URLs, responses and captions through
sources → download → filter, each row's outcome checked and every row accounted for.

The URL list is a CSV (one caption in it is not UTF-8) read by the sources stage; the download
stage runs img2dataset against :class:`~tests.reliability.conftest.HostileServer` on 127.0.0.1;
the filter stage scores, deduplicates and splits the successful rows. Each :class:`Case` says what
must happen to its row: a download status and an error message, or the filter's decision, plus
for decodable-but-odd images a check on the pixels stored.
"""

from __future__ import annotations

import csv
import io
import re
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

import data_schemas.downloaded as downloaded_schema
import data_schemas.filtered as filtered_schema
import data_schemas.rejects as rejects_schema
import data_schemas.sources as sources_schema
from dalle_lightning.datasets.parquet_io import read_parquet, write_parquet_atomic
from dalle_lightning.stages.download import DownloadConfig, download_shard
from dalle_lightning.stages.filter import FilterConfig, apply_filter, find_duplicates, score_shard
from dalle_lightning.stages.sources import plan_shards, read_url_list

sys.path.insert(0, str(Path(__file__).parent))
from hostile_web import (
    HostileServer,
    Route,
    bomb_png,
    corrupt_png,
    exif_rotated_jpeg,
    jpeg,
    png,
    texture,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

TIMEOUT = 2.0  # download timeout; the stalled route waits STALL_SECONDS (far longer)
MAX_AREA = 5_000_000  # pixel cap of this run (the default is PIL's ~89.5 Mpx)
MAX_BYTES = 2_000_000  # body size cap of this run (the default is 32 MiB)
FAILED_DL, FAILED_RESIZE, SUCCESS = "failed_to_download", "failed_to_resize", "success"
INVALID_UTF8 = b"caf\xe9 au lait on a wooden table"  # Latin-1, not UTF-8
_INVALID_MARK = "@@INVALID-UTF8@@"


@dataclass(frozen=True)
class Case:
    """One hostile input and what must become of its row."""

    name: str
    route: Route | None = None
    """Served at ``/<name>``; None when ``url`` is given instead."""
    url: str | None = None
    """A literal URL (``{file}`` is replaced by a local file's path); None to use the route."""
    caption: str | None = None
    """Default: a valid caption naming the case."""
    status: str = SUCCESS
    error: str | None = None
    """Regular expression the row's ``error_message`` must match (``re.search``)."""
    reject: str | None = None
    """For a downloaded row: the filter's ``reject_reason``, or None for kept."""
    check: Callable[[dict, Image.Image], None] | None = None
    """More checks on a successful row and its stored image."""


def _rgb(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.float64)


def _close_to(reference: Image.Image, tolerance: float) -> Callable[[dict, Image.Image], None]:
    """The stored image is ``reference`` resized (mean absolute error per channel below ``tolerance``)."""

    def check(row: dict, stored: Image.Image) -> None:
        expected = _rgb(reference.convert("RGB").resize(stored.size, Image.Resampling.BILINEAR))
        error = np.abs(_rgb(stored) - expected).mean()
        assert error < tolerance, f"mean abs error {error:.1f} vs the source image"

    return check


GRADIENT_16 = (np.arange(96 * 80, dtype=np.uint32).reshape(80, 96) * 7).astype(np.uint16)


def _sixteen_bit_scaled(row: dict, stored: Image.Image) -> None:
    # before the fix OpenCV saturated every 16-bit value to 255: a white image
    expected = Image.fromarray(np.rint(GRADIENT_16 / 257.0).astype(np.uint8)).resize(stored.size)
    error = np.abs(np.asarray(stored.convert("L"), np.float64) - np.asarray(expected, np.float64)).mean()
    assert error < 4, f"16-bit image not scaled to 8 bits: mean abs error {error:.1f}"


def _half_transparent() -> Image.Image:
    pixels = np.zeros((80, 96, 4), np.uint8)
    pixels[:, :48] = (200, 20, 20, 255)  # left: opaque red
    pixels[:, 48:] = (20, 20, 200, 0)  # right: fully transparent
    return Image.fromarray(pixels, "RGBA")


def _alpha_on_white(row: dict, stored: Image.Image) -> None:
    pixels = _rgb(stored)
    width = pixels.shape[1]
    left, right = pixels[:, : width // 3].mean((0, 1)), pixels[:, -width // 3 :].mean((0, 1))
    assert left[0] > 150 and left[2] < 80, f"opaque part not red: {left}"
    assert (right > 240).all(), f"transparent part not white: {right}"


def _upright(row: dict, stored: Image.Image) -> None:
    # stored 80x48 with red left / blue right; orientation 6 displays it 48x80, red on top
    assert (row["original_width"], row["original_height"]) == (48, 80)
    assert stored.height > stored.width
    pixels = _rgb(stored)
    top, bottom = pixels[: stored.height // 3].mean((0, 1)), pixels[-stored.height // 3 :].mean((0, 1))
    assert top[0] > top[2] + 100 and bottom[2] > bottom[0] + 100, (top, bottom)


def _one_pixel(row: dict, stored: Image.Image) -> None:
    assert (row["original_width"], row["original_height"]) == (1, 1)


def _redirect_to(target: str) -> Route:
    return Route(status=302, headers=(("Location", target),), action="redirect")


CASES: list[Case] = [
    # HTTP failures
    Case("http_404", Route(status=404), status=FAILED_DL, error=r"^HTTP Error 404: Not Found$"),
    Case("http_403", Route(status=403), status=FAILED_DL, error=r"^HTTP Error 403: Forbidden$"),
    Case("http_500", Route(status=500), status=FAILED_DL, error=r"^HTTP Error 500: Internal Server Error$"),
    Case("http_429", Route(status=429), status=FAILED_DL, error=r"^HTTP Error 429: Too Many Requests$"),
    Case("redirect_loop", Route(action="redirect_loop"), status=FAILED_DL, error=r"302.*infinite loop"),
    Case(
        "redirect_to_file_url",
        _redirect_to("file:///etc/hostname"),
        status=FAILED_DL,
        error=r"Redirection to url 'file:///etc/hostname' is not allowed",
    ),
    Case("connection_reset", Route(action="reset"), status=FAILED_DL, error=r"Connection reset by peer"),
    Case(
        "body_cut_short",
        Route(body=png(texture(seed=1)), action="cut"),
        status=FAILED_DL,
        error=r"IncompleteRead",
    ),
    Case(
        "stalled_body", Route(body=png(texture(seed=2)), action="stall"), status=FAILED_DL, error=r"timed out"
    ),
    # bodies over the size cap: refused by the declared length, or cut off as they arrive
    Case(
        "body_over_max_bytes",
        Route(body=bytes(MAX_BYTES + 1)),
        status=FAILED_DL,
        error=rf"^response body over max_bytes \({MAX_BYTES + 1} > {MAX_BYTES} bytes, by Content-Length\)$",
    ),
    Case(
        "body_over_max_bytes_unannounced",
        Route(body=bytes(2 * MAX_BYTES), action="unannounced"),
        status=FAILED_DL,
        error=rf"^response body over max_bytes \(more than {MAX_BYTES} bytes\)$",
    ),
    # bodies that are not (whole) images
    Case("zero_byte_body", Route(body=b""), status=FAILED_RESIZE, error=r"^empty response body \(0 bytes\)$"),
    Case(
        "html_instead_of_image",
        Route(body=b"<!doctype html><html><body>Sorry</body></html>", content_type="text/html"),
        status=FAILED_RESIZE,
        error=r"^Image decoding error$",
    ),
    Case(
        "truncated_jpeg",
        Route(body=jpeg(texture(seed=3))[:700], content_type="image/jpeg"),
        status=FAILED_RESIZE,
        error=r"^Image decoding error$",
    ),
    Case(
        "corrupt_png", Route(body=corrupt_png(texture(seed=4))), status=FAILED_RESIZE, error=r"decoding error"
    ),
    Case(
        "decompression_bomb",  # 20,000² pixels in ~49 kB: refused from the header, never decoded
        Route(body=bomb_png(20_000, 20_000)),
        status=FAILED_RESIZE,
        error=r"^image area too large .*400000000 pixels",
    ),
    Case(
        "over_pixel_cap",
        Route(body=bomb_png(3000, 2000)),
        status=FAILED_RESIZE,
        error=r"^image area too large \(3000x2000 = 6000000 pixels, max_image_area is 5000000\)$",
    ),
    # decodable but unusual images: stored correctly, then judged by the filter
    Case(
        "one_by_one_pixel",
        Route(body=png(Image.new("RGB", (1, 1), (250, 10, 10)))),
        reject="too_small",
        check=_one_pixel,
    ),
    Case(
        "cmyk_jpeg",
        Route(body=jpeg(texture(seed=5).convert("CMYK")), content_type="image/jpeg"),
        check=_close_to(texture(seed=5), 6),
    ),
    Case("sixteen_bit_png", Route(body=png(Image.fromarray(GRADIENT_16))), check=_sixteen_bit_scaled),
    Case(
        "palette_png",
        Route(body=png(texture(seed=6).convert("P"))),
        check=_close_to(texture(seed=6).convert("P"), 10),
    ),
    Case("alpha_png", Route(body=png(_half_transparent())), check=_alpha_on_white),
    Case(
        "exif_rotated_jpeg",
        Route(body=exif_rotated_jpeg(80, 48), content_type="image/jpeg"),
        check=_upright,
    ),
    # publishers' opt-outs (X-Robots-Tag)
    Case(
        "opt_out_noai",
        Route(body=png(texture(seed=7)), headers=(("X-Robots-Tag", "noai"),)),
        status=FAILED_DL,
        error=r"^Use of image disallowed by X-Robots-Tag directive$",
    ),
    Case(
        "opt_out_for_our_agent",
        Route(body=png(texture(seed=8)), headers=(("X-Robots-Tag", "dalle-lightning: noimageai, nofollow"),)),
        status=FAILED_DL,
        error=r"X-Robots-Tag",
    ),
    Case(
        "opt_out_for_another_agent",  # addressed to another crawler: not ours to honour
        Route(body=png(texture(seed=9)), headers=(("X-Robots-Tag", "otherbot: noai"),)),
        check=_close_to(texture(seed=9), 6),
    ),
    # URLs that must never be fetched
    Case("file_url", url="file://{file}", status=FAILED_DL, error=r"^URL scheme 'file' is not allowed"),
    Case(
        "ftp_url",
        url="ftp://127.0.0.1:21/image.png",
        status=FAILED_DL,
        error=r"^URL scheme 'ftp' is not allowed",
    ),
    Case(
        "data_url",
        url="data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAIAAACQd1PeAAAADElEQVR4nGP4z8AAAAMBAQDJ/pLvAAAAAElFTkSuQmCC",
        status=FAILED_DL,
        error=r"^URL scheme 'data' is not allowed",
    ),
    Case("unparsable_ipv6_url", url="http://[::1/image.png", status=FAILED_DL, error=r"^unparsable URL: "),
    Case(
        "url_port_out_of_range",
        url="http://127.0.0.1:99999/x.png",
        status=FAILED_DL,
        error=r"^unparsable URL: ",
    ),
    Case("url_without_scheme", url="www.example.com/cat.png", status=FAILED_DL, error=r"^URL has no scheme"),
    Case("url_without_host", url="http:///cat.png", status=FAILED_DL, error=r"^URL has no host$"),
    Case("empty_url", url="", status=FAILED_DL, error=r"^URL is empty$"),
    # captions (on good images): the filter decides
    Case("caption_empty", Route(body=png(texture(seed=10))), caption="", reject="caption_empty"),
    Case(
        "caption_10000_chars",
        Route(body=png(texture(seed=11))),
        caption="a " * 5000,
        reject="caption_too_long",
    ),
    Case(
        "caption_only_emoji",
        Route(body=png(texture(seed=12))),
        caption="🐱🐶🌈🎉🍕🚀",
        reject="caption_boilerplate",
    ),
    Case("caption_invalid_utf8", Route(body=png(texture(seed=13))), caption=_INVALID_MARK),
    # a plain good row, so that "kept" is not vacuous
    Case("good_png", Route(body=png(texture(seed=14))), check=_close_to(texture(seed=14), 6)),
]
BY_NAME = {case.name: case for case in CASES}


def _caption(case: Case) -> str:
    return (
        f"a smooth colour pattern for the {case.name.replace('_', ' ')} case"
        if case.caption is None
        else case.caption
    )


def _write_csv(path: Path, urls: list[str], captions: list[str]) -> None:
    """A CSV URL list; the ``_INVALID_MARK`` caption becomes bytes that are not UTF-8."""
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(["url", "caption"])
    writer.writerows(zip(urls, captions, strict=True))
    path.write_bytes(text.getvalue().encode().replace(_INVALID_MARK.encode(), INVALID_UTF8))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Every case through sources → download → filter once; the tables of each stage."""
    tmp = tmp_path_factory.mktemp("bad-inputs")
    local_file = tmp / "local-secret.png"
    local_file.write_bytes(png(texture(seed=99)))
    routes = {f"/{case.name}": case.route for case in CASES if case.route is not None}
    with HostileServer(routes) as server:
        urls = [
            case.url.format(file=local_file) if case.url is not None else server.url(f"/{case.name}")
            for case in CASES
        ]
        _write_csv(tmp / "urls.csv", urls, [_caption(case) for case in CASES])
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            sources = read_url_list(str(tmp / "urls.csv"))
        (shard,) = plan_shards(sources, shard_size=1000)
        source_path = str(tmp / "sources" / f"part-{shard.shard_id}.parquet")
        write_parquet_atomic(shard.table, source_path, sources_schema)
        download_path = str(tmp / "download" / f"part-{shard.shard_id}.parquet")
        config = DownloadConfig(timeout=TIMEOUT, thread_count=8, max_image_area=MAX_AREA, max_bytes=MAX_BYTES)
        result = download_shard(source_path, download_path, config, shard_id=shard.shard_id)
        hits = dict(server.hits)
    filter_config = FilterConfig()
    hashes_path = str(tmp / "hashes" / "part-0.parquet")
    _, score_counts = score_shard(download_path, hashes_path, filter_config, ordinal=0)
    duplicates = find_duplicates([hashes_path], filter_config)
    kept_path, rejects_path = (
        str(tmp / "filter" / "part-0.parquet"),
        str(tmp / "filter" / "rejects" / "part-0.parquet"),
    )
    _, _, filter_counts = apply_filter(download_path, hashes_path, duplicates, kept_path, rejects_path)
    downloaded = read_parquet(download_path)
    rows = {row["url"]: row for row in downloaded.to_pylist()}
    by_case = {case.name: rows[url] for case, url in zip(CASES, urls, strict=True)}
    return {
        "urls": urls,
        "warnings": [str(w.message) for w in caught],
        "sources": sources,
        "downloaded": downloaded,
        "by_case": by_case,
        "stats": result.stats,
        "hits": hits,
        "kept": pq.read_table(kept_path),
        "rejects": pq.read_table(rejects_path),
        "filter_counts": filter_counts,
        "score_counts": score_counts,
    }


def test_corpus_is_large_and_distinct() -> None:
    assert len(CASES) == len(BY_NAME) >= 25


@pytest.mark.parametrize("name", [c.name for c in CASES if c.status != SUCCESS])
def test_failed_row_has_status_and_reason(corpus: dict, name: str) -> None:
    case, row = BY_NAME[name], corpus["by_case"][name]
    assert row["status"] == case.status, row["error_message"]
    assert row["error_message"] is not None and re.search(case.error, row["error_message"]), row[
        "error_message"
    ]
    assert row["image"] is None and row["sha256"] is None and row["width"] is None


@pytest.mark.parametrize("name", [c.name for c in CASES if c.status == SUCCESS])
def test_odd_but_valid_input_downloads_and_is_judged(corpus: dict, name: str) -> None:
    case, row = BY_NAME[name], corpus["by_case"][name]
    assert (row["status"], row["error_message"]) == (SUCCESS, None)
    stored = Image.open(io.BytesIO(row["image"]))
    assert stored.format == "JPEG" and stored.size == (row["width"], row["height"])
    if case.check is not None:
        case.check(row, stored)
    kept = dict.fromkeys(corpus["kept"].column("key").to_pylist())
    rejects = dict(
        zip(
            corpus["rejects"].column("key").to_pylist(),
            corpus["rejects"].column("reject_reason").to_pylist(),
            strict=True,
        )
    )
    if case.reject is None:
        assert row["key"] in kept, f"rejected: {rejects.get(row['key'])}"
    else:
        assert rejects.get(row["key"]) == case.reject


def test_no_url_outside_http_is_requested(corpus: dict) -> None:
    """The refused URLs made no request; the server saw each served path at most once (no retries)."""
    for name in ("file_url", "ftp_url", "data_url", "unparsable_ipv6_url", "url_without_host"):
        assert f"/{name}" not in corpus["hits"]
    assert all(count == 1 for path, count in corpus["hits"].items() if path != "/redirect_loop")


def test_invalid_utf8_caption_is_kept_with_replacement(corpus: dict) -> None:
    row = corpus["by_case"]["caption_invalid_utf8"]
    assert (
        row["caption"]
        == INVALID_UTF8.decode("utf-8", errors="replace")
        == "caf\ufffd au lait on a wooden table"
    )
    assert any("'caption': 1 value(s) are not valid UTF-8" in w for w in corpus["warnings"])


def test_captions_survive_download_unchanged(corpus: dict) -> None:
    assert corpus["by_case"]["caption_10000_chars"]["caption"] == "a " * 5000
    assert corpus["by_case"]["caption_only_emoji"]["caption"] == "🐱🐶🌈🎉🍕🚀"
    assert corpus["by_case"]["caption_empty"]["caption"] == ""


def test_no_row_lost_at_any_stage(corpus: dict) -> None:
    """List rows = sources rows = downloaded rows (success + failed); successes = kept + rejected."""
    n = len(CASES)
    downloaded = corpus["downloaded"]
    downloaded_schema.validate(downloaded, check_metadata=True)
    assert corpus["sources"].num_rows == n and downloaded.num_rows == n
    assert sorted(downloaded.column("url").to_pylist()) == sorted(corpus["urls"])
    statuses = downloaded.column("status").to_pylist()
    expected = {
        status: sum(c.status == status for c in CASES) for status in (SUCCESS, FAILED_DL, FAILED_RESIZE)
    }
    assert corpus["stats"]["status_counts"] == expected
    stats = corpus["stats"]
    assert stats["count"] == n
    assert stats["successes"] + stats["failed_to_download"] + stats["failed_to_resize"] == n
    filtered_schema.validate(corpus["kept"], check_metadata=True)
    rejects_schema.validate(corpus["rejects"], check_metadata=True)
    kept, rejected = corpus["kept"].num_rows, corpus["rejects"].num_rows
    assert kept + rejected == statuses.count(SUCCESS) == expected[SUCCESS]
    assert kept == sum(c.status == SUCCESS and c.reject is None for c in CASES)
    assert corpus["filter_counts"]["kept"] == kept
    assert not set(corpus["kept"].column("key").to_pylist()) & set(
        corpus["rejects"].column("key").to_pylist()
    )
