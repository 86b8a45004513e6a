"""download_shard: img2dataset's downloader against a loopback ImageServer with every fault."""

from __future__ import annotations

import hashlib
import io
import re
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

import data_schemas.downloaded as downloaded_schema
from dalle_lightning.datasets.parquet_io import read_parquet
from dalle_lightning.serving.image_server import ImageServer, write_url_list
from dalle_lightning.stages.download import DownloadConfig, download_shard

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

# original (width, height) -> size after keep_ratio to 64 (smaller side = 64)
SIZES = {
    (96, 64): (96, 64),
    (128, 64): (128, 64),
    (32, 48): (64, 96),
    (200, 100): (128, 64),
    (16, 16): (64, 64),
}
# fault -> (status, error_message)
FAULTS = {
    "404": ("failed_to_download", "HTTP Error 404: Not Found"),
    "500": ("failed_to_download", "HTTP Error 500: Internal Server Error"),
    "stall": ("failed_to_download", "timed out"),
    "noai": ("failed_to_download", "Use of image disallowed by X-Robots-Tag directive"),
    "html": ("failed_to_resize", "Image decoding error"),
    "truncate": ("failed_to_resize", "Image decoding error"),
}


def _make_images(root: Path, count: int) -> dict[str, tuple[bytes, tuple[int, int]]]:
    """``count`` noisy PNGs cycling through SIZES: relative path -> (bytes, original size)."""
    rng = np.random.default_rng(0)
    sizes = list(SIZES)
    (root / "images").mkdir(parents=True)
    images = {}
    for i in range(count):
        width, height = sizes[i % len(sizes)]
        pixels = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
        rel = f"images/{i:03d}.png"
        Image.fromarray(pixels).save(root / rel)
        images[rel] = ((root / rel).read_bytes(), (width, height))
    return images


@pytest.fixture(scope="module")
def downloaded(tmp_path_factory: pytest.TempPathFactory):
    """One shard of 30 rows: 23 good images, one row per fault, one missing file; downloaded once."""
    tmp = tmp_path_factory.mktemp("download")
    images = _make_images(tmp / "www", 23)
    files = list(images)
    expected = {f: ("success", None) for f in files}
    for i, (fault, outcome) in enumerate(FAULTS.items()):
        path = f"_fault/{fault}/{list(images)[i]}"
        files.insert(3 * i + 1, path)
        expected[path] = outcome
    files.append("images/missing.png")
    expected["images/missing.png"] = FAULTS["404"]
    captions = [f"caption {i}" if i % 5 else None for i in range(len(files))]
    out_dir = tmp / "out"
    config = DownloadConfig(timeout=1.5, thread_count=8)
    with ImageServer(tmp / "www", stall_seconds=5) as server:
        write_url_list(server, files, captions, str(tmp / "source.parquet"))
        result = download_shard(
            str(tmp / "source.parquet"), str(out_dir / "part-ab12.parquet"), config, shard_id="ab12"
        )
    return {
        "result": result,
        "table": read_parquet(str(out_dir / "part-ab12.parquet")),
        "files": files,
        "captions": captions,
        "expected": expected,
        "images": images,
        "out_dir": out_dir,
    }


def test_one_row_per_input_in_input_order(downloaded) -> None:
    table, files = downloaded["table"], downloaded["files"]
    assert table.num_rows == len(files) == 30
    assert table.column("key").to_pylist() == [f"ab12-{i:06d}" for i in range(len(files))]
    assert [u.split("/", 3)[3] for u in table.column("url").to_pylist()] == files
    assert table.column("caption").to_pylist() == downloaded["captions"]
    assert downloaded["result"].written.rows == len(files)


def test_status_and_error_message_per_row(downloaded) -> None:
    table, files, expected = downloaded["table"], downloaded["files"], downloaded["expected"]
    got = list(
        zip(table.column("status").to_pylist(), table.column("error_message").to_pylist(), strict=True)
    )
    assert got == [expected[f] for f in files]


