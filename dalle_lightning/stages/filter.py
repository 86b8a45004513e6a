"""The filter stage: the paper's caption and image rules, then exact and perceptual deduplication.

Three steps, so that the per-shard work is parallel and cacheable and the
global step reads only small columns (DESIGN.md "Datasets and shards"):

1. :func:`score_shard` (per download shard): apply the row filters
   (:mod:`~dalle_lightning.stages.filters`), hash every decodable image
   (:mod:`~dalle_lightning.stages.phash`) and write a small ``image_hashes``
   table: key, ordinal, row, sha256, phash, rule_reason, rule_detail.
2. :func:`find_duplicates` (global, a Dask dataframe step over every shard's
   hashes of the rows that passed the rules): which rows are exact or near
   duplicates of an earlier row.
3. :func:`apply_filter` (per shard): join both decisions and write the kept
   rows (``filtered``) and the rejected ones with their reason (``rejects``).

"Earlier" is the order (shard ordinal, row in shard, key): a shard's ordinal is
its position in the source list, so rows that were in the dataset first win
over rows appended later, and the result depends neither on the order shards
are listed in nor on how Dask partitions the work.
"""

from __future__ import annotations

from dataclasses import dataclass

import dask
import dask.dataframe as dd
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

import data_schemas.downloaded as downloaded_schema
import data_schemas.filtered as filtered_schema
import data_schemas.image_hashes as hashes_schema
import data_schemas.rejects as rejects_schema
from dalle_lightning.datasets.fingerprint import table_fingerprint
from dalle_lightning.datasets.parquet_io import WrittenFile, read_parquet, write_parquet_atomic
from dalle_lightning.stages.filters.base import KEPT, FilterChain
from dalle_lightning.stages.filters.caption import DEFAULT_BOILERPLATE_PATTERNS, CaptionFilter, caption_length
from dalle_lightning.stages.filters.image import DECODE_ERROR, DECODED, ImageFilter, decode_image
from dalle_lightning.stages.phash import HASH_BITS, hamming_matrix, phash

STAGE = "filter"
STAGE_VERSION = 1
EXACT_DUPLICATE = "exact_duplicate"
NEAR_DUPLICATE = "near_duplicate"
PASSED = "passed"
"""Count key of :func:`score_shard` for rows that passed every row filter."""
DUPLICATES_SCHEMA = pa.schema(
    [
        pa.field("key", pa.string(), nullable=False),
        pa.field("reject_reason", pa.string(), nullable=False),
        pa.field("reject_detail", pa.string()),
    ]
)
_ROW_COLUMNS = ["key", "caption", "image", "width", "height", "original_width", "original_height", "sha256"]
_MAX_ORDINAL = 2**31 - 1
_STR = pd.StringDtype("pyarrow")
_CHUNK = 1024  # rows of a Hamming-distance block, bounds memory to _CHUNK × group size bytes


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
    """Drop images whose perceptual hash is within ``phash_threshold`` bits of an earlier image's."""
    phash_threshold: int = 6
    """Largest Hamming distance (bits of 64) counted as a near duplicate; 0 … 16.

    At 6, 99.6% of edited copies (JPEG quality 60–75, 90–110% resizes, blur)
    are caught, and 19 of 719,400 pairs of different images fall within it
    (evidence in ``tests/dalle_lightning/stages/test_phash.py``)."""

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
    reasons, details, hashes = [], [], []
    for row in table.to_pylist():
        decoded, error = decode_image(row["image"])
        decision = chain({**row, DECODED: decoded, DECODE_ERROR: error})
        reasons.append(decision.reason)
        details.append(decision.detail or None)
        hashes.append(None if decoded is None else phash(decoded))
    out = pa.table(
        {
            "key": keys,
            "ordinal": pa.array(np.full(len(rows), ordinal, dtype=np.int32)),
            "row": pa.array(rows),
            "sha256": table.column("sha256"),
            "phash": pa.array(hashes, type=pa.uint64()),
            "rule_reason": pa.array(reasons, type=pa.string()),
            "rule_detail": pa.array(details, type=pa.string()),
        }
    )
    written = write_parquet_atomic(out, hashes_path, hashes_schema)
    counts = {(PASSED if reason == KEPT else reason): n for reason, n in sorted(chain.counts.items())}
    return written, counts


# ---------------------------------------------------------------- 2. global: duplicates on Dask

