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

KINDS = ("missing", "truncated", "changed", "rows", "unreadable", "schema", "unrecorded", "root")
"""What can be wrong with a file: recorded but ``missing``; fewer bytes than recorded (``truncated``); other
bytes than recorded (``changed``); a row count other than recorded (``rows``); not Parquet
(``unreadable``); against its schema (``schema``); in no manifest (``unrecorded``); no such ``root``."""


@dataclass
class VerifyReport:
    """What ``verify`` found: files checked and problems, each naming a path."""

    checked: int = 0
    rows: int = 0
    problems: list[str] = field(default_factory=list)
    """One line per problem: ``<path>: <what>``."""
    findings: list[dict[str, str]] = field(default_factory=list)
    """The same problems as ``{"kind", "path", "detail"}``; kind is one of :data:`KINDS`."""

    @property
    def ok(self) -> bool:
        return not self.problems

    def add(self, kind: str, path: str, detail: str) -> None:
        assert kind in KINDS, kind
        self.problems.append(f"{path}: {detail}")
        self.findings.append({"kind": kind, "path": path, "detail": detail})


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
        report.add("root", root, "does not exist")
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
        info = index.get(path)
        try:
            table = _read_bytes(data)
        except Exception as err:  # a corrupt or truncated file: report, keep going
            if info is not None:
                _compare_with_manifest(report, path, data, info, readable=False)
            else:
                report.add("unrecorded", path, "not recorded in any manifest")
            report.add("unreadable", path, f"unreadable Parquet ({type(err).__name__}: {err})")
            continue
        dataset, _version = schema_identity(table.schema)
        if dataset is None:
            report.add("schema", path, "no dalle.schema in its metadata (not written by this project)")
        else:
            try:
                data_schemas.module_for(dataset).validate(table, check_metadata=True)
            except ValueError as err:
                report.add("schema", path, str(err))
        report.rows += table.num_rows
        if info is None:
            report.add("unrecorded", path, "not recorded in any manifest")
            continue
        _compare_with_manifest(report, path, data, info, readable=True)
        if table.num_rows != info["rows"]:
            report.add("rows", path, f"{table.num_rows} rows, manifest says {info['rows']}")
    for path, info in sorted(index.items()):
        if path not in seen and path.startswith(base):
            report.add("missing", path, f"missing (recorded in {info['manifest']})")
    return report


def _compare_with_manifest(
    report: VerifyReport, path: str, data: bytes, info: dict, *, readable: bool
) -> None:
    """Bytes against the manifest: ``truncated`` (fewer bytes than recorded and no longer a whole Parquet
    file: the end was cut off) or ``changed`` (any other difference in size or sha256)."""
    size, recorded = len(data), info["bytes"]
    if size < recorded and not readable:
        report.add("truncated", path, f"truncated: {size} of the {recorded} bytes its manifest records")
    elif size != recorded:
        report.add("changed", path, f"changed: size {size} bytes, manifest says {recorded}")
    elif hashlib.sha256(data).hexdigest() != info["sha256"]:
        report.add("changed", path, "changed: sha256 differs from its manifest (same size)")


def _read_bytes(data: bytes):
    import io

    return pq.read_table(io.BytesIO(data))