def test_successful_rows_hash_and_sizes(downloaded) -> None:
    rows = [r for r in downloaded["table"].to_pylist() if r["status"] == "success"]
    assert len(rows) == 23
    for row in rows:
        data, original = downloaded["images"][row["url"].split("/", 3)[3]]
        assert row["sha256"] == hashlib.sha256(data).hexdigest()
        assert (row["original_width"], row["original_height"]) == original
        assert (row["width"], row["height"]) == SIZES[original]
        image = Image.open(io.BytesIO(row["image"]))
        assert (image.format, image.size) == ("JPEG", SIZES[original])


def test_failed_rows_carry_no_image(downloaded) -> None:
    for row in downloaded["table"].to_pylist():
        if row["status"] != "success":
            assert row["image"] is None and row["sha256"] is None and row["width"] is None


def test_output_file_matches_schema_and_nothing_else_is_left(downloaded) -> None:
    out_dir: Path = downloaded["out_dir"]
    downloaded_schema.validate(pq.read_table(out_dir / "part-ab12.parquet"), check_metadata=True)
    assert sorted(p.name for p in out_dir.iterdir()) == ["part-ab12.parquet"]
    written = downloaded["result"].written
    assert written.bytes == (out_dir / "part-ab12.parquet").stat().st_size
    assert written.sha256 == hashlib.sha256((out_dir / "part-ab12.parquet").read_bytes()).hexdigest()


def test_stats_keep_img2dataset_counts(downloaded) -> None:
    stats = downloaded["result"].stats
    assert (stats["count"], stats["successes"], stats["failed_to_download"], stats["failed_to_resize"]) == (
        30,
        23,
        5,
        2,
    )
    assert stats["status_counts"] == {"success": 23, "failed_to_download": 5, "failed_to_resize": 2}
    assert stats["error_counts"] == {
        "HTTP Error 404: Not Found": 2,
        "HTTP Error 500: Internal Server Error": 1,
        "timed out": 1,
        "Use of image disallowed by X-Robots-Tag directive": 1,
        "Image decoding error": 2,
    }
    assert stats["status_dict"]["success"] == 23 and stats["duration"] > 0


def test_other_modes_formats_and_fsspec_paths(tmp_path: Path) -> None:
    images = _make_images(tmp_path / "www", 5)
    config = DownloadConfig(
        resize_mode="border", encode_format="png", encode_quality=3, disallowed_header_directives=()
    )
    with ImageServer(tmp_path / "www") as server:
        files = [*images, f"_fault/noai/{next(iter(images))}"]
        write_url_list(server, files, ["c"] * len(files), "memory://dl-test/source.parquet")
        result = download_shard(
            "memory://dl-test/source.parquet", "memory://dl-test/out/part-1.parquet", config, shard_id="1"
        )
    table = read_parquet(result.written.path)
    assert table.column("status").to_pylist() == ["success"] * 6  # noai honoured only when asked
    for row in table.to_pylist():
        assert (row["width"], row["height"]) == (64, 64)
        assert Image.open(io.BytesIO(row["image"])).format == "PNG"


def test_empty_shard(tmp_path: Path) -> None:
    write_url_list("http://127.0.0.1:9", [], [], str(tmp_path / "source.parquet"))
    result = download_shard(
        str(tmp_path / "source.parquet"), str(tmp_path / "part-0.parquet"), DownloadConfig(), shard_id="0"
    )
    assert result.written.rows == 0 and result.stats["count"] == 0
    downloaded_schema.validate(pq.read_table(tmp_path / "part-0.parquet"), check_metadata=True)


@pytest.mark.parametrize(
    "field, value",
    [
        ("image_size", 0),
        ("resize_mode", "stretch"),
        ("encode_format", "gif"),
        ("encode_quality", 101),
        ("thread_count", 0),
        ("timeout", 0),
        ("retries", -1),
        ("user_agent_token", " "),
        ("disallowed_header_directives", ("noai", "")),
        ("min_image_size", -1),
        ("max_image_area", 0),
    ],
)
def test_config_errors_name_the_field(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=re.escape(f"DownloadConfig.{field} must be")):
        DownloadConfig(**{field: value})


def test_config_png_quality_is_a_compression_level() -> None:
    with pytest.raises(ValueError, match=re.escape("encode_quality must be 0..9 for png")):
        DownloadConfig(encode_format="png")
    assert DownloadConfig(disallowed_header_directives=["noai"]).disallowed_header_directives == ("noai",)
