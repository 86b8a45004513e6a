import os

import pyarrow as pa
import pytest

import data_schemas.sources as sources_schema
from dalle_lightning.datasets.fingerprint import fingerprint, table_fingerprint
from dalle_lightning.datasets.layout import DatasetLayout, shard_id_of
from dalle_lightning.datasets.manifest import is_done, read_manifest, run_once
from dalle_lightning.datasets.parquet_io import list_parts, read_parquet, write_parquet_atomic


def _urls(n, start=0):
    return pa.table(
        {
            "url": [f"http://127.0.0.1/{i}.png" for i in range(start, start + n)],
            "caption": [f"caption {i}" for i in range(start, start + n)],
        }
    )


def test_fingerprint_is_stable_and_sensitive():
    assert fingerprint("a", {"x": 1, "y": [1, 2]}) == fingerprint("a", {"y": [1, 2], "x": 1})
    assert fingerprint("a", {"x": 1}) != fingerprint("a", {"x": 2})
    assert table_fingerprint(_urls(3)) == table_fingerprint(_urls(3))
    assert table_fingerprint(_urls(3)) != table_fingerprint(_urls(3, start=1))


def test_atomic_write_leaves_no_temp_file_and_validates(tmp_path):
    path = str(tmp_path / "sources" / "x" / "part-abc.parquet")
    written = write_parquet_atomic(_urls(5), path, sources_schema)
    assert written.rows == 5 and written.bytes == os.path.getsize(path)
    assert os.listdir(tmp_path / "sources" / "x") == ["part-abc.parquet"]
    table = read_parquet(path)
    sources_schema.validate(table, check_metadata=True)
    assert list_parts(str(tmp_path / "sources" / "x")) == [path]


def test_write_refuses_a_table_that_does_not_fit(tmp_path):
    with pytest.raises(ValueError, match="missing column"):
        write_parquet_atomic(pa.table({"caption": ["x"]}), str(tmp_path / "part-a.parquet"), sources_schema)
    assert not list(tmp_path.iterdir())


def test_run_once_skips_done_work_and_redoes_missing_files(tmp_path):
    layout = DatasetLayout(str(tmp_path))
    out = layout.shard("sources", "d", "abc")
    calls = []

    def work():
        calls.append(1)
        return {"output": write_parquet_atomic(_urls(2), out, sources_schema)}, {"rows": 2}

    args = dict(stage="sources", dataset="d", shard_id="abc", input_fingerprint="in")
    _, did = run_once(layout.manifest("sources", "d", "abc"), "fp1", work, **args)
    assert did and len(calls) == 1
    _, did = run_once(layout.manifest("sources", "d", "abc"), "fp1", work, **args)
    assert not did and len(calls) == 1
    _, did = run_once(layout.manifest("sources", "d", "abc"), "fp2", work, **args)  # settings changed
    assert did and len(calls) == 2
    os.remove(out)  # output lost: manifest no longer counts
    assert is_done(layout.manifest("sources", "d", "abc"), "fp2") is None
    _, did = run_once(layout.manifest("sources", "d", "abc"), "fp2", work, **args)
    assert did and read_manifest(layout.manifest("sources", "d", "abc")).files["output"]["rows"] == 2


def test_shard_id_of():
    assert shard_id_of("s3://b/x/part-0a1b.parquet") == "0a1b"
    with pytest.raises(ValueError, match="not a shard file name"):
        shard_id_of("/x/other.parquet")
