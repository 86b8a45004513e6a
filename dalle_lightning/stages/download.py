"""The ``download`` stage: one ``sources`` shard in, one ``downloaded`` shard out, by img2dataset.

:func:`download_shard` runs img2dataset's own ``Downloader`` (urllib fetches
on its thread pool, ``X-Robots-Tag`` opt-outs, retries, sha256 of the bytes
as downloaded) and ``Resizer`` (OpenCV decode, resize, re-encode) in this
process — no process pool, since it runs as one task inside a (daemonic)
Dask worker. img2dataset's scratch files (the Arrow shard it reads and
deletes, its ``<shard>_stats.json``) live in a local temporary folder; its
samples are collected in memory, put back in input order and written as one
``downloaded`` Parquet file with an atomic rename.

Every input row gives exactly one output row: ``status`` is img2dataset's
(``success``, ``failed_to_download``, ``failed_to_resize``) and
``error_message`` its message for failures, e.g. ``HTTP Error 404: Not
Found``, ``timed out``, ``Use of image disallowed by X-Robots-Tag
directive``, ``Image decoding error``. Size and aspect filters are the filter
stage's job (with reasons), so the resizer here drops nothing by default.

Before img2dataset sees them, rows whose URL is not an absolute http(s) URL
with a host fail as ``failed_to_download`` without a request
(:func:`url_problem`: urllib would open ``file://``, ``ftp://`` and ``data:``
URLs too). Its resizer gets the bytes through :class:`_GuardedResizer`, which
fails an empty body and an image whose header declares more than
``max_image_area`` pixels before anything decodes it, turns EXIF-rotated
images upright and scales 16-bit images to 8 bits.
Source columns other than url and caption are not carried: the
``downloaded`` schema is fixed; join on ``key``/``url`` to get them back.
"""

from __future__ import annotations

import functools
import io
import json
import os
import tempfile
import warnings
from collections import Counter
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import numpy as np
import pyarrow as pa
from PIL import Image, ImageOps

import data_schemas.downloaded as downloaded_schema
import data_schemas.sources as sources_schema
from dalle_lightning.datasets.fingerprint import fingerprint
from dalle_lightning.datasets.parquet_io import WrittenFile, read_parquet, write_parquet_atomic

STAGE = "download"
STAGE_VERSION = 1
RESIZE_MODES = ("no", "keep_ratio", "keep_ratio_largest", "center_crop", "border")
ENCODE_FORMATS = ("jpg", "png", "webp")
HASH = "sha256"
_ROW_COL = "_dalle_row"  # input row index, carried through img2dataset's per-sample meta
_I2D_SHARD_ID = 0  # img2dataset's integer shard id in the scratch folder (our ids are hex strings)
URL_SCHEMES = ("http", "https")
"""The only URL schemes fetched; any other row fails with its reason and no request is made."""
DEFAULT_MAX_IMAGE_AREA = 89_478_485.0
"""PIL's decompression-bomb threshold (``Image.MAX_IMAGE_PIXELS``): about 9,459² pixels."""
_EXIF_ORIENTATION = 0x0112
_DEEP_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N")  # PIL modes of 16-bit (or wider) grey images


