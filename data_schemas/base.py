"""What every dataset schema module shares: metadata keys and table validation.

A dataset module (``sources``, ``downloaded``, ``filtered``, ``rejects``, …)
defines ``NAME``, ``VERSION`` and ``SCHEMA`` and exposes ``validate(table)``
built from :func:`validate_table`.
"""

from __future__ import annotations

import pyarrow as pa

SCHEMA_NAME_KEY = b"dalle.schema"
SCHEMA_VERSION_KEY = b"dalle.schema_version"


class SchemaError(ValueError):
    """A table does not match its dataset schema; the message names the column and the problem."""


def with_metadata(
    schema: pa.Schema, name: str, version: int, extra: dict[str, str] | None = None
) -> pa.Schema:
    """Return ``schema`` carrying the dataset name and schema version in its Parquet metadata."""
    metadata = dict(schema.metadata or {})
    metadata[SCHEMA_NAME_KEY] = name.encode()
    metadata[SCHEMA_VERSION_KEY] = str(version).encode()
    for key, value in (extra or {}).items():
        metadata[key.encode()] = value.encode()
    return schema.with_metadata(metadata)


def schema_identity(schema: pa.Schema) -> tuple[str | None, int | None]:
    """The (dataset name, schema version) recorded in a schema's metadata, or (None, None)."""
    metadata = schema.metadata or {}
    name = metadata.get(SCHEMA_NAME_KEY)
    version = metadata.get(SCHEMA_VERSION_KEY)
    return (name.decode() if name else None, int(version) if version else None)


def validate_table(
    table: pa.Table | pa.Schema,
    schema: pa.Schema,
    *,
    name: str,
    version: int,
    allow_extra_columns: bool = False,
    non_nullable: tuple[str, ...] = (),
    check_metadata: bool = False,
) -> None:
    """Raise :class:`SchemaError` naming the first column that does not match ``schema``.

    Checks presence and type of every column, forbids nulls in ``non_nullable``
    columns, forbids unknown columns unless ``allow_extra_columns``, and — with
    ``check_metadata`` (used for files read back from disk) — that the
    recorded dataset name and schema version are the expected ones.
    """
    actual = table if isinstance(table, pa.Schema) else table.schema
    for field in schema:
        if field.name not in actual.names:
            raise SchemaError(f"{name}: missing column {field.name!r} (expected type {field.type})")
        got = actual.field(field.name).type
        if not got.equals(field.type):
            raise SchemaError(f"{name}: column {field.name!r} has type {got}, expected {field.type}")
    if not allow_extra_columns:
        extra = [col for col in actual.names if col not in schema.names]
        if extra:
            raise SchemaError(f"{name}: unexpected column(s) {extra}; schema v{version} has {schema.names}")
    if isinstance(table, pa.Table):
        for col in non_nullable:
            nulls = table.column(col).null_count
            if nulls:
                raise SchemaError(f"{name}: column {col!r} has {nulls} null value(s); nulls are not allowed")
    if check_metadata:
        got_name, got_version = schema_identity(actual)
        if got_name != name:
            raise SchemaError(f"{name}: file metadata names dataset {got_name!r}, expected {name!r}")
        if got_version != version:
            raise SchemaError(
                f"{name}: file has schema version {got_version}, this code reads version {version}"
            )