_BASE_META = pd.DataFrame(
    {
        "key": pd.Series([], dtype=_STR),
        "order": pd.Series([], dtype=np.int64),
        "sha256": pd.Series([], dtype=_STR),
        "phash": pd.Series([], dtype=np.uint64),
    }
)
_REJECT_META = pd.DataFrame({name: pd.Series([], dtype=_STR) for name in DUPLICATES_SCHEMA.names})
_NEAR_META = pd.DataFrame(
    {
        "key": pd.Series([], dtype=_STR),
        "near_order": pd.Series([], dtype=np.int64),
        "near_key": pd.Series([], dtype=_STR),
        "distance": pd.Series([], dtype=np.int64),
    }
)


def _load_passed(path: str) -> pd.DataFrame:
    """The rows of one ``image_hashes`` file that passed the rules: key, order, sha256, phash."""
    table = read_parquet(path, columns=["key", "ordinal", "row", "sha256", "phash", "rule_reason"])
    table = table.filter(pc.is_null(table.column("rule_reason")))
    ordinal = table.column("ordinal").to_numpy().astype(np.int64)
    order = (ordinal << 31) + table.column("row").to_numpy().astype(np.int64)
    return pd.DataFrame(
        {
            "key": pd.Series(table.column("key").to_pylist(), dtype=_STR),
            "order": order,
            "sha256": pd.Series(table.column("sha256").to_pylist(), dtype=_STR),
            "phash": pc.fill_null(table.column("phash"), 0).to_numpy().astype(np.uint64),
        }
    )


def _rejects_frame(keys: pd.Series, reason: str, details: list[str]) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "key": pd.Series(list(keys), dtype=_STR),
            "reject_reason": pd.Series([reason] * len(details), dtype=_STR),
            "reject_detail": pd.Series(details, dtype=_STR),
        }
    )


def _mark_exact(part: pd.DataFrame) -> pd.DataFrame:
    """Add ``original``: the key of the earliest row with the same sha256 (NA for that earliest row)."""
    part = part.sort_values(["sha256", "order", "key"], kind="stable")
    first = part.groupby("sha256", sort=False, dropna=True)["key"].transform("first")
    is_copy = (first.notna() & (first != part["key"])).fillna(False).astype(bool)
    return part.assign(original=first.where(is_copy))


def _exact_rejects(marked: pd.DataFrame) -> pd.DataFrame:
    copies = marked[marked["original"].notna()]
    return _rejects_frame(copies["key"], EXACT_DUPLICATE, [f"same sha256 as {k}" for k in copies["original"]])


def band_widths(threshold: int) -> list[int]:
    """Bit widths of the ``threshold + 1`` bands the 64-bit hash is cut into, most significant first.

    Pigeonhole: two hashes differing in at most ``threshold`` bits agree
    exactly on at least one of ``threshold + 1`` disjoint bands.
    """
    n = threshold + 1
    base, extra = divmod(HASH_BITS, n)
    return [base + 1] * extra + [base] * (n - extra)


def _explode_bands(part: pd.DataFrame, widths: list[int]) -> pd.DataFrame:
    """One row per (row, band): band index and the value of the hash's bits in that band."""
    hashes = part["phash"].to_numpy(dtype=np.uint64)
    frames, shift = [], HASH_BITS
    for band, width in enumerate(widths):
        shift -= width
        value = (hashes >> np.uint64(shift)) & np.uint64((1 << width) - 1)
        frames.append(part[["key", "order", "phash"]].assign(band=band, value=value.astype(np.int64)))
    return pd.concat(frames, ignore_index=True)


