"""Integrity (issue 7, item 3): ``dalle verify`` finds a changed, truncated or missing shard against its
manifest (row count, size, sha256) and says which, by path and by kind — through the command line."""

from __future__ import annotations

import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

import data_schemas.sources as sources_schema
from dalle_lightning.datasets.layout import DatasetLayout
from dalle_lightning.stages.sources import plan_shards, write_source_shard
from flows.cli import app

pytestmark = pytest.mark.timeout(60)

runner = CliRunner()


def _tree(root) -> list[str]:
    """Four ``sources`` shards of 10 rows, each with its manifest; returns their paths."""
    layout = DatasetLayout(str(root))
    table = pa.table(
        {"url": [f"http://127.0.0.1/{i}" for i in range(40)], "caption": [f"c{i}" for i in range(40)]}
    )
    shards = plan_shards(table, 10)
    for shard in shards:
        write_source_shard(layout, "d", shard)
    return [layout.shard("sources", "d", s.shard_id) for s in shards]


def _verify(root) -> tuple[int, dict]:
    result = runner.invoke(app, ["verify", str(root), "--json"])
    return result.exit_code, json.loads(result.stdout)


def _kinds(report: dict) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for finding in report["findings"]:
        out.setdefault(finding["path"], set()).add(finding["kind"])
    return out


def test_a_clean_tree_verifies(tmp_path):
    _tree(tmp_path)
    code, report = _verify(tmp_path)
    assert code == 0 and report["problems"] == [] and report["findings"] == []
    assert report["checked"] == 4 and report["rows"] == 40
    human = runner.invoke(app, ["verify", str(tmp_path)])
    assert human.exit_code == 0 and "4 files, 40 rows checked: 0 problem(s)" in human.stdout


def test_a_changed_shard_same_size_is_named_changed(tmp_path):
    paths = _tree(tmp_path)
    with open(paths[1], "rb") as f:
        data = bytearray(f.read())
    # one byte of the footer's writer name (not compressed): same size, other bytes, still readable
    at = bytes(data).find(b"parquet-cpp-arrow")
    assert at > 0
    data[at] = ord("P")
    with open(paths[1], "wb") as f:
        f.write(bytes(data))
    code, report = _verify(tmp_path)
    assert code == 1
    assert _kinds(report) == {paths[1]: {"changed"}}
    assert f"{paths[1]}: changed: sha256 differs from its manifest (same size)" in report["problems"]


def test_a_rewritten_shard_with_other_rows_is_changed_with_its_row_count(tmp_path):
    paths = _tree(tmp_path)
    other = pa.table({"url": ["http://127.0.0.1/x"] * 3, "caption": ["x"] * 3}).cast(sources_schema.SCHEMA)
    pq.write_table(other, paths[2])
    code, report = _verify(tmp_path)
    assert code == 1
    assert _kinds(report) == {paths[2]: {"changed", "rows"}}
    assert f"{paths[2]}: 3 rows, manifest says 10" in report["problems"]


def test_a_truncated_shard_is_named_truncated(tmp_path):
    paths = _tree(tmp_path)
    size = os.path.getsize(paths[0])
    with open(paths[0], "r+b") as f:
        f.truncate(size - 100)
    code, report = _verify(tmp_path)
    assert code == 1
    assert _kinds(report) == {paths[0]: {"truncated", "unreadable"}}
    assert (
        f"{paths[0]}: truncated: {size - 100} of the {size} bytes its manifest records" in report["problems"]
    )


def test_a_missing_shard_is_named_missing_with_its_manifest(tmp_path):
    paths = _tree(tmp_path)
    os.remove(paths[3])
    code, report = _verify(tmp_path)
    assert code == 1
    assert _kinds(report) == {paths[3]: {"missing"}}
    (problem,) = report["problems"]
    assert problem.startswith(f"{paths[3]}: missing (recorded in ") and "_manifests/sources/d/" in problem
    assert report["checked"] == 3 and report["rows"] == 30


def test_all_three_at_once_each_named_in_the_human_report(tmp_path):
    paths = _tree(tmp_path)
    other = pa.table({"url": ["http://127.0.0.1/y"], "caption": ["y"]}).cast(sources_schema.SCHEMA)
    pq.write_table(other, paths[0])  # changed
    with open(paths[1], "r+b") as f:  # truncated
        f.truncate(os.path.getsize(paths[1]) // 2)
    os.remove(paths[2])  # missing
    result = runner.invoke(app, ["verify", str(tmp_path)])
    assert result.exit_code == 1
    lines = result.stderr.splitlines()
    assert any(line.startswith(f"PROBLEM {paths[0]}: changed: ") for line in lines), lines
    assert any(line.startswith(f"PROBLEM {paths[1]}: truncated: ") for line in lines), lines
    assert any(line.startswith(f"PROBLEM {paths[2]}: missing ") for line in lines), lines
    assert not any(paths[3] in line for line in lines)  # the intact shard is not blamed
    assert "(1 changed, 1 missing, 1 rows, 1 truncated, 1 unreadable)" in result.stdout
