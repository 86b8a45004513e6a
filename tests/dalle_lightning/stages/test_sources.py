import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

from dalle_lightning.datasets.layout import DatasetLayout
from dalle_lightning.datasets.parquet_io import list_parts
from dalle_lightning.datasets.prune import prune_stale
from dalle_lightning.stages.sources import plan_shards, read_url_list, write_source_shard


def _urls(n, start=0):
    return pa.table(
        {
            "url": [f"http://127.0.0.1/{i}.png" for i in range(start, start + n)],
            "caption": [f"caption {i}" for i in range(start, start + n)],
            "licence": ["cc0"] * n,
        }
    )


def test_appending_urls_keeps_existing_shard_ids():
    before = plan_shards(_urls(100), 25)
    after = plan_shards(pa.concat_tables([_urls(100), _urls(30, start=100)]), 25)
    assert [s.shard_id for s in after[:4]] == [s.shard_id for s in before]
    assert len(after) == 6 and [s.ordinal for s in after] == list(range(6))
    assert len({s.shard_id for s in after}) == 6


def test_read_url_list_formats_and_renames(tmp_path):
    table = _urls(4).rename_columns(["URL", "TEXT", "licence"])
    pq.write_table(table, tmp_path / "a.parquet")
    pacsv.write_csv(table, tmp_path / "b.csv")
    read = read_url_list(
        [str(tmp_path / "a.parquet"), str(tmp_path / "b.csv")], url_col="URL", caption_col="TEXT"
    )
    assert (
        read.num_rows == 8 and read.column_names[:2] == ["url", "caption"] and "licence" in read.column_names
    )


def test_read_url_list_errors(tmp_path):
    pq.write_table(pa.table({"link": ["http://a"]}), tmp_path / "x.parquet")
    with pytest.raises(ValueError, match="no column 'url'"):
        read_url_list(str(tmp_path / "x.parquet"))
    with pytest.raises(FileNotFoundError):
        read_url_list(str(tmp_path / "missing.parquet"))
    pq.write_table(pa.table({"url": [1, 2]}), tmp_path / "y.parquet")
    with pytest.raises(ValueError, match="must hold strings"):
        read_url_list(str(tmp_path / "y.parquet"))


def test_write_and_prune(tmp_path):
    layout = DatasetLayout(str(tmp_path))
    shards = plan_shards(_urls(50), 20)
    for shard in shards:
        _, did = write_source_shard(layout, "d", shard)
        assert did
    assert all(not write_source_shard(layout, "d", s)[1] for s in shards)
    replanned = plan_shards(_urls(55), 20)  # last partial shard changes
    for shard in replanned:
        write_source_shard(layout, "d", shard)
    removed = prune_stale(layout, "sources", "d", {s.shard_id for s in replanned})
    assert removed == [shards[-1].shard_id]
    assert len(list_parts(layout.dataset("sources", "d"))) == 3