@dataclass(frozen=True)
class DownloadConfig:
    """Settings of the download stage; they are part of its shard fingerprint."""

    image_size: int = 64
    """Target size in pixels, as img2dataset's ``image_size`` (its meaning depends on ``resize_mode``)."""
    resize_mode: str = "keep_ratio"
    """img2dataset's resize mode: ``keep_ratio`` (smaller side = image_size), ``center_crop`` (then crop
    to a square), ``border`` (larger side = image_size, padded white to a square), ``keep_ratio_largest``
    (larger side = image_size) or ``no``."""
    resize_only_if_bigger: bool = False
    """Only downscale: images already smaller than ``image_size`` are kept at their size."""
    encode_format: str = "jpg"
    """Format of the stored image bytes: ``jpg``, ``png`` or ``webp``."""
    encode_quality: int = 95
    """Quality 0–100 for jpg/webp; for png the compression level 0–9."""
    thread_count: int = 16
    """Download threads per shard (img2dataset's thread pool)."""
    timeout: float = 10.0
    """Seconds a connection or read may wait before the URL fails with ``timed out``."""
    retries: int = 0
    """Extra attempts for a URL that failed to download."""
    user_agent_token: str | None = "dalle-lightning"
    """Token added to the User-Agent and matched against ``X-Robots-Tag: <token>: ...`` directives."""
    disallowed_header_directives: tuple[str, ...] = ("noai", "noimageai", "noindex", "noimageindex")
    """``X-Robots-Tag`` directives that make a URL fail (the publisher's opt-out); empty to honour none."""
    min_image_size: int = 0
    """Smallest side below which the resizer drops an image; keep 0 and let the filter stage decide."""
    max_image_area: float = DEFAULT_MAX_IMAGE_AREA
    """Pixels above which an image fails as ``image area too large``. Checked on the size its header
    declares, before anything decodes it, so it bounds decode memory (a decompression bomb of a few
    kilobytes can declare 20,000 × 20,000 pixels); ``float("inf")`` turns the cap off."""

    max_bytes: int = 32 * 2**20
    """Largest response body accepted: a longer one (by its ``Content-Length``, or as it arrives) fails
    the row as ``failed_to_download`` with ``response body over max_bytes`` and is not kept in memory."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "disallowed_header_directives", tuple(self.disallowed_header_directives))
        _check(self.image_size >= 1, "image_size", self.image_size, "an integer >= 1")
        _check(self.resize_mode in RESIZE_MODES, "resize_mode", self.resize_mode, f"one of {RESIZE_MODES}")
        _check(
            self.encode_format in ENCODE_FORMATS,
            "encode_format",
            self.encode_format,
            f"one of {ENCODE_FORMATS}",
        )
        top = 9 if self.encode_format == "png" else 100
        _check(
            0 <= self.encode_quality <= top,
            "encode_quality",
            self.encode_quality,
            f"0..{top} for {self.encode_format}",
        )
        _check(self.thread_count >= 1, "thread_count", self.thread_count, "an integer >= 1")
        _check(self.timeout > 0, "timeout", self.timeout, "seconds > 0")
        _check(self.retries >= 0, "retries", self.retries, "an integer >= 0")
        token = self.user_agent_token
        _check(token is None or token.strip() != "", "user_agent_token", token, "a non-empty string or None")
        directives = self.disallowed_header_directives
        ok = all(isinstance(d, str) and d.strip() for d in directives)
        _check(ok, "disallowed_header_directives", directives, "non-empty strings")
        _check(self.min_image_size >= 0, "min_image_size", self.min_image_size, "an integer >= 0")
        _check(self.max_image_area > 0, "max_image_area", self.max_image_area, "a number of pixels > 0")
        _check(self.max_bytes >= 1, "max_bytes", self.max_bytes, "an integer >= 1")


def _check(ok: bool, name: str, value: Any, expected: str) -> None:
    if not ok:
        raise ValueError(f"DownloadConfig.{name} must be {expected}, got {value!r}")


@dataclass(frozen=True)
class DownloadResult:
    """What :func:`download_shard` wrote and how it went."""

    written: WrittenFile
    """The ``downloaded`` Parquet file (path, rows, bytes, sha256)."""
    stats: dict[str, Any]
    """img2dataset's shard stats (count, successes, failed_to_download, failed_to_resize, duration,
    start_time, end_time, status_dict) plus ``status_counts`` and ``error_counts`` of the output rows."""


def shard_fingerprint(input_fingerprint: str, config: DownloadConfig) -> str:
    """Fingerprint of a download shard: hash(input shard fingerprint, config, stage version)."""
    return fingerprint(STAGE, STAGE_VERSION, input_fingerprint, config)


class _CollectingWriter:
    """An img2dataset sample writer that appends ``(image bytes, meta)`` to ``sink`` instead of a file.

    img2dataset builds it as ``writer_class(shard_id, output_folder, save_caption, oom_shard_count,
    schema, encode_format)``; bind ``sink`` first with :func:`functools.partial`.
    """

    def __init__(self, sink: list[tuple[bytes | None, dict[str, Any]]], *_img2dataset_args: Any) -> None:
        self.sink = sink

    def write(self, img_str: bytes | None, key: str, caption: str | None, meta: dict[str, Any]) -> None:
        self.sink.append((img_str, dict(meta)))

    def close(self) -> None:
        pass


def _read_source(path: str) -> pa.Table:
    table = read_parquet(path)
    sources_schema.validate(table)
    return table


def url_problem(url: str | None) -> str | None:
    """Why ``url`` is not fetched, or None for an absolute http(s) URL with a host.

    The message names the problem, never the URL itself (it may carry a token).
    """
    if url is None or not url.strip():
        return "URL is empty"
    try:
        parts = urlsplit(url.strip())
        parts.port  # noqa: B018 - raises ValueError for a port that is not a number in 0..65535
    except ValueError as err:
        return f"unparsable URL: {err}"
    if not parts.scheme:
        return "URL has no scheme; only http:// and https:// URLs are downloaded"
    if parts.scheme.lower() not in URL_SCHEMES:
        return f"URL scheme {parts.scheme.lower()!r} is not allowed; only http and https URLs are downloaded"
    if not parts.hostname:
        return "URL has no host"
    return None


def _failed_resize(message: str) -> tuple[None, None, None, None, None, str]:
    """A failure in the shape img2dataset's Resizer returns: (image, w, h, original w, original h, error)."""
    return None, None, None, None, None, message


