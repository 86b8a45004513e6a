"""The filter stage end to end on tiny download shards made here: rules, cross-shard dedup, written files."""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

import data_schemas
import data_schemas.downloaded as downloaded_schema
import data_schemas.filtered as filtered_schema
import data_schemas.image_hashes as hashes_schema
import data_schemas.rejects as rejects_schema
from dalle_lightning.datasets.parquet_io import write_parquet_atomic
from dalle_lightning.stages.dedup import THUMB_BYTES, thumbs_match
from dalle_lightning.stages.filter import (
    STAGE_VERSION,
    FilterConfig,
    apply_filter,
    duplicates_fingerprint,
    find_duplicates,
    score_shard,
    shard_duplicates,
)
from dalle_lightning.stages.phash import hamming

GOOD = "a smooth pattern of mixed colours"


def texture(seed: int, size: int = 96) -> Image.Image:
    cells = np.random.default_rng(seed).integers(0, 256, size=(8, 8, 3), dtype=np.uint8)
    return Image.fromarray(cells).resize((size, size), Image.Resampling.BICUBIC)


def jpeg(image: Image.Image, quality: int = 90) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def row(key: str, image: bytes | None, caption: str | None = GOOD, size=(400, 300), status="success") -> dict:
    """A downloaded row; ``sha256`` is of the bytes given (standing in for the original bytes)."""
    return {
        "key": key,
        "url": f"https://example.com/{key}.jpg",
        "caption": caption,
        "image": image if status == "success" else None,
        "width": 96,
        "height": 96,
        "original_width": size[0],
        "original_height": size[1],
        "sha256": hashlib.sha256(image).hexdigest() if image is not None else None,
        "status": status,
        "error_message": None if status == "success" else "HTTP 404",
    }


def write_shard(folder: Path, name: str, rows: list[dict]) -> str:
    path = str(folder / "download" / f"part-{name}.parquet")
    write_parquet_atomic(pa.Table.from_pylist(rows, schema=downloaded_schema.SCHEMA), path, downloaded_schema)
    return path


@pytest.fixture
def shards(tmp_path: Path) -> dict[str, str]:
    """Shard a (ordinal 0) has every rule reason; shard b (ordinal 1) an exact and a near copy of a's images."""
    original = jpeg(texture(0))
    shard_a = [
        row("a0", original),
        row("a1", jpeg(texture(1)), caption=None),
        row("a2", jpeg(texture(2)), caption="cat"),
        row("a3", jpeg(texture(3)), caption="word " * 300),
        row("a4", jpeg(texture(4)), caption="Beach stock photo"),
        row("a5", jpeg(texture(5)), size=(900, 300)),
        row("a6", jpeg(texture(6)), size=(24, 24)),
        row("a7", b"\xff\xd8 definitely not a jpeg"),
        row("a8", None, status="failed_to_download"),
        row("a9", jpeg(texture(9))),
        row("a10", original),  # exact copy within the shard: a0 is earlier
    ]
    shard_b = [
        row("b0", jpeg(texture(9))),  # exact copy of a9 from an earlier shard
        row("b1", jpeg(Image.open(io.BytesIO(original)), quality=65)),  # re-encoded a0: near copy
        row("b2", jpeg(texture(12))),
        row("b3", jpeg(texture(13)), caption="IMG_0042"),
        row("b4", None, status="failed_to_resize"),
    ]
    return {"a": write_shard(tmp_path, "a", shard_a), "b": write_shard(tmp_path, "b", shard_b)}


def run_stage(tmp_path: Path, shards: dict[str, str], config: FilterConfig, ordinals: dict[str, int]):
    hashes = {}
    for name, path in shards.items():
        hashes[name] = str(tmp_path / "hashes" / f"part-{name}.parquet")
        score_shard(path, hashes[name], config, ordinal=ordinals[name])
    duplicates = find_duplicates(list(hashes.values()), config)
    results = {}
    for name, path in shards.items():
        out = str(tmp_path / "filter" / f"part-{name}.parquet")
        rejects = str(tmp_path / "filter" / "rejects" / f"part-{name}.parquet")
        results[name] = apply_filter(path, hashes[name], duplicates, out, rejects)
    return hashes, duplicates, results


def reasons_of(path: str) -> dict[str, str]:
    table = pq.read_table(path)
    return dict(zip(table.column("key").to_pylist(), table.column("reject_reason").to_pylist(), strict=True))


