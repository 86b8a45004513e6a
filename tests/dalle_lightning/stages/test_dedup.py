"""Cross-shard deduplication: banding against brute force, thumbnail confirmation, and the ``shapes`` images.

The ``shapes`` test keeps the measurement behind the thumbnail check: on
those images (one or two small shapes on a plain light background) the
grayscale pHash alone calls a large share of different images near
duplicates; with the colour thumbnail confirming each pHash pair, every JPEG
q70 re-encode is still caught and at most 1% of the clean images are flagged.
"""

from __future__ import annotations

import hashlib
import io
import random
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

import data_schemas.downloaded as downloaded_schema
import data_schemas.image_hashes as hashes_schema
from dalle_lightning.datasets.parquet_io import write_parquet_atomic
from dalle_lightning.stages.dedup import (
    THUMB_BYTES,
    _explode_bands,
    _near_candidates,
    band_widths,
    differing_pixels,
    find_duplicates,
    thumbnail,
    thumbs_match,
)
from dalle_lightning.stages.filter import FilterConfig, score_shard
from dalle_lightning.stages.phash import hamming
from dalle_lightning.synth.shapes import render
from dalle_lightning.synth.shapes_dataset import ShapesConfig, make_example

PALETTE = [bytes([v]) * THUMB_BYTES for v in (0, 100, 200)]  # solid thumbnails, far apart


def write_hashes(
    path: Path,
    keys: list[str],
    hashes: list[int],
    ordinal: int,
    sha256: list[str] | None = None,
    thumbs: list[bytes] | None = None,
) -> str:
    table = pa.table(
        {
            "key": keys,
            "ordinal": pa.array([ordinal] * len(keys), pa.int32()),
            "row": pa.array(range(len(keys)), pa.int32()),
            "sha256": sha256 or [f"sha-{k}" for k in keys],
            "phash": pa.array(hashes, pa.uint64()),
            "thumb": pa.array(thumbs or [PALETTE[0]] * len(keys), pa.binary()),
            "rule_reason": pa.array([None] * len(keys), pa.string()),
            "rule_detail": pa.array([None] * len(keys), pa.string()),
        }
    )
    return write_parquet_atomic(table, str(path), hashes_schema).path


def details_of(table: pa.Table) -> dict[str, str]:
    return dict(zip(table.column("key").to_pylist(), table.column("reject_detail").to_pylist(), strict=True))


# ---------------------------------------------------------------- the thumbnail check


def test_thumbnail_is_16x16_rgb_bytes() -> None:
    solid = Image.new("RGB", (50, 30), (10, 20, 30))
    assert thumbnail(solid) == bytes([10, 20, 30]) * 256
    assert len(thumbnail(Image.new("L", (64, 64), 7))) == THUMB_BYTES
    assert len(thumbnail(Image.new("RGBA", (8, 8), (1, 2, 3, 4)))) == THUMB_BYTES
    left_half = np.zeros((32, 32, 3), dtype=np.uint8)
    left_half[:, :16] = 255
    pixels = np.frombuffer(thumbnail(Image.fromarray(left_half)), np.uint8).reshape(16, 16, 3)
    assert (pixels[:, :8] == 255).all() and (pixels[:, 8:] == 0).all()  # row-major, box filter


def test_thumbs_match_counts_pixels_beyond_the_tolerance() -> None:
    base = np.full((16, 16, 3), 128, dtype=np.uint8)

    def changed(*edits: tuple[int, int, int, int]) -> bytes:
        out = base.copy()
        for y, x, channel, delta in edits:
            out[y, x, channel] += delta
        return out.tobytes()

    a = base.tobytes()
    assert thumbs_match(a, a, tolerance=0, max_pixels=0)
    assert thumbs_match(a, changed((3, 4, 2, 32)), tolerance=32, max_pixels=0)  # 32 is within
    assert not thumbs_match(a, changed((3, 4, 2, 33)), tolerance=32, max_pixels=0)
    assert thumbs_match(a, changed((3, 4, 2, 33)), tolerance=32, max_pixels=1)
    assert not thumbs_match(a, changed((3, 4, 2, 33), (9, 9, 0, 100)), tolerance=32, max_pixels=1)
    assert thumbs_match(a, changed((3, 4, 0, 33), (3, 4, 1, 90)), tolerance=32, max_pixels=1)  # one pixel
    assert not thumbs_match(a, changed(*[(y, 0, 1, 20) for y in range(16)]), tolerance=19, max_pixels=15)
    swapped = np.zeros((16, 16, 3), np.uint8)
    swapped[..., 0] = 200
    assert not thumbs_match(swapped.tobytes(), swapped[..., ::-1].copy().tobytes())  # other colour
    np.testing.assert_array_equal(
        differing_pixels(
            np.stack([np.frombuffer(a, np.uint8)] * 2), np.stack([np.zeros(768, np.uint8)] * 2), 127
        ),
        [256, 256],
    )
    with pytest.raises(ValueError, match="768 bytes"):
        thumbs_match(a, a[:-3])


# ---------------------------------------------------------------- banding and confirmation against brute force


