"""Deduplication across every shard of the filter stage: one Dask dataframe step over ``image_hashes``.

- exact: rows with equal sha256 (of the original bytes);
- perceptual: the 64-bit grayscale pHash (:mod:`~dalle_lightning.stages.phash`)
  is within ``phash_threshold`` bits AND the 16×16 colour thumbnails agree
  (:func:`thumbs_match`).

The grayscale pHash is coarse: of 2,000 synthetic ``shapes`` images, 1,164
have a different image within 6 bits ("a small purple triangle in the
center" vs "a tiny orange circle in the center"). So pHash banding only
proposes candidate pairs and the thumbnails confirm them: a JPEG q70
re-encode passes, and only 14 of those 2,000 images pass against any other
(``tests/dalle_lightning/stages/test_dedup.py`` keeps that measurement).

"Earlier" is the order (shard ordinal, row in shard, key), see
:mod:`~dalle_lightning.stages.filter`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import dask
import dask.dataframe as dd
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
from PIL import Image

import data_schemas.image_hashes as hashes_schema
from dalle_lightning.datasets.parquet_io import read_parquet
from dalle_lightning.stages.phash import HASH_BITS, hamming_matrix
from data_schemas.image_hashes import THUMB_BYTES, THUMB_SIDE

if TYPE_CHECKING:
    from dalle_lightning.stages.filter import FilterConfig

EXACT_DUPLICATE = "exact_duplicate"
NEAR_DUPLICATE = "near_duplicate"
DUPLICATES_SCHEMA = pa.schema(
    [
        pa.field("key", pa.string(), nullable=False),
        pa.field("reject_reason", pa.string(), nullable=False),
        pa.field("reject_detail", pa.string()),
    ]
)
THUMB_PIXELS = THUMB_SIDE * THUMB_SIDE
_STR = pd.StringDtype("pyarrow")
_BYTES = pd.ArrowDtype(pa.binary())
_CHUNK = 1024  # rows of a Hamming-distance block, bounds memory to _CHUNK × bucket size bytes


# ---------------------------------------------------------------- colour thumbnails


def thumbnail(image: Image.Image) -> bytes:
    """The 16×16 RGB thumbnail (box filter) of ``image``: 768 bytes, row-major, R, G, B per pixel."""
    small = image.convert("RGB").resize((THUMB_SIDE, THUMB_SIDE), Image.Resampling.BOX)
    return np.asarray(small, dtype=np.uint8).tobytes()


def differing_pixels(a: np.ndarray, b: np.ndarray, tolerance: int) -> np.ndarray:
    """For pairs of thumbnails ``a[i]``, ``b[i]`` (P × 768 uint8): how many pixels have a channel more than ``tolerance`` apart."""
    diff = np.abs(a.astype(np.int16) - b.astype(np.int16)).reshape(len(a), THUMB_PIXELS, 3)  # (P, 256, 3)
    return (diff.max(axis=2) > tolerance).sum(axis=1)


def thumbs_match(a: bytes, b: bytes, tolerance: int = 32, max_pixels: int = 1) -> bool:
    """Whether at most ``max_pixels`` of the 256 pixels of thumbnails ``a`` and ``b`` differ by more than ``tolerance``."""
    if len(a) != THUMB_BYTES or len(b) != THUMB_BYTES:
        raise ValueError(
            f"thumbnails must be {THUMB_BYTES} bytes (see thumbnail()), got {len(a)} and {len(b)}"
        )
    pair = [np.frombuffer(value, dtype=np.uint8)[None] for value in (a, b)]
    return bool(differing_pixels(*pair, tolerance)[0] <= max_pixels)


# ---------------------------------------------------------------- Dask steps


def _meta(**dtypes: object) -> pd.DataFrame:
    """An empty frame with these column dtypes: what a Dask step returns."""
    return pd.DataFrame({name: pd.Series([], dtype=dtype) for name, dtype in dtypes.items()})


_BASE_META = _meta(key=_STR, order=np.int64, sha256=_STR, phash=np.uint64, thumb=_BYTES)
_ROW_COLUMNS = ["key", "order", "sha256", "phash"]  # what exact dedup and banding carry: no thumbnails
_REJECT_META = _meta(**dict.fromkeys(DUPLICATES_SCHEMA.names, _STR))
_PAIR_META = _meta(key=_STR, near_order=np.int64, near_key=_STR, distance=np.int64)


def _load_passed(path: str) -> pd.DataFrame:
    """The rows of one ``image_hashes`` file that passed the rules: key, order, sha256, phash, thumb."""
    table = read_parquet(path)
    hashes_schema.validate(table, check_metadata=True)
    table = table.filter(pc.is_null(table.column("rule_reason")))
    ordinal = table.column("ordinal").to_numpy().astype(np.int64)
    order = (ordinal << 31) + table.column("row").to_numpy().astype(np.int64)
    return pd.DataFrame(
        {
            "key": pd.Series(table.column("key").to_pylist(), dtype=_STR),
            "order": order,
            "sha256": pd.Series(table.column("sha256").to_pylist(), dtype=_STR),
            "phash": table.column("phash").to_numpy().astype(np.uint64),
            "thumb": pd.Series(pd.arrays.ArrowExtensionArray(table.column("thumb").combine_chunks())),
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


def _band_masks(widths: list[int]) -> np.ndarray:
    """The bits of each band as a uint64 mask, in band order."""
    masks, shift = [], HASH_BITS
    for width in widths:
        shift -= width
        masks.append(((1 << width) - 1) << shift)
    return np.array(masks, dtype=np.uint64)


def _explode_bands(part: pd.DataFrame, widths: list[int]) -> pd.DataFrame:
    """One row per (row, band): band index and the value of the hash's bits in that band."""
    hashes = part["phash"].to_numpy(dtype=np.uint64)
    frames, shift = [], HASH_BITS
    for band, width in enumerate(widths):
        shift -= width
        value = (hashes >> np.uint64(shift)) & np.uint64((1 << width) - 1)
        frames.append(part[["key", "order", "phash"]].assign(band=band, value=value.astype(np.int64)))
    return pd.concat(frames, ignore_index=True)