def test_every_reason_and_cross_shard_dedup(tmp_path: Path, shards: dict[str, str]) -> None:
    config = FilterConfig()
    _, duplicates, results = run_stage(tmp_path, shards, config, {"a": 0, "b": 1})
    (kept_a, rejects_a, counts_a), (kept_b, rejects_b, counts_b) = results["a"], results["b"]
    assert reasons_of(rejects_a.path) == {
        "a1": "caption_empty",
        "a2": "caption_too_short",
        "a3": "caption_too_long",
        "a4": "caption_boilerplate",
        "a5": "aspect_ratio",
        "a6": "too_small",
        "a7": "undecodable",
        "a10": "exact_duplicate",
    }
    assert reasons_of(rejects_b.path) == {
        "b0": "exact_duplicate",
        "b1": "near_duplicate",
        "b3": "caption_boilerplate",
    }
    assert pq.read_table(kept_a.path).column("key").to_pylist() == ["a0", "a9"]
    assert pq.read_table(kept_b.path).column("key").to_pylist() == ["b2"]
    details = dict(
        zip(duplicates.column("key").to_pylist(), duplicates.column("reject_detail").to_pylist(), strict=True)
    )
    assert details["a10"] == "same sha256 as a0"
    assert details["b0"] == "same sha256 as a9"
    assert details["b1"].startswith("phash within ") and details["b1"].endswith(" of a0")
    assert counts_a == {
        "kept": 2,
        "caption_empty": 1,
        "caption_too_short": 1,
        "caption_too_long": 1,
        "caption_boilerplate": 1,
        "aspect_ratio": 1,
        "too_small": 1,
        "undecodable": 1,
        "exact_duplicate": 1,
    }
    assert counts_b == {"kept": 1, "exact_duplicate": 1, "near_duplicate": 1, "caption_boilerplate": 1}
    # invariant: kept + rejected == successful downloaded rows (failed downloads are not filter input)
    assert kept_a.rows + rejects_a.rows == 10 and sum(counts_a.values()) == 10
    assert kept_b.rows + rejects_b.rows == 4 and sum(counts_b.values()) == 4


def test_written_files_validate_and_carry_hashes(tmp_path: Path, shards: dict[str, str]) -> None:
    hashes, _, results = run_stage(tmp_path, shards, FilterConfig(), {"a": 0, "b": 1})
    kept_file, rejects_file, _ = results["a"]
    kept = pq.read_table(kept_file.path)
    rejected = pq.read_table(rejects_file.path)
    table = pq.read_table(hashes["a"])
    filtered_schema.validate(kept, check_metadata=True)
    rejects_schema.validate(rejected, check_metadata=True)
    hashes_schema.validate(table, check_metadata=True)
    assert data_schemas.module_for("image_hashes") is hashes_schema
    assert kept.column("caption_len").to_pylist() == [len(GOOD), len(GOOD)]
    assert table.column("row").to_pylist() == [0, 1, 2, 3, 4, 5, 6, 7, 9, 10]  # row 8 failed to download
    assert set(table.column("ordinal").to_pylist()) == {0}
    undecodable = rejected.filter(pa.compute.equal(rejected.column("key"), "a7"))
    assert undecodable.column("phash").to_pylist() == [None]
    thumbs = dict(zip(table.column("key").to_pylist(), table.column("thumb").to_pylist(), strict=True))
    assert thumbs["a7"] is None and all(len(thumbs[k]) == THUMB_BYTES for k in thumbs if k != "a7")
    assert "do not decode" in undecodable.column("reject_detail")[0].as_py()
    long_caption = rejected.filter(pa.compute.equal(rejected.column("key"), "a3"))
    assert (
        long_caption.column("reject_detail")[0].as_py()
        == "caption has 1499 characters after strip, maximum is 1000"
    )
    # the near copy's phash is really within the threshold of the original's
    phashes = dict(zip(table.column("key").to_pylist(), table.column("phash").to_pylist(), strict=True))
    b_hashes = pq.read_table(hashes["b"])
    b1 = b_hashes.column("phash")[1].as_py()
    assert hamming(phashes["a0"], b1) <= FilterConfig().phash_threshold
    assert thumbs_match(thumbs["a0"], b_hashes.column("thumb")[1].as_py())


def test_score_shard_counts_rule_reasons(tmp_path: Path, shards: dict[str, str]) -> None:
    written, counts = score_shard(shards["b"], str(tmp_path / "h.parquet"), FilterConfig(), ordinal=3)
    assert counts == {"passed": 3, "caption_boilerplate": 1}
    assert written.rows == 4
    with pytest.raises(ValueError, match="ordinal"):
        score_shard(shards["b"], str(tmp_path / "h.parquet"), FilterConfig(), ordinal=-1)


def test_earlier_ordinal_wins_whatever_the_listing_order(tmp_path: Path, shards: dict[str, str]) -> None:
    # shard b now comes first in the source list: its copies are kept and a's are dropped
    _, duplicates, results = run_stage(tmp_path, shards, FilterConfig(), {"a": 1, "b": 0})
    found = dict(
        zip(duplicates.column("key").to_pylist(), duplicates.column("reject_detail").to_pylist(), strict=True)
    )
    assert found["a9"] == "same sha256 as b0"
    assert found["a10"] == "same sha256 as a0"
    assert found["a0"].endswith(" of b1")
    assert "b0" not in found and "b1" not in found
    assert results["a"][2]["kept"] == 0 and results["b"][2]["kept"] == 3