class _GuardedResizer:
    """img2dataset's ``Resizer`` behind the checks it lacks, made on the downloaded bytes.

    OpenCV decodes what it is given: an empty body fails with an assertion
    message, a decompression bomb is decoded in full before img2dataset's
    ``max_image_area`` check, EXIF orientation is ignored (``IMREAD_UNCHANGED``)
    and 16-bit pixels saturate to white when encoded as 8-bit JPEG. So: an empty
    body fails as ``empty response body (0 bytes)``; an image whose header
    declares more than ``max_image_area`` pixels fails as ``image area too
    large`` undecoded; an EXIF-rotated or 16-bit image is handed on as an
    upright 8-bit PNG. Everything else goes to the resizer untouched. The
    downloader hashes the original stream afterwards, so ``sha256`` is always
    that of the bytes as downloaded.
    """

    def __init__(self, resizer: Any, max_image_area: float) -> None:
        self.resizer = resizer
        self.max_image_area = max_image_area

    def __call__(self, img_stream: io.BytesIO, blurring_bbox_list: Any = None) -> tuple:
        data = img_stream.getvalue()
        if not data:
            return _failed_resize("empty response body (0 bytes)")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                image = Image.open(io.BytesIO(data))  # reads the header only
        except Image.DecompressionBombError as err:
            return _failed_resize(f"image area too large ({err})")
        except Exception:  # PIL cannot read it: OpenCV may, or says why not
            return self.resizer(img_stream, blurring_bbox_list)
        width, height = image.size
        if width * height > self.max_image_area:
            return _failed_resize(
                f"image area too large ({width}x{height} = {width * height} pixels, "
                f"max_image_area is {self.max_image_area:.0f})"
            )
        upright = _upright_8bit(image, data)
        stream = img_stream if upright is None else io.BytesIO(upright)
        return self.resizer(stream, blurring_bbox_list)


def _upright_8bit(image: Image.Image, data: bytes) -> bytes | None:
    """PNG bytes of ``image`` turned upright by its EXIF orientation and scaled to 8 bits per channel, or
    None when it needs neither (or PIL cannot decode it; OpenCV then reports the error)."""
    png_16bit = image.format == "PNG" and len(data) > 24 and data[24] == 16  # IHDR bit depth
    if not (_orientation(image) != 1 or png_16bit or image.mode.startswith("I;16")):
        return None
    try:
        image = ImageOps.exif_transpose(image)
        if image.mode in _DEEP_MODES:
            pixels = np.asarray(image, dtype=np.float64)
            if image.mode != "I" or png_16bit:
                pixels = pixels / 257.0
            image = Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8))
        elif image.mode not in ("1", "L", "LA", "P", "RGB", "RGBA"):
            image = image.convert("RGB")  # CMYK, YCbCr, … have no PNG form
        buffer = io.BytesIO()
        image.save(buffer, format="PNG", compress_level=1)
    except Exception:  # a damaged image: let OpenCV fail on the original bytes
        return None
    return buffer.getvalue()


def _orientation(image: Image.Image) -> int:
    """The EXIF orientation (1 = upright) read from the header, without decoding the pixels.

    ``Image.getexif`` would decode a PNG to look for an ``eXIf`` chunk after its image data.
    """
    try:
        if image.format == "TIFF":
            exif = image.getexif()
        elif "exif" in image.info:
            exif = Image.Exif()
            exif.load(image.info["exif"])
        else:
            return 1
        return int(exif.get(_EXIF_ORIENTATION, 1) or 1)
    except Exception:  # an unreadable EXIF block: treat the image as stored
        return 1