def brute_force_near(
    keys: list[str], hashes: list[int], thumbs: list[bytes], threshold: int
) -> dict[str, str]:
    """Reference: each row near ANY earlier row (pHash and thumbnail), reported against the earliest one."""
    found = {}
    for j in range(len(keys)):
        for i in range(j):
            distance = hamming(hashes[i], hashes[j])
            if distance <= threshold and thumbs_match(thumbs[i], thumbs[j]):
                found[keys[j]] = f"phash within {distance} of {keys[i]}"
                break
    return found


@pytest.fixture
def synthetic_hashes(tmp_path: Path) -> tuple[list[str], list[str], list[int], list[bytes]]:
    """Four shards of random hashes with planted copies 0 … 9 bits away, inside and across shards;
    a copy mostly keeps its original's thumbnail, sometimes not."""
    rng = random.Random(7)
    keys, hashes, thumbs = [], [], []
    for n in range(400):
        if hashes and rng.random() < 0.4:
            source = rng.randrange(len(hashes))
            value = hashes[source]
            for bit in rng.sample(range(64), rng.randint(0, 9)):
                value ^= 1 << bit
            thumb = thumbs[source] if rng.random() < 0.7 else rng.choice(PALETTE)
        else:
            value, thumb = rng.getrandbits(64), rng.choice(PALETTE)
        keys.append(f"k{n:04d}")
        hashes.append(value)
        thumbs.append(thumb)
    paths = [
        write_hashes(
            tmp_path / f"h{s}.parquet",
            keys[s * 100 : (s + 1) * 100],
            hashes[s * 100 : (s + 1) * 100],
            s,
            thumbs=thumbs[s * 100 : (s + 1) * 100],
        )
        for s in range(4)
    ]
    return paths, keys, hashes, thumbs


@pytest.mark.parametrize("threshold", [0, 3, 6, 10])
def test_banding_finds_exactly_the_brute_force_pairs(synthetic_hashes, threshold: int) -> None:
    paths, keys, hashes, thumbs = synthetic_hashes
    table = find_duplicates(paths, FilterConfig(exact_dedup=False, phash_threshold=threshold))
    found = details_of(table)
    assert found == brute_force_near(keys, hashes, thumbs, threshold)
    assert len(found) > 10
    assert sum(band_widths(threshold)) == 64 and len(band_widths(threshold)) == threshold + 1
    # without the thumbnail check more rows are near duplicates
    unchecked = find_duplicates(
        paths, FilterConfig(exact_dedup=False, phash_threshold=threshold, thumb_tolerance=255)
    )
    assert unchecked.num_rows > table.num_rows


def test_result_does_not_depend_on_partitions_or_path_order(synthetic_hashes) -> None:
    paths = synthetic_hashes[0]
    config = FilterConfig()
    reference = find_duplicates(paths, config)
    assert reference.num_rows > 0
    for npartitions, order in [(1, paths), (3, paths[::-1]), (7, paths), (2, paths[1:] + paths[:1])]:
        assert find_duplicates(order, config, npartitions=npartitions).equals(reference)
    with pytest.raises(ValueError, match="npartitions"):
        find_duplicates(paths, config, npartitions=0)


def test_near_duplicates_of_dropped_rows_are_dropped_too(tmp_path: Path) -> None:
    # a ~ b (4 bits), b ~ c (4 bits), a and c 8 bits apart: b and c are both dropped, c because of b
    a, b, c = 0, 0b1111, 0b1111_1111
    path = write_hashes(tmp_path / "h.parquet", ["a", "b", "c"], [a, b, c], 0)
    table = find_duplicates([path], FilterConfig(phash_threshold=6))
    assert table.column("reject_detail").to_pylist() == ["phash within 4 of a", "phash within 4 of b"]


def test_the_earliest_confirmed_row_is_named(tmp_path: Path) -> None:
    # equal hashes; a's thumbnail differs from b's and c's: b is kept, c is a copy of b, d of a
    thumbs = [PALETTE[0], PALETTE[1], PALETTE[1], PALETTE[0]]
    path = write_hashes(tmp_path / "h.parquet", ["a", "b", "c", "d"], [5, 5, 5, 5], 0, thumbs=thumbs)
    assert details_of(find_duplicates([path], FilterConfig())) == {
        "c": "phash within 0 of b",
        "d": "phash within 0 of a",
    }


def test_exact_dedup_keeps_the_earliest_and_skips_missing_sha(tmp_path: Path) -> None:
    first = write_hashes(tmp_path / "h0.parquet", ["x", "y", "z"], [1, 2**40, 2**63], 5, ["s1", "s2", None])
    second = write_hashes(tmp_path / "h1.parquet", ["p", "q"], [2**20, 2**30], 2, ["s1", None])
    table = find_duplicates([first, second], FilterConfig(phash_dedup=False))
    assert table.to_pylist() == [
        {"key": "x", "reject_reason": "exact_duplicate", "reject_detail": "same sha256 as p"}
    ]