def test_dedup_switches_and_threshold(tmp_path: Path, shards: dict[str, str]) -> None:
    _, dups, _ = run_stage(tmp_path, shards, FilterConfig(exact_dedup=False), {"a": 0, "b": 1})
    # without exact dedup, byte-identical copies are also (distance 0) near duplicates
    assert dict(
        zip(dups.column("key").to_pylist(), dups.column("reject_reason").to_pylist(), strict=True)
    ) == {
        "a10": "near_duplicate",
        "b0": "near_duplicate",
        "b1": "near_duplicate",
    }
    _, dups, _ = run_stage(tmp_path, shards, FilterConfig(phash_dedup=False), {"a": 0, "b": 1})
    assert set(dups.column("reject_reason").to_pylist()) == {"exact_duplicate"}
    _, dups, results = run_stage(
        tmp_path, shards, FilterConfig(exact_dedup=False, phash_dedup=False), {"a": 0, "b": 1}
    )
    assert dups.num_rows == 0 and results["b"][2]["kept"] == 3


def test_a_recoloured_copy_is_not_a_near_duplicate(tmp_path: Path) -> None:
    # same grayscale structure (identical pHash) in other colours: kept unless the thumbnail check is off
    pattern = np.zeros((96, 96, 3), dtype=np.uint8)
    pattern[:] = (230, 230, 230)
    pattern[30:66, 30:66] = (200, 40, 40)
    recoloured = pattern.copy()
    recoloured[30:66, 30:66] = (40, 120, 40)
    shard = [row("r0", jpeg(Image.fromarray(pattern))), row("r1", jpeg(Image.fromarray(recoloured)))]
    shards = {"r": write_shard(tmp_path, "r", shard)}
    hashes, dups, _ = run_stage(tmp_path, shards, FilterConfig(), {"r": 0})
    phashes = pq.read_table(hashes["r"]).column("phash").to_pylist()
    assert hamming(*phashes) <= FilterConfig().phash_threshold
    assert dups.num_rows == 0
    _, dups, _ = run_stage(tmp_path, shards, FilterConfig(thumb_tolerance=255), {"r": 0})
    assert dups.column("key").to_pylist() == ["r1"]


def test_stale_hashes_are_refused(tmp_path: Path, shards: dict[str, str]) -> None:
    hashes = str(tmp_path / "h.parquet")
    score_shard(shards["a"], hashes, FilterConfig(), ordinal=0)
    empty = find_duplicates([], FilterConfig())
    with pytest.raises(ValueError, match="stale"):
        apply_filter(shards["b"], hashes, empty, str(tmp_path / "o.parquet"), str(tmp_path / "r.parquet"))


def test_duplicates_fingerprint_per_shard(tmp_path: Path, shards: dict[str, str]) -> None:
    hashes, duplicates, _ = run_stage(tmp_path, shards, FilterConfig(), {"a": 0, "b": 1})
    mine = shard_duplicates(duplicates, hashes["b"])
    assert mine.column("key").to_pylist() == ["b0", "b1"]
    assert duplicates_fingerprint(mine) == duplicates_fingerprint(mine.take([1, 0]))
    assert duplicates_fingerprint(mine) != duplicates_fingerprint(shard_duplicates(duplicates, hashes["a"]))
    assert duplicates_fingerprint(mine.slice(0, 0)) == duplicates_fingerprint(
        find_duplicates([], FilterConfig())
    )
    assert STAGE_VERSION == 2


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("min_caption_len", 0),
        ("max_caption_len", 2),
        ("min_aspect", 0),
        ("max_aspect", 0.25),
        ("min_original_side", 0),
        ("boilerplate_patterns", "^image$"),
        ("boilerplate_patterns", ("[",)),
        ("exact_dedup", 1),
        ("phash_threshold", 17),
        ("phash_threshold", -1),
        ("thumb_tolerance", -1),
        ("thumb_tolerance", 256),
        ("thumb_tolerance", 3.5),
        ("thumb_max_pixels", -1),
        ("thumb_max_pixels", 257),
        ("thumb_max_pixels", True),
    ],
)
def test_config_errors_name_the_field(field: str, value) -> None:
    with pytest.raises(ValueError, match=field):
        FilterConfig(**{field: value})


def test_config_keeps_patterns_as_a_tuple() -> None:
    config = FilterConfig(boilerplate_patterns=["^foo"])
    assert config.boilerplate_patterns == ("^foo",)
    hash(config)
