"""``dalle verify ROOT``: check every Parquet file of a dataset tree against its schema and its manifest.

For each ``part-*.parquet`` file the schema named in its metadata
(``dalle.schema``) is looked up in ``data_schemas`` and the whole table
validated; the file is then compared with the manifest that recorded it (row
count, byte size, sha256). Files listed in a manifest but missing, changed or
truncated, and shard files no manifest knows, are reported by path.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field

import fsspec
import pyarrow.parquet as pq

import data_schemas
from dalle_lightning.datasets.layout import DatasetLayout
from dalle_lightning.datasets.manifest import resolve_path
from data_schemas.base import schema_identity


@dataclass
class VerifyReport:
    """What ``verify`` found: files checked and problems, each naming a path."""

    checked: int = 0
    rows: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def _manifest_index(layout: DatasetLayout) -> dict[str, dict]:
    """path (without protocol) -> recorded file info, from every manifest under ``_manifests``."""
    fs = layout.fs
    base = fsspec.core.url_to_fs(layout.join("_manifests"))[1]
    index: dict[str, dict] = {}
    if not fs.exists(base):
        return index
    for path in fs.find(base):
        if not path.endswith(".json"):
            continue
        with fs.open(path, "r") as f:
            manifest = json.load(f)
        for role, info in manifest.get("files", {}).items():
            index[resolve_path(info["path"], path)] = {**info, "manifest": path, "role": role}
    return index


def verify_tree(root: str) -> VerifyReport:
    """Validate every shard file under ``root`` and compare it with its manifest."""
    layout = DatasetLayout(root)
    fs = layout.fs
    base = fsspec.core.url_to_fs(layout.root)[1]
    report = VerifyReport()
    if not fs.exists(base):
        report.problems.append(f"{root}: does not exist")
        return report
    index = _manifest_index(layout)
    seen: set[str] = set()
    for path in sorted(fs.find(base)):
        name = path.rsplit("/", 1)[-1]
        if not (name.startswith("part-") and name.endswith(".parquet")):
            continue
        seen.add(path)
        report.checked += 1
        with fs.open(path, "rb") as f:
            data = f.read()
        try:
            table = _read_bytes(data)
        except Exception as err:  # a corrupt or truncated file: report, keep going
            report.problems.append(f"{path}: unreadable Parquet ({type(err).__name__}: {err})")
            continue
        dataset, _version = schema_identity(table.schema)
        if dataset is None:
            report.problems.append(f"{path}: no dalle.schema in its metadata (not written by this project)")
        else:
            try:
                data_schemas.module_for(dataset).validate(table, check_metadata=True)
            except ValueError as err:
                report.problems.append(f"{path}: {err}")
        report.rows += table.num_rows
        info = index.get(path)
        if info is None:
            report.problems.append(f"{path}: not recorded in any manifest")
            continue
        if len(data) != info["bytes"]:
            report.problems.append(
                f"{path}: size {len(data)} bytes, manifest says {info['bytes']} (truncated?)"
            )
        elif hashlib.sha256(data).hexdigest() != info["sha256"]:
            report.problems.append(f"{path}: sha256 differs from its manifest (changed)")
        if table.num_rows != info["rows"]:
            report.problems.append(f"{path}: {table.num_rows} rows, manifest says {info['rows']}")
    for path, info in sorted(index.items()):
        if path not in seen and path.startswith(base):
            report.problems.append(f"{path}: missing (recorded in {info['manifest']})")
    return report


def _read_bytes(data: bytes):
    import io

    return pq.read_table(io.BytesIO(data))
