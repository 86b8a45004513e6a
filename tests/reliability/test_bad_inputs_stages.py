"""Bad-input corpus, file side: broken URL lists, corrupt or foreign Parquet in a stage's input, tokens of
another dVAE, checkpoints whose shapes do not fit their config.

Each case either keeps every row with a per-row outcome, or raises a ``ValueError`` whose message names
the file (or column) and the problem, and writes no output.
"""

from __future__ import annotations

import hashlib
import io
import json
import warnings
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

import data_schemas.downloaded as downloaded_schema
import data_schemas.filtered as filtered_schema
import data_schemas.sources as sources_schema
import data_schemas.tokens as tokens_schema
from dalle_lightning.data.token_stream import ParquetTokenShards
from dalle_lightning.datasets.parquet_io import write_parquet_atomic
from dalle_lightning.models.dvae import DiscreteVAE, DVAEConfig, load_dvae, save_dvae
from dalle_lightning.models.transformer import DalleConfig, DalleTransformer
from dalle_lightning.stages.download import DownloadConfig, download_shard
from dalle_lightning.stages.filter import FilterConfig, apply_filter, find_duplicates, score_shard
from dalle_lightning.stages.sources import read_url_list
from dalle_lightning.stages.tokenize import TokenizeConfig, tokenize_shard
from dalle_lightning.training.dalle_train import load_dalle, save_dalle

pytestmark = pytest.mark.timeout(60)

CAPTION = "a smooth colour pattern on a plain background"


