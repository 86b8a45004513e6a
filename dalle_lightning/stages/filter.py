"""The filter stage: the paper's caption and image rules, then exact and perceptual deduplication.

Three steps, so that the per-shard work is parallel and cacheable and the
global step reads only small columns (DESIGN.md "Datasets and shards"):

1. :func:`score_shard` (per download shard): apply the row filters
   (:mod:`~dalle_lightning.stages.filters`), hash every decodable image
   (:mod:`~dalle_lightning.stages.phash`, plus a colour thumbnail) and write a
   small ``image_hashes`` table: key, ordinal, row, sha256, phash, thumb,
   rule_reason, rule_detail.
2. :func:`~dalle_lightning.stages.dedup.find_duplicates` (global, a Dask
   dataframe step over every shard's hashes of the rows that passed the
   rules, in :mod:`~dalle_lightning.stages.dedup`): which rows are exact or
   near duplicates of an earlier row.
3. :func:`apply_filter` (per shard): join both decisions and write the kept
   rows (``filtered``) and the rejected ones with their reason (``rejects``).

"Earlier" is the order (shard ordinal, row in shard, key): a shard's ordinal is
its position in the source list, so rows that were in the dataset first win
over rows appended later, and the result depends neither on the order shards
are listed in nor on how Dask partitions the work.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

import data_schemas.downloaded as downloaded_schema
import data_schemas.filtered as filtered_schema
import data_schemas.image_hashes as hashes_schema
import data_schemas.rejects as rejects_schema
from dalle_lightning.datasets.fingerprint import table_fingerprint
from dalle_lightning.datasets.parquet_io import WrittenFile, read_parquet, write_parquet_atomic
from dalle_lightning.stages.dedup import (
    DUPLICATES_SCHEMA,
    EXACT_DUPLICATE,
    NEAR_DUPLICATE,
    find_duplicates,
    thumbnail,
)
from dalle_lightning.stages.filters.base import KEPT, FilterChain
from dalle_lightning.stages.filters.caption import DEFAULT_BOILERPLATE_PATTERNS, CaptionFilter, caption_length
from dalle_lightning.stages.filters.image import DECODE_ERROR, DECODED, ImageFilter, decode_image
from dalle_lightning.stages.phash import phash

__all__ = [
    "DUPLICATES_SCHEMA",
    "EXACT_DUPLICATE",
    "NEAR_DUPLICATE",
    "PASSED",
    "STAGE",
    "STAGE_VERSION",
    "FilterConfig",
    "apply_filter",
    "duplicates_fingerprint",
    "find_duplicates",
    "row_filters",
    "score_shard",
    "shard_duplicates",
]

STAGE = "filter"
STAGE_VERSION = 2
"""2: perceptual duplicates must also match a colour thumbnail (``image_hashes`` v2 has ``thumb``)."""
PASSED = "passed"
"""Count key of :func:`score_shard` for rows that passed every row filter."""
_ROW_COLUMNS = ["key", "caption", "image", "width", "height", "original_width", "original_height", "sha256"]
_MAX_ORDINAL = 2**31 - 1


@dataclass(frozen=True)
class FilterConfig:
    """Settings of the filter stage (paper appendix C rules plus deduplication)."""

    min_caption_len: int = 5
    """Shortest caption kept, in characters after stripping whitespace."""
    max_caption_len: int = 1000
    """Longest caption kept, in characters after stripping (≈ the paper's 256 BPE tokens)."""
    min_aspect: float = 0.5
    """Smallest original width / height kept (paper: 1/2)."""
    max_aspect: float = 2.0
    """Largest original width / height kept (paper: 2)."""
    min_original_side: int = 32
    """Smallest original side in pixels kept (drops icons and tracking pixels)."""
    boilerplate_patterns: tuple[str, ...] = DEFAULT_BOILERPLATE_PATTERNS
    """Case-insensitive regular expressions; a caption matching any is ``caption_boilerplate``."""
    exact_dedup: bool = True
    """Drop images whose original bytes (sha256) equal an earlier image's."""
    phash_dedup: bool = True
    """Drop images whose perceptual hash is within ``phash_threshold`` bits of an earlier image's
    and whose colour thumbnail matches it (``thumb_tolerance``, ``thumb_max_pixels``)."""
    phash_threshold: int = 6
    """Largest Hamming distance (bits of 64) counted as a near duplicate; 0 … 16.

    At 6, 99.6% of edited copies (JPEG quality 60–75, 90–110% resizes, blur)
    are caught, and 19 of 719,400 pairs of different images fall within it
    (evidence in ``tests/dalle_lightning/stages/test_phash.py``). On simple
    images it is only a candidate test: see ``thumb_tolerance``."""
    thumb_tolerance: int = 32
    """Largest difference (0 … 255, in any of R, G, B) at which two 16×16 thumbnail pixels still agree.

    The pHash is grayscale and coarse: on the synthetic ``shapes`` images,
    1,164 of 2,000 different images have another within 6 bits. Confirming a
    pHash match with the thumbnails (at 32 and ``thumb_max_pixels`` 1) keeps
    every JPEG q70 re-encode a duplicate while only 14 of those 2,000 images
    match another one (evidence in ``tests/dalle_lightning/stages/test_dedup.py``).
    255 turns the thumbnail check off."""
    thumb_max_pixels: int = 1
    """How many of the 256 thumbnail pixels may differ by more than ``thumb_tolerance`` (0 … 256)."""

    def __post_init__(self) -> None:
        _check_int("min_caption_len", self.min_caption_len, 1)
        _check_int("max_caption_len", self.max_caption_len, self.min_caption_len)
        if not (isinstance(self.min_aspect, (int, float)) and self.min_aspect > 0):
            raise ValueError(f"min_aspect must be a positive number, got {self.min_aspect!r}")
        if not (isinstance(self.max_aspect, (int, float)) and self.max_aspect >= self.min_aspect):
            raise ValueError(
                f"max_aspect must be a number >= min_aspect ({self.min_aspect}), got {self.max_aspect!r}"
            )
        _check_int("min_original_side", self.min_original_side, 1)
        if isinstance(self.boilerplate_patterns, str):
            raise ValueError("boilerplate_patterns must be a sequence of regular expressions, not one string")
        object.__setattr__(self, "boilerplate_patterns", tuple(self.boilerplate_patterns))
        CaptionFilter(self.min_caption_len, self.max_caption_len, self.boilerplate_patterns)  # compiles them
        for name in ("exact_dedup", "phash_dedup"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")
        _check_int("phash_threshold", self.phash_threshold, 0, 16)
        _check_int("thumb_tolerance", self.thumb_tolerance, 0, 255)
        _check_int("thumb_max_pixels", self.thumb_max_pixels, 0, 256)


def _check_int(name: str, value: object, low: int, high: int | None = None) -> None:
    if (
        not isinstance(value, int)
        or isinstance(value, bool)
        or value < low
        or (high is not None and value > high)
    ):
        expected = f"an int >= {low}" if high is None else f"an int in [{low}, {high}]"
        raise ValueError(f"{name} must be {expected}, got {value!r}")


def row_filters(config: FilterConfig) -> FilterChain:
    """The row filters of ``config`` in the order they are tried: image first, then caption."""
    return FilterChain(
        [
            ImageFilter(config.min_aspect, config.max_aspect, config.min_original_side),
            CaptionFilter(config.min_caption_len, config.max_caption_len, config.boilerplate_patterns),
        ]
    )


# ---------------------------------------------------------------- 1. per shard: rules and hashes


def _read_success(download_path: str, columns: list[str] | None = None) -> tuple[pa.Table, np.ndarray]:
    """The ``status == "success"`` rows of a download shard and their row numbers in the file."""
    table = read_parquet(download_path)
    downloaded_schema.validate(table)
    success = pc.fill_null(pc.equal(table.column("status"), "success"), False)
    rows = np.flatnonzero(success.to_numpy(zero_copy_only=False)).astype(np.int32)
    table = table.filter(success)
    return (table.select(columns) if columns else table), rows


def score_shard(
    download_path: str, hashes_path: str, config: FilterConfig, ordinal: int
) -> tuple[WrittenFile, dict[str, int]]:
    """Apply the row filters to a download shard and write its ``image_hashes`` table to ``hashes_path``.

    ``ordinal`` is the shard's position in the source list (0, 1, …; later
    shards were appended later). Returns the file written and counts by rule
    reason, plus ``"passed"`` for the rows that passed every rule.
    """
    _check_int("ordinal", ordinal, 0, _MAX_ORDINAL)
    table, rows = _read_success(download_path, _ROW_COLUMNS)
    keys = table.column("key")
    if pc.count_distinct(keys).as_py() != len(keys):
        raise ValueError(f"{download_path}: keys are not unique within the shard")
    chain = row_filters(config)
    reasons, details, hashes, thumbs = [], [], [], []
    for row in table.to_pylist():
        decoded, error = decode_image(row["image"])
        decision = chain({**row, DECODED: decoded, DECODE_ERROR: error})
        reasons.append(decision.reason)
        details.append(decision.detail or None)
        hashes.append(None if decoded is None else phash(decoded))
        thumbs.append(None if decoded is None else thumbnail(decoded))
    out = pa.table(
        {
            "key": keys,
            "ordinal": pa.array(np.full(len(rows), ordinal, dtype=np.int32)),
            "row": pa.array(rows),
            "sha256": table.column("sha256"),
            "phash": pa.array(hashes, type=pa.uint64()),
            "thumb": pa.array(thumbs, type=pa.binary()),
            "rule_reason": pa.array(reasons, type=pa.string()),
            "rule_detail": pa.array(details, type=pa.string()),
        }
    )
    written = write_parquet_atomic(out, hashes_path, hashes_schema)
    counts = {(PASSED if reason == KEPT else reason): n for reason, n in sorted(chain.counts.items())}
    return written, counts


# ---------------------------------------------------------------- 3. per shard (2 is in dedup.py): write kept and rejects


def shard_duplicates(duplicates: pa.Table, hashes_path: str) -> pa.Table:
    """The rows of ``duplicates`` whose key is in the shard of ``hashes_path``, sorted by key."""
    keys = read_parquet(hashes_path, columns=["key"]).column("key")
    mine = duplicates.filter(pc.is_in(duplicates.column("key"), value_set=keys))
    return mine.sort_by("key")


def duplicates_fingerprint(duplicates_for_shard: pa.Table) -> str:
    """A digest of one shard's duplicate decisions (row order ignored), for the caller's stage fingerprint."""
    table = duplicates_for_shard.select(DUPLICATES_SCHEMA.names).sort_by([("key", "ascending")])
    return table_fingerprint(table)


def apply_filter(
    download_path: str, hashes_path: str, duplicates: pa.Table, out_path: str, rejects_path: str
) -> tuple[WrittenFile, WrittenFile, dict[str, int]]:
    """Write the shard's kept rows (``filtered``) to ``out_path`` and the rest (``rejects``) to ``rejects_path``.

    A row is rejected for its rule reason from ``hashes_path`` or, failing
    that, for its entry in ``duplicates`` (the output of
    :func:`find_duplicates`, whole or just this shard's rows). Returns both
    files and counts ``{"kept": n, "<reason>": n, …}``.
    """
    success, _ = _read_success(download_path)
    hashes = read_parquet(hashes_path)
    hashes_schema.validate(hashes, check_metadata=True)
    if hashes.column("key").to_pylist() != success.column("key").to_pylist():
        raise ValueError(
            f"{hashes_path} does not list the successful rows of {download_path} in order; "
            "it is stale: re-run score_shard"
        )
    index = pc.index_in(success.column("key"), value_set=duplicates.column("key"))
    rule_reason = hashes.column("rule_reason")
    reason = pc.coalesce(rule_reason, pc.take(duplicates.column("reject_reason"), index))
    detail = pc.if_else(
        pc.is_null(rule_reason),
        pc.take(duplicates.column("reject_detail"), index),
        hashes.column("rule_detail"),
    )
    captions = success.column("caption").to_pylist()
    rows = success.drop_columns(["status", "error_message"]).append_column("phash", hashes.column("phash"))
    rows = rows.append_column("caption_len", pa.array([caption_length(c) for c in captions], type=pa.int32()))
    keep = pc.is_null(reason)
    kept = rows.filter(keep)
    rejected = rows.filter(pc.invert(keep))
    rejected = rejected.append_column("reject_reason", reason.filter(pc.invert(keep)))
    rejected = rejected.append_column("reject_detail", detail.filter(pc.invert(keep)))
    assert kept.num_rows + rejected.num_rows == success.num_rows, "kept + rejected != successful rows"
    kept_file = write_parquet_atomic(kept, out_path, filtered_schema)
    rejects_file = write_parquet_atomic(rejected, rejects_path, rejects_schema)
    counts = {KEPT: kept.num_rows}
    for item in pc.value_counts(rejected.column("reject_reason")).to_pylist():
        counts[item["values"]] = item["counts"]
    return kept_file, rejects_file, dict(sorted(counts.items()))
