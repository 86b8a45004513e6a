import os

import pyarrow as pa
import pyarrow.parquet as pq

import data_schemas.sources as sources_schema
from dalle_lightning.datasets.layout import DatasetLayout
from dalle_lightning.datasets.verify import verify_tree
from dalle_lightning.stages.sources import plan_shards, write_source_shard


def _tree(tmp_path):
    layout = DatasetLayout(str(tmp_path))
    table = pa.table({"url": [f"http://127.0.0.1/{i}" for i in range(30)], "caption": ["c"] * 30})
    shards = plan_shards(table, 10)
    for shard in shards:
        write_source_shard(layout, "d", shard)
    return layout, [layout.shard("sources", "d", s.shard_id) for s in shards]


def test_clean_tree_verifies(tmp_path):
    _, _paths = _tree(tmp_path)
    report = verify_tree(str(tmp_path))
    assert report.ok, report.problems
    assert report.checked == 3 and report.rows == 30


def test_detects_changed_truncated_missing_and_unknown(tmp_path):
    layout, paths = _tree(tmp_path)
    # changed: same schema, different content
    pq.write_table(pa.table({"url": ["http://x"], "caption": ["c"]}).cast(sources_schema.SCHEMA), paths[0])
    # truncated
    with open(paths[1], "r+b") as f:
        f.truncate(os.path.getsize(paths[1]) // 2)
    # missing
    os.remove(paths[2])
    # a file no manifest knows
    pq.write_table(
        pa.table({"url": ["http://y"], "caption": ["c"]}).cast(sources_schema.SCHEMA),
        layout.shard("sources", "d", "feed"),
    )
    problems = "\n".join(verify_tree(str(tmp_path)).problems)
    assert f"{paths[0]}: changed: " in problems
    assert f"{paths[0]}: 1 rows, manifest says 10" in problems
    assert f"{paths[1]}: truncated: " in problems
    assert f"{paths[1]}: unreadable Parquet" in problems
    assert f"{paths[2]}: missing" in problems
    assert "part-feed.parquet: not recorded in any manifest" in problems


def test_detects_schema_violation(tmp_path):
    layout, _ = _tree(tmp_path)
    bad = pa.table({"url": ["http://x"]}).replace_schema_metadata(
        {b"dalle.schema": b"sources", b"dalle.schema_version": b"1"}
    )
    pq.write_table(bad, layout.shard("sources", "d", "bad0"))
    problems = "\n".join(verify_tree(str(tmp_path)).problems)
    assert "part-bad0.parquet: sources: missing column 'caption'" in problems


def test_a_copied_root_still_verifies(tmp_path):
    import shutil

    _tree(tmp_path / "a")
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    shutil.rmtree(tmp_path / "a")
    report = verify_tree(str(tmp_path / "b"))
    assert report.ok and report.checked == 3, report.problems