def _earliest_earlier(hashes: np.ndarray, threshold: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows of one band bucket (earliest first) with an earlier row within ``threshold``, and the earliest such.

    Works on distinct hash values: the earliest row within reach of a value is
    the earliest first occurrence among the values within reach (itself included).
    """
    values, first, inverse = np.unique(hashes, return_index=True, return_inverse=True)
    reach_first = np.empty(len(values), dtype=np.int64)
    for start in range(0, len(values), _CHUNK):
        near = hamming_matrix(values[start : start + _CHUNK], values) <= threshold
        reach_first[start : start + _CHUNK] = np.where(near, first[None, :], len(hashes)).min(axis=1)
    earliest = reach_first[inverse.reshape(-1)]
    later = np.flatnonzero(earliest < np.arange(len(hashes)))
    return later, earliest[later]


def _near_candidates(part: pd.DataFrame, threshold: int) -> pd.DataFrame:
    """Within each (band, value) bucket of this partition, each row's earliest earlier near row."""
    part = part.sort_values(["band", "value", "order", "key"], kind="stable")
    band, value = part["band"].to_numpy(), part["value"].to_numpy()
    starts = np.flatnonzero(np.r_[True, (band[1:] != band[:-1]) | (value[1:] != value[:-1])])
    ends = np.r_[starts[1:], len(part)]
    hashes = part["phash"].to_numpy(dtype=np.uint64)
    later, neighbour = [np.empty(0, dtype=np.int64)], [np.empty(0, dtype=np.int64)]
    shared = ends - starts > 1
    for start, end in zip(starts[shared], ends[shared], strict=True):
        found, earliest = _earliest_earlier(hashes[start:end], threshold)
        later.append(found + start)
        neighbour.append(earliest + start)
    later, neighbour = np.concatenate(later), np.concatenate(neighbour)
    keys, orders = part["key"].to_numpy(), part["order"].to_numpy()
    return pd.DataFrame(
        {
            "key": pd.Series(keys[later], dtype=_STR),
            "near_order": orders[neighbour].astype(np.int64),
            "near_key": pd.Series(keys[neighbour], dtype=_STR),
            "distance": np.bitwise_count(hashes[later] ^ hashes[neighbour]).astype(np.int64),
        }
    )


def _near_rejects(part: pd.DataFrame) -> pd.DataFrame:
    """Per key, the earliest near row over all bands (all of a key's candidates are in this partition)."""
    part = part.sort_values(["key", "near_order", "near_key"], kind="stable").drop_duplicates("key")
    details = [f"phash within {d} of {k}" for d, k in zip(part["distance"], part["near_key"], strict=True)]
    return _rejects_frame(part["key"], NEAR_DUPLICATE, details)


def _repeated_keys(part: pd.DataFrame) -> pd.DataFrame:
    return pd.DataFrame({"repeated": [int(part["key"].duplicated().sum())]})


def find_duplicates(
    hashes_paths: list[str], config: FilterConfig, npartitions: int | None = None
) -> pa.Table:
    """Rows (over all shards) that duplicate an earlier row: table of key, reject_reason, reject_detail.

    Reads only key/ordinal/row/sha256/phash of rows with no ``rule_reason``,
    as a Dask dataframe (on the current Dask scheduler or client).

    - exact (``config.exact_dedup``): rows with equal sha256; the earliest
      by (ordinal, row, key) is kept, the others are ``exact_duplicate``
      ("same sha256 as <key>").
    - perceptual (``config.phash_dedup``, on what exact dedup kept): a row
      whose phash is within ``config.phash_threshold`` bits of ANY earlier
      row's is ``near_duplicate`` ("phash within d of <earliest such key>"),
      even if that earlier row is itself a near duplicate of another one.
      Candidate pairs come from LSH banding (:func:`band_widths`), so no
      pair within the threshold is missed.

    The result is sorted by key and does not depend on the order of
    ``hashes_paths`` nor on ``npartitions`` (default: one per file). Keys
    must be unique over all shards; ``ValueError`` otherwise.
    """
    if not hashes_paths or not (config.exact_dedup or config.phash_dedup):
        return DUPLICATES_SCHEMA.empty_table()
    if npartitions is not None:
        _check_int("npartitions", npartitions, 1)
    base = dd.from_map(_load_passed, sorted(hashes_paths), meta=_BASE_META, label="image-hashes")
    if npartitions is not None:
        base = base.repartition(npartitions=npartitions)
    n = npartitions or base.npartitions
    repeated = (
        base[["key"]].shuffle("key", npartitions=n).map_partitions(_repeated_keys, meta={"repeated": "i8"})
    )
    outputs = [repeated["repeated"].sum()]
    survivors = base
    if config.exact_dedup:
        marked = base.shuffle("sha256", npartitions=n).map_partitions(
            _mark_exact, meta=_BASE_META.assign(original=pd.Series([], dtype=_STR))
        )
        outputs.append(marked.map_partitions(_exact_rejects, meta=_REJECT_META))
        survivors = marked[marked["original"].isna()]
    if config.phash_dedup:
        widths = band_widths(config.phash_threshold)
        bands = survivors.map_partitions(_explode_bands, widths, meta=_explode_bands(_BASE_META, widths))
        candidates = bands.shuffle(["band", "value"], npartitions=n).map_partitions(
            _near_candidates, config.phash_threshold, meta=_NEAR_META
        )
        outputs.append(
            candidates.shuffle("key", npartitions=n).map_partitions(_near_rejects, meta=_REJECT_META)
        )
    n_repeated, *frames = dask.compute(*outputs)
    if n_repeated:
        raise ValueError(
            f"{n_repeated} key(s) occur in more than one row of the shards that passed the rules"
        )
    result = pd.concat([_REJECT_META, *frames], ignore_index=True).sort_values("key", kind="stable")
    return pa.Table.from_pandas(result, schema=DUPLICATES_SCHEMA, preserve_index=False)


# ---------------------------------------------------------------- 3. per shard: write kept and rejects


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