def test_repeated_keys_are_refused(tmp_path: Path) -> None:
    first = write_hashes(tmp_path / "h0.parquet", ["x", "y"], [1, 2], 0)
    second = write_hashes(tmp_path / "h1.parquet", ["y"], [2**40], 1)
    with pytest.raises(ValueError, match="1 key"):
        find_duplicates([first, second], FilterConfig())
    assert find_duplicates([], FilterConfig()).num_rows == 0


def test_old_hashes_files_are_refused(tmp_path: Path) -> None:
    # a version 1 file (no thumb column), as written before thumbnails: re-run score_shard
    path = write_hashes(tmp_path / "h0.parquet", ["x"], [1], 0)
    old = hashes_schema.SCHEMA.remove(hashes_schema.SCHEMA.get_field_index("thumb"))
    old = old.with_metadata({**old.metadata, b"dalle.schema_version": b"1"})
    pq.write_table(pq.read_table(path).drop_columns(["thumb"]).cast(old), tmp_path / "v1.parquet")
    with pytest.raises(ValueError, match="thumb"):
        find_duplicates([str(tmp_path / "v1.parquet")], FilterConfig())


def test_runs_on_a_dask_distributed_cluster(synthetic_hashes) -> None:
    distributed = pytest.importorskip("distributed")
    paths = synthetic_hashes[0]
    reference = find_duplicates(paths, FilterConfig())
    with (
        distributed.LocalCluster(
            n_workers=1, threads_per_worker=2, processes=False, dashboard_address=":0"
        ) as cluster,
        distributed.Client(cluster),
    ):
        assert find_duplicates(paths, FilterConfig(), npartitions=3).equals(reference)


# ---------------------------------------------------------------- the shapes images

N_SHAPES = 300
REENCODED = range(7, N_SHAPES, 25)  # 12 originals, in both shards


def jpeg(image: Image.Image, quality: int) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def download_row(key: str, image: bytes, caption: str) -> dict:
    return {
        "key": key,
        "url": f"https://example.com/{key}.jpg",
        "caption": caption,
        "image": image,
        "width": 64,
        "height": 64,
        "original_width": 64,
        "original_height": 64,
        "sha256": hashlib.sha256(image).hexdigest(),
        "status": "success",
        "error_message": None,
    }


@pytest.fixture(scope="module")
def shapes_hashes(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """Two shards of 150 ``shapes`` images (JPEG q95); the later one also holds q70 re-encodes of 12 of them."""
    folder = tmp_path_factory.mktemp("shapes")
    config = ShapesConfig(n=N_SHAPES, size=64, seed=0)
    rows = []
    for i in range(N_SHAPES):
        scene, caption, _ = make_example(config, i)
        rows.append(download_row(f"s{i:03d}", jpeg(render(scene, 64), 95), caption))
    copies = [
        download_row(f"re{i:03d}", jpeg(Image.open(io.BytesIO(rows[i]["image"])), 70), rows[i]["caption"])
        for i in REENCODED
    ]
    paths = []
    for ordinal, shard in enumerate([rows[:150], rows[150:] + copies]):
        download = str(folder / f"download-{ordinal}.parquet")
        write_parquet_atomic(
            pa.Table.from_pylist(shard, schema=downloaded_schema.SCHEMA), download, downloaded_schema
        )
        hashes = str(folder / f"hashes-{ordinal}.parquet")
        score_shard(download, hashes, FilterConfig(), ordinal)
        paths.append(hashes)
    return paths


def test_shapes_reencodes_are_caught_and_different_images_kept(shapes_hashes: list[str]) -> None:
    table = find_duplicates(shapes_hashes, FilterConfig())
    found, reasons = details_of(table), set(table.column("reject_reason").to_pylist())
    clean_flagged = sorted(k for k in found if k.startswith("s"))
    for i in REENCODED:
        original = f"s{i:03d}"
        # named against the original, or against what the original itself duplicates
        assert found[f"re{i:03d}"].endswith(f" of {original}") or original in clean_flagged, found
    assert reasons <= {"near_duplicate"}
    assert len(clean_flagged) <= 0.01 * N_SHAPES, clean_flagged
    # the pHash alone flags a large share of the different images
    unchecked = details_of(find_duplicates(shapes_hashes, FilterConfig(thumb_tolerance=255)))
    assert sum(k.startswith("s") for k in unchecked) >= 0.2 * N_SHAPES


@pytest.mark.parametrize("threshold", [0, 6])
def test_each_candidate_pair_comes_out_once(synthetic_hashes, threshold: int) -> None:
    # a pair agreeing on several bands is only proposed in the first of them: no repeated thumbnail checks
    _, keys, hashes, _ = synthetic_hashes
    part = pd.DataFrame(
        {
            "key": pd.Series(keys, dtype="string[pyarrow]"),
            "order": np.arange(len(keys)),
            "phash": np.array(hashes, np.uint64),
        }
    )
    widths = band_widths(threshold)
    pairs = _near_candidates(_explode_bands(part, widths), threshold, widths)
    found = list(zip(pairs["key"], pairs["near_key"], strict=True))
    expected = {
        (keys[j], keys[i])
        for j in range(len(keys))
        for i in range(j)
        if hamming(hashes[i], hashes[j]) <= threshold
    }
    assert len(found) == len(set(found)) and set(found) == expected