def _bucket_pairs(hashes: np.ndarray, threshold: int) -> tuple[np.ndarray, np.ndarray]:
    """All pairs (later, earlier) of one band bucket (rows earliest first) whose hashes are within ``threshold``."""
    later, earlier = [np.empty(0, dtype=np.int64)], [np.empty(0, dtype=np.int64)]
    for start in range(0, len(hashes), _CHUNK):
        stop = min(start + _CHUNK, len(hashes))
        near = hamming_matrix(hashes[start:stop], hashes[:stop]) <= threshold  # (block, stop)
        near &= np.arange(start, stop)[:, None] > np.arange(stop)[None, :]
        rows, cols = np.nonzero(near)
        later.append(rows + start)
        earlier.append(cols)
    return np.concatenate(later), np.concatenate(earlier)


def _near_candidates(part: pd.DataFrame, threshold: int, widths: list[int]) -> pd.DataFrame:
    """Candidate pairs from each (band, value) bucket: later row, earlier row within ``threshold`` bits.

    A pair agreeing on several bands is kept only in the first of them, so it
    comes out of the whole step once.
    """
    part = part.sort_values(["band", "value", "order", "key"], kind="stable")
    band, value = part["band"].to_numpy(), part["value"].to_numpy()
    starts = np.flatnonzero(np.r_[True, (band[1:] != band[:-1]) | (value[1:] != value[:-1])])
    ends = np.r_[starts[1:], len(part)]
    hashes = part["phash"].to_numpy(dtype=np.uint64)
    later, earlier = [np.empty(0, dtype=np.int64)], [np.empty(0, dtype=np.int64)]
    shared = ends - starts > 1
    for start, end in zip(starts[shared], ends[shared], strict=True):
        found, neighbour = _bucket_pairs(hashes[start:end], threshold)
        later.append(found + start)
        earlier.append(neighbour + start)
    later, earlier = np.concatenate(later), np.concatenate(earlier)
    xor = hashes[later] ^ hashes[earlier]
    first_band = np.argmax((xor[:, None] & _band_masks(widths)[None, :]) == 0, axis=1)
    keep = first_band == band[later]
    later, earlier = later[keep], earlier[keep]
    keys, orders = part["key"].to_numpy(), part["order"].to_numpy()
    return pd.DataFrame(
        {
            "key": pd.Series(keys[later], dtype=_STR),
            "near_order": orders[earlier].astype(np.int64),
            "near_key": pd.Series(keys[earlier], dtype=_STR),
            "distance": np.bitwise_count(xor[keep]).astype(np.int64),
        }
    )


def _thumb_array(column: pd.Series) -> np.ndarray:
    return np.frombuffer(b"".join(column.tolist()), dtype=np.uint8).reshape(len(column), THUMB_BYTES)


def _confirmed(part: pd.DataFrame, tolerance: int, max_pixels: int) -> pd.DataFrame:
    """The candidate pairs whose thumbnails (``thumb``, ``near_thumb``) match."""
    if part.empty:
        return part[_PAIR_META.columns]
    off = differing_pixels(_thumb_array(part["thumb"]), _thumb_array(part["near_thumb"]), tolerance)
    return part.loc[off <= max_pixels, _PAIR_META.columns]