def _write_scratch_shard(source: pa.Table, folder: str, rows: list[int]) -> str:
    """The Arrow IPC file img2dataset's Downloader reads (and deletes): url, caption, row index of ``rows``."""
    index = pa.array(rows, pa.int64())
    table = pa.table(
        {
            "url": source.column("url").cast(pa.string()).take(index),
            "caption": source.column("caption").cast(pa.string()).take(index),
            _ROW_COL: index,
        }
    )
    path = os.path.join(folder, "shard.feather")
    with pa.OSFile(path, "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)
    return path


_BODY_CAP = {
    "bytes": DownloadConfig.max_bytes
}  # the running shard's max_bytes (Dask workers run one task each)


def _capped_download_image(
    row: tuple, timeout: float, user_agent_token: str | None, disallowed_header_directives: list | None
) -> tuple:
    """img2dataset's ``download_image`` (same arguments and result) reading at most ``_BODY_CAP`` bytes."""
    import http.client
    import urllib.request

    from img2dataset.downloader import is_disallowed

    key, url = row
    cap = _BODY_CAP["bytes"]
    agent = "Mozilla/5.0 (X11; Ubuntu; Linux x86_64; rv:72.0) Gecko/20100101 Firefox/72.0"
    if user_agent_token:
        agent += f" (compatible; {user_agent_token}; +https://github.com/rom1504/img2dataset)"
    try:
        request = urllib.request.Request(url, data=None, headers={"User-Agent": agent})
        with urllib.request.urlopen(request, timeout=timeout) as response:
            if disallowed_header_directives and is_disallowed(
                response.headers, user_agent_token, disallowed_header_directives
            ):
                return key, None, "Use of image disallowed by X-Robots-Tag directive"
            declared = response.headers.get("Content-Length")
            if declared and declared.isdigit() and int(declared) > cap:
                return (
                    key,
                    None,
                    f"response body over max_bytes ({declared} > {cap} bytes, by Content-Length)",
                )
            body = response.read(cap + 1)
        if declared and declared.isdigit() and len(body) < int(declared):  # read(n) returns what came
            raise http.client.IncompleteRead(body, int(declared) - len(body))
        if len(body) > cap:
            return key, None, f"response body over max_bytes (more than {cap} bytes)"
        return key, io.BytesIO(body), None
    except Exception as err:  # a failed URL is a row status, as in img2dataset
        return key, None, str(err)


def _make_downloader(config: DownloadConfig, scratch: str, sink: list, rows: int) -> Any:
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # albumentations would query PyPI on import
    import img2dataset.downloader
    from img2dataset.downloader import Downloader
    from img2dataset.resizer import Resizer

    # img2dataset reads whole bodies; its retry loop calls this module global, so the cap goes in there
    img2dataset.downloader.download_image = _capped_download_image
    _BODY_CAP["bytes"] = config.max_bytes

    resizer = Resizer(
        image_size=config.image_size,
        resize_mode=config.resize_mode,
        resize_only_if_bigger=config.resize_only_if_bigger,
        encode_quality=config.encode_quality,
        encode_format=config.encode_format,
        min_image_size=config.min_image_size,
        max_image_area=config.max_image_area,
    )
    return Downloader(
        sample_writer_class=functools.partial(_CollectingWriter, sink),
        resizer=_GuardedResizer(resizer, config.max_image_area),
        thread_count=min(config.thread_count, max(rows, 1)),
        save_caption=True,
        extract_exif=False,
        output_folder=scratch,
        column_list=["url", "caption", _ROW_COL],
        timeout=config.timeout,
        number_sample_per_shard=max(rows, 1),
        oom_shard_count=1,
        compute_hash=HASH,
        verify_hash_type=None,
        encode_format=config.encode_format,
        retries=config.retries,
        user_agent_token=config.user_agent_token,
        disallowed_header_directives=list(config.disallowed_header_directives) or None,
    )


def _run_img2dataset(source: pa.Table, config: DownloadConfig) -> tuple[list, dict[str, Any]]:
    """Run img2dataset's Downloader on the fetchable rows of ``source``; returns the samples of every row
    (the refused ones as ``failed_to_download``) and img2dataset's shard stats counting them too."""
    samples: list[tuple[bytes | None, dict[str, Any]]] = []
    problems = {i: url_problem(url) for i, url in enumerate(source.column("url").to_pylist())}
    fetch = [i for i, problem in problems.items() if problem is None]
    with tempfile.TemporaryDirectory(prefix="dalle-download-") as scratch:
        shard_file = _write_scratch_shard(source, scratch, fetch)
        downloader = _make_downloader(config, scratch, samples, len(fetch))
        # download_shard, not __call__: __call__ prints and swallows a failing shard's exception
        downloader.download_shard((_I2D_SHARD_ID, shard_file))
        with open(os.path.join(scratch, f"{_I2D_SHARD_ID}_stats.json")) as f:
            stats = json.load(f)
    captions = source.column("caption").to_pylist()
    for i, problem in problems.items():
        if problem is None:
            continue
        meta = dict.fromkeys(("width", "height", "original_width", "original_height", HASH))
        meta.update(url=source.column("url")[i].as_py(), caption=captions[i], status="failed_to_download")
        meta.update({"error_message": problem, _ROW_COL: i})
        samples.append((None, meta))
        stats["count"] += 1
        stats["failed_to_download"] += 1
        stats["status_dict"][problem] = stats["status_dict"].get(problem, 0) + 1
    return samples, stats


def _to_downloaded(samples: list, rows: int, shard_id: str) -> pa.Table:
    """img2dataset's samples as a ``downloaded`` table: one row per input row, in input order."""
    by_row: dict[int, tuple[bytes | None, dict[str, Any]]] = {}
    for image, meta in samples:
        row = meta[_ROW_COL]
        if row in by_row:
            raise RuntimeError(f"img2dataset wrote input row {row} of shard {shard_id} twice")
        by_row[row] = (image, meta)
    missing = sorted(set(range(rows)) - by_row.keys())
    if missing:
        raise RuntimeError(
            f"img2dataset wrote no row for {len(missing)} of {rows} input row(s) of shard {shard_id} "
            f"(first: {missing[:5]}); its traceback was printed above"
        )
    ordered = [by_row[i] for i in range(rows)]
    columns: dict[str, list] = {
        "key": [f"{shard_id}-{i:06d}" for i in range(rows)],
        "image": [image for image, _ in ordered],
        "sha256": [meta[HASH] for _, meta in ordered],
    }
    for name in (
        "url",
        "caption",
        "width",
        "height",
        "original_width",
        "original_height",
        "status",
        "error_message",
    ):
        columns[name] = [meta[name] for _, meta in ordered]
    schema = downloaded_schema.SCHEMA
    return pa.table({f.name: pa.array(columns[f.name], f.type) for f in schema}, schema=schema)


def _shard_stats(i2d_stats: dict[str, Any], table: pa.Table, shard_id: str) -> dict[str, Any]:
    """img2dataset's stats checked against the output, plus counts by status and by error message."""
    statuses = Counter(table.column("status").to_pylist())
    errors = Counter(m for m in table.column("error_message").to_pylist() if m is not None)
    failed = i2d_stats["failed_to_download"] + i2d_stats["failed_to_resize"]
    if i2d_stats["count"] != table.num_rows or i2d_stats["successes"] + failed != table.num_rows:
        raise RuntimeError(
            f"shard {shard_id}: img2dataset counted {i2d_stats['count']} rows, {i2d_stats['successes']} "
            f"downloaded + {failed} failed, but the shard has {table.num_rows} rows"
        )
    return {**i2d_stats, "status_counts": dict(statuses), "error_counts": dict(errors)}


def download_shard(
    source_path: str, output_path: str, config: DownloadConfig, *, shard_id: str
) -> DownloadResult:
    """Download the URLs of the ``sources`` shard at ``source_path`` into a ``downloaded`` shard at ``output_path``.

    Both paths may be any fsspec URL. Output rows follow input order, keyed
    ``f"{shard_id}-{row:06d}"``, one per input row whatever happened to it.
    The file is written atomically; a failing shard raises and writes nothing.
    """
    if not shard_id:
        raise ValueError("shard_id must be a non-empty string")
    source = _read_source(source_path)
    samples, i2d_stats = _run_img2dataset(source, config)
    table = _to_downloaded(samples, source.num_rows, shard_id)
    stats = _shard_stats(i2d_stats, table, shard_id)
    written = write_parquet_atomic(table, output_path, downloaded_schema)
    return DownloadResult(written=written, stats=stats)
