"""Reading and writing shard files: explicit schema, validated, written atomically.

A shard is written to a hidden temporary name in its folder and renamed into
place once complete, so a reader never sees half a shard (DESIGN.md). On
object stores, where there is no rename, the single PUT of the finished file
gives the same guarantee.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import uuid
from dataclasses import dataclass
from types import ModuleType

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq


@dataclass(frozen=True)
class WrittenFile:
    """What was written: enough for a manifest to check the file later."""

    path: str
    rows: int
    bytes: int
    sha256: str


def _is_local(fs: fsspec.AbstractFileSystem) -> bool:
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return protocol in ("file", "local")


def conform(table: pa.Table, schema_module: ModuleType, schema: pa.Schema | None = None) -> pa.Table:
    """Cast ``table`` to the module's schema (column order, types, metadata) and validate it.

    ``schema`` replaces ``schema_module.SCHEMA`` for datasets whose schema is
    built per file (``tokens``: the list size depends on the dVAE).
    """
    if schema is None:
        schema = schema_module.SCHEMA
    extra = [c for c in table.column_names if c not in schema.names]
    columns = [table.column(f.name).cast(f.type) if f.name in table.column_names else None for f in schema]
    missing = [f.name for f, c in zip(schema, columns, strict=False) if c is None]
    if missing:
        from data_schemas import SchemaError

        raise SchemaError(f"{schema_module.NAME}: missing column(s) {missing}")
    fields = list(schema)
    # datasets that keep extra columns (sources) carry them after the fixed ones
    for name in extra:
        columns.append(table.column(name))
        fields.append(table.schema.field(name))
    out = pa.Table.from_arrays(columns, schema=pa.schema(fields, metadata=schema.metadata))
    schema_module.validate(out)
    return out


def write_parquet_atomic(
    table: pa.Table, path: str, schema_module: ModuleType, schema: pa.Schema | None = None
) -> WrittenFile:
    """Conform ``table`` to ``schema_module`` (or to ``schema``, see :func:`conform`); write it atomically."""
    table = conform(table, schema_module, schema)
    buffer = io.BytesIO()
    pq.write_table(table, buffer, compression="zstd")
    data = buffer.getvalue()
    fs, fs_path = fsspec.core.url_to_fs(path)
    parent = fs_path.rsplit("/", 1)[0]
    fs.makedirs(parent, exist_ok=True)
    if _is_local(fs):
        tmp = f"{parent}/.tmp-{uuid.uuid4().hex}-{fs_path.rsplit('/', 1)[-1]}"
        try:
            with fs.open(tmp, "wb") as f:
                f.write(data)
            fs.mv(tmp, fs_path)
        except BaseException:
            # a failed write or rename leaves no temporary file behind (a killed process does:
            # readers skip it, since only ``part-*`` names are shards)
            with contextlib.suppress(OSError):
                fs.rm(tmp)
            raise
    else:
        with fs.open(fs_path, "wb") as f:
            f.write(data)
    return WrittenFile(
        path=path, rows=table.num_rows, bytes=len(data), sha256=hashlib.sha256(data).hexdigest()
    )


def read_parquet(path: str, columns: list[str] | None = None) -> pa.Table:
    """Read one shard file (any fsspec URL); ``ValueError`` naming ``path`` when it is not readable Parquet."""
    fs, fs_path = fsspec.core.url_to_fs(path)
    with fs.open(fs_path, "rb") as f:
        try:
            return pq.read_table(f, columns=columns)
        except pa.ArrowInvalid as err:
            raise ValueError(f"{path}: not a readable Parquet file: {err}") from err


def list_parts(folder: str) -> list[str]:
    """The ``part-*.parquet`` files directly inside ``folder``, sorted; [] if it does not exist."""
    fs, fs_path = fsspec.core.url_to_fs(folder)
    if not fs.exists(fs_path):
        return []
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    prefix = "" if _is_local(fs) else f"{protocol}://"
    names = [p for p in fs.ls(fs_path, detail=False) if p.rsplit("/", 1)[-1].startswith("part-")]
    return sorted(prefix + p if prefix and not p.startswith(prefix) else p for p in names)