def _near_rejects(part: pd.DataFrame) -> pd.DataFrame:
    """Per key, the earliest confirmed near row (all of a key's pairs are in this partition)."""
    part = part.sort_values(["key", "near_order", "near_key"], kind="stable").drop_duplicates("key")
    details = [f"phash within {d} of {k}" for d, k in zip(part["distance"], part["near_key"], strict=True)]
    return _rejects_frame(part["key"], NEAR_DUPLICATE, details)


def _repeated_keys(part: pd.DataFrame) -> pd.DataFrame:
    return pd.DataFrame({"repeated": [int(part["key"].duplicated().sum())]})


def find_duplicates(
    hashes_paths: list[str], config: FilterConfig, npartitions: int | None = None
) -> pa.Table:
    """Rows (over all shards) that duplicate an earlier row: table of key, reject_reason, reject_detail.

    Reads the ``image_hashes`` rows with no ``rule_reason`` as a Dask dataframe
    (on the current Dask scheduler or client).

    - exact (``config.exact_dedup``): rows with equal sha256; the earliest
      by (ordinal, row, key) is kept, the others are ``exact_duplicate``
      ("same sha256 as <key>").
    - perceptual (``config.phash_dedup``, on what exact dedup kept): a row
      is ``near_duplicate`` ("phash within d of <earliest such key>") when
      ANY earlier row has a phash within ``config.phash_threshold`` bits
      and a thumbnail that :func:`thumbs_match` it (``thumb_tolerance``,
      ``thumb_max_pixels``), even if that earlier row is itself a near
      duplicate of another one. Candidate pairs come from LSH banding
      (:func:`band_widths`), so no pair within the threshold is missed; each
      pair is joined with both rows' thumbnails by key and checked.

    The result is sorted by key and does not depend on the order of
    ``hashes_paths`` nor on ``npartitions`` (default: one per file). Keys
    must be unique over all shards; ``ValueError`` otherwise.
    """
    if not hashes_paths or not (config.exact_dedup or config.phash_dedup):
        return DUPLICATES_SCHEMA.empty_table()
    if npartitions is not None and (
        isinstance(npartitions, bool) or not isinstance(npartitions, int) or npartitions < 1
    ):
        raise ValueError(f"npartitions must be an int >= 1 or None, got {npartitions!r}")
    base = dd.from_map(_load_passed, sorted(hashes_paths), meta=_BASE_META, label="image-hashes")
    if npartitions is not None:
        base = base.repartition(npartitions=npartitions)
    n = npartitions or base.npartitions
    repeated = (
        base[["key"]].shuffle("key", npartitions=n).map_partitions(_repeated_keys, meta={"repeated": "i8"})
    )
    outputs = [repeated["repeated"].sum()]
    survivors = base[_ROW_COLUMNS]
    if config.exact_dedup:
        marked = survivors.shuffle("sha256", npartitions=n).map_partitions(
            _mark_exact, meta=_BASE_META[_ROW_COLUMNS].assign(original=pd.Series([], dtype=_STR))
        )
        outputs.append(marked.map_partitions(_exact_rejects, meta=_REJECT_META))
        survivors = marked[marked["original"].isna()]
    if config.phash_dedup:
        widths = band_widths(config.phash_threshold)
        bands = survivors.map_partitions(_explode_bands, widths, meta=_explode_bands(_BASE_META, widths))
        candidates = bands.shuffle(["band", "value"], npartitions=n).map_partitions(
            _near_candidates, config.phash_threshold, widths, meta=_PAIR_META
        )
        thumbs = base[["key", "thumb"]]
        near_thumbs = thumbs.rename(columns={"key": "near_key", "thumb": "near_thumb"})
        pairs = candidates.merge(thumbs, on="key", npartitions=n)
        pairs = pairs.merge(near_thumbs, on="near_key", npartitions=n)
        confirmed = pairs.map_partitions(
            _confirmed, config.thumb_tolerance, config.thumb_max_pixels, meta=_PAIR_META
        )
        outputs.append(
            confirmed.shuffle("key", npartitions=n).map_partitions(_near_rejects, meta=_REJECT_META)
        )
    n_repeated, *frames = dask.compute(*outputs)
    if n_repeated:
        raise ValueError(
            f"{n_repeated} key(s) occur in more than one row of the shards that passed the rules"
        )
    result = pd.concat([_REJECT_META, *frames], ignore_index=True).sort_values("key", kind="stable")
    return pa.Table.from_pandas(result, schema=DUPLICATES_SCHEMA, preserve_index=False)