def _corrupt_parquet(path: Path) -> str:
    """A file named like a shard whose bytes are not Parquet (a crashed copy, a wrong upload)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"PAR1" + bytes(range(256)) * 4)
    return str(path)


def _truncated_parquet(path: Path, table: pa.Table) -> str:
    """The first half of a valid Parquet file (a write cut short without the atomic rename)."""
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    return str(path)


def _jpeg(seed: int) -> bytes:
    image = Image.new("RGB", (64, 64), (seed * 40 % 256, 90, 200 - seed * 30 % 200))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG")
    return buffer.getvalue()


def _downloaded_row(key: str, image: bytes | None, status: str = "success") -> dict:
    return {
        "key": key,
        "url": f"http://127.0.0.1:9/{key}.jpg",
        "caption": CAPTION,
        "image": image,
        "width": 64 if image else None,
        "height": 64 if image else None,
        "original_width": 64 if image else None,
        "original_height": 64 if image else None,
        "sha256": hashlib.sha256(image).hexdigest() if image else None,
        "status": status,
        "error_message": None if status == "success" else "HTTP Error 404: Not Found",
    }


def _tiny_dvae() -> DiscreteVAE:
    return DiscreteVAE(
        DVAEConfig(image_size=16, n_hid=8, n_blk_per_group=1, group_count=2, vocab_size=16, n_init=8)
    )


# ---------------------------------------------------------------- the URL list (sources stage)


def test_url_list_missing_url_column(tmp_path: Path) -> None:
    (tmp_path / "urls.csv").write_text("link,caption\nhttp://a/1.png,a cat\n")
    with pytest.raises(ValueError, match=r"URL list has no column 'url' \(columns: \['link', 'caption'\]\)"):
        read_url_list(str(tmp_path / "urls.csv"))


def test_url_list_url_column_of_numbers(tmp_path: Path) -> None:
    (tmp_path / "urls.csv").write_text("url,caption\n1,a cat\n2,a dog\n")
    with pytest.raises(ValueError, match=r"URL list column 'url' must hold strings, got int64"):
        read_url_list(str(tmp_path / "urls.csv"))


def test_url_list_caption_column_of_numbers(tmp_path: Path) -> None:
    lines = [json.dumps({"url": f"http://a/{i}.png", "caption": 1.5 * i}) for i in range(3)]
    (tmp_path / "urls.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=r"URL list column 'caption' must hold strings, got double"):
        read_url_list(str(tmp_path / "urls.jsonl"))


def test_url_list_null_and_blank_urls_are_kept(tmp_path: Path) -> None:
    """Rows with no URL stay (as "") so the download stage accounts for them as ``URL is empty``."""
    table = pa.table({"url": ["http://a/1.png", None, "  "], "caption": ["one", "two", "three"]})
    pq.write_table(table, tmp_path / "urls.parquet")
    read = read_url_list(str(tmp_path / "urls.parquet"))
    assert read.column("url").to_pylist() == ["http://a/1.png", "", "  "]
    assert read.column("caption").to_pylist() == ["one", "two", "three"]
    sources_schema.validate(read)


def test_url_list_invalid_utf8_in_parquet_and_jsonl(tmp_path: Path) -> None:
    bad = pa.array([b"a red circle", b"a blue \xff\xfe square"], pa.binary()).view(pa.string())  # unchecked
    pq.write_table(
        pa.table({"url": ["http://a/1.png", "http://a/2.png"], "caption": bad}), tmp_path / "a.parquet"
    )
    (tmp_path / "b.jsonl").write_bytes(b'{"url": "http://a/3.png", "caption": "caf\xe9 table"}\n')
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        read = read_url_list([str(tmp_path / "a.parquet"), str(tmp_path / "b.jsonl")])
    assert read.column("caption").to_pylist() == [
        "a red circle",
        "a blue \ufffd\ufffd square",
        "caf\ufffd table",
    ]
    read.validate(full=True)  # every string is valid UTF-8 now
    assert any("not valid UTF-8" in str(w.message) for w in caught)


def test_url_list_corrupt_parquet(tmp_path: Path) -> None:
    path = _corrupt_parquet(tmp_path / "urls.parquet")
    with pytest.raises(ValueError, match=rf"cannot read URL list '{path}' as parquet: .*magic bytes"):
        read_url_list(path)


def test_url_list_unknown_format(tmp_path: Path) -> None:
    (tmp_path / "urls.xlsx").write_bytes(b"PK\x03\x04")
    with pytest.raises(ValueError, match=r"unsupported URL list format '\.xlsx'"):
        read_url_list(str(tmp_path / "urls.xlsx"))


# ---------------------------------------------------------------- a stage's input shard


def test_download_input_corrupt_parquet(tmp_path: Path) -> None:
    source = _corrupt_parquet(tmp_path / "sources" / "part-ab.parquet")
    out = tmp_path / "download" / "part-ab.parquet"
    with pytest.raises(ValueError, match=rf"{source}: not a readable Parquet file"):
        download_shard(source, str(out), DownloadConfig(), shard_id="ab")
    assert not out.parent.exists()


def test_download_input_without_url_column(tmp_path: Path) -> None:
    path = tmp_path / "sources" / "part-ab.parquet"
    path.parent.mkdir()
    pq.write_table(pa.table({"link": ["http://a/1.png"], "caption": ["x"]}), path)
    with pytest.raises(ValueError, match=r"sources: missing column 'url'"):
        download_shard(str(path), str(tmp_path / "out.parquet"), DownloadConfig(), shard_id="ab")


def test_filter_input_corrupt_parquet(tmp_path: Path) -> None:
    download = _corrupt_parquet(tmp_path / "download" / "part-ab.parquet")
    hashes = tmp_path / "hashes" / "part-ab.parquet"
    with pytest.raises(ValueError, match=rf"{download}: not a readable Parquet file"):
        score_shard(download, str(hashes), FilterConfig(), ordinal=0)
    assert not hashes.exists()


def test_filter_input_truncated_parquet(tmp_path: Path) -> None:
    rows = [_downloaded_row(f"k{i}", _jpeg(i)) for i in range(4)]
    table = pa.Table.from_pylist(rows, schema=downloaded_schema.SCHEMA)
    download = _truncated_parquet(tmp_path / "download" / "part-ab.parquet", table)
    with pytest.raises(ValueError, match=rf"{download}: not a readable Parquet file"):
        score_shard(download, str(tmp_path / "hashes" / "part-ab.parquet"), FilterConfig(), ordinal=0)


def test_filter_success_row_with_undecodable_bytes(tmp_path: Path) -> None:
    """A ``success`` row whose stored bytes do not decode is rejected ``undecodable``; no row lost."""
    rows = [
        _downloaded_row("good", _jpeg(1)),
        _downloaded_row("garbled", b"\xff\xd8\xff\xe0 not really a jpeg"),
        _downloaded_row("failed", None, status="failed_to_download"),
    ]
    download = str(tmp_path / "download" / "part-ab.parquet")
    write_parquet_atomic(
        pa.Table.from_pylist(rows, schema=downloaded_schema.SCHEMA), download, downloaded_schema
    )
    hashes = str(tmp_path / "hashes" / "part-ab.parquet")
    score_shard(download, hashes, FilterConfig(), ordinal=0)
    duplicates = find_duplicates([hashes], FilterConfig())
    kept, rejects = str(tmp_path / "kept.parquet"), str(tmp_path / "rejects.parquet")
    _, _, counts = apply_filter(download, hashes, duplicates, kept, rejects)
    assert counts == {"kept": 1, "undecodable": 1}
    rejected = pq.read_table(rejects).to_pylist()
    assert [(r["key"], r["reject_reason"]) for r in rejected] == [("garbled", "undecodable")]
    assert rejected[0]["reject_detail"].startswith("image bytes do not decode: ")
    assert pq.read_table(kept).column("key").to_pylist() == ["good"]


def test_tokenize_input_corrupt_parquet(tmp_path: Path, one_torch_thread: None) -> None:
    filtered = _corrupt_parquet(tmp_path / "filter" / "part-ab.parquet")
    out = tmp_path / "tokens" / "part-ab.parquet"
    with pytest.raises(ValueError, match=rf"{filtered}: not a readable Parquet file"):
        tokenize_shard(
            filtered, str(out), _tiny_dvae(), dvae_version="v1", config=TokenizeConfig(device="cpu")
        )
    assert not out.exists()


def test_tokenize_input_from_another_dataset(tmp_path: Path, one_torch_thread: None) -> None:
    """A ``downloaded`` shard handed to tokenize instead of a ``filtered`` one."""
    download = str(tmp_path / "download" / "part-ab.parquet")
    write_parquet_atomic(
        pa.Table.from_pylist([_downloaded_row("k0", _jpeg(0))], schema=downloaded_schema.SCHEMA),
        download,
        downloaded_schema,
    )
    with pytest.raises(ValueError, match=r"metadata names dataset 'downloaded' v1, expected 'filtered' v1"):
        tokenize_shard(
            download, str(tmp_path / "t.parquet"), _tiny_dvae(), dvae_version="v1", config=TokenizeConfig()
        )
    assert filtered_schema.NAME == "filtered"


def _tokens_file(path: Path, dvae: str, rows: int = 3) -> None:
    codes = pa.array([i % 16 for i in range(rows * 64)], pa.uint16())
    table = pa.table(
        {
            "key": [f"{dvae}-{i}" for i in range(rows)],
            "caption": [CAPTION] * rows,
            "image_tokens": pa.FixedSizeListArray.from_arrays(codes, 64),
        }
    )
    write_parquet_atomic(table, str(path), tokens_schema, schema=tokens_schema.tokens_schema(8, 8, 16, dvae))


def test_tokens_file_from_another_dvae(tmp_path: Path) -> None:
    """A stray shard of dVAE ``bbbb`` in the tokens folder of dVAE ``aaaa`` (same grid, so the sizes agree)."""
    folder = tmp_path / "tokens" / "aaaa" / "shapes"
    _tokens_file(folder / "part-000.parquet", "aaaa")
    _tokens_file(folder / "part-001.parquet", "bbbb")
    shards = ParquetTokenShards.from_dataset(str(tmp_path), "aaaa", "shapes")
    with pytest.raises(
        ValueError, match=r"part-001\.parquet: tokens made by dVAE 'bbbb', expected dVAE 'aaaa'"
    ):
        shards.num_rows(0)
    (folder / "part-001.parquet").unlink()
    assert ParquetTokenShards.from_dataset(str(tmp_path), "aaaa", "shapes").num_rows(0) == 3


# ---------------------------------------------------------------- checkpoints


def test_dvae_checkpoint_shapes_do_not_match_config(tmp_path: Path, one_torch_thread: None) -> None:
    path = save_dvae(_tiny_dvae(), tmp_path / "dvae.pt")
    saved = torch.load(path, weights_only=True)
    saved["config"]["vocab_size"] = 32  # the weights are of a 16-code dVAE
    torch.save(saved, tmp_path / "edited.pt")
    with pytest.raises(
        ValueError, match=r"weights do not fit the saved config .*shape mismatch .*saved \(16,"
    ):
        load_dvae(tmp_path / "edited.pt")


def test_dalle_checkpoint_shapes_do_not_match_config(tmp_path: Path, one_torch_thread: None) -> None:
    config = DalleConfig(
        text_len=8, text_vocab=32, image_vocab=16, grid_size=4, n_layer=2, n_head=2, n_embd=16, conv_kernel=3
    )
    path = save_dalle(DalleTransformer(config), tmp_path / "dalle.pt")
    saved = torch.load(path, weights_only=True)
    saved["config"]["n_embd"] = 32
    torch.save(saved, tmp_path / "edited.pt")
    with pytest.raises(
        ValueError, match=r"(?s)the weights do not fit the saved config: .*size mismatch for start"
    ):
        load_dalle(tmp_path / "edited.pt")
