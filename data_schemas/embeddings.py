"""``embeddings``: each filtered image and its caption as unit-length CLIP embeddings.

One row per ``filter`` row, in its order: ``key``, ``caption`` and ``url``
copied from it, ``image_embedding`` (the CLIP image encoder's output for the
image) and ``text_embedding`` (the text encoder's output for the caption),
each a fixed-size list of ``float32`` of unit L2 norm, so an inner product is
a cosine similarity (natural-language search, CLIP-score filters).

The list size is the CLIP's embedding dimension, which differs from one CLIP
to another, so a file's schema is built per CLIP by :func:`embeddings_schema`;
it records in the Parquet schema metadata the dimension (``dalle.embed_dim``)
and the version of the CLIP that made the vectors (``dalle.clip_version``).
:data:`SCHEMA` is the column layout only: its embeddings are variable-length
lists, which :func:`validate` does not accept in a table.
"""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc

from data_schemas.base import SchemaError, validate_table, with_metadata

NAME = "embeddings"
VERSION = 1
EMBED_DIM_KEY = "dalle.embed_dim"
CLIP_VERSION_KEY = "dalle.clip_version"
_KEYS = (EMBED_DIM_KEY, CLIP_VERSION_KEY)
VECTOR_COLUMNS = ("image_embedding", "text_embedding")
_NON_NULLABLE = ("key", "image_embedding", "text_embedding")
NORM_TOLERANCE = 1e-3
"""Largest accepted ``| ‖v‖ − 1 |`` of a stored embedding (float32 rounding is ~1e-7)."""


def _fields(vector: pa.DataType) -> list[pa.Field]:
    return [
        pa.field("key", pa.string(), nullable=False),
        pa.field("caption", pa.string()),
        pa.field("url", pa.string()),
        pa.field("image_embedding", vector),
        pa.field("text_embedding", vector),
    ]


SCHEMA = with_metadata(pa.schema(_fields(pa.list_(pa.float32()))), NAME, VERSION)


def embeddings_schema(embed_dim: int, clip_version: str) -> pa.Schema:
    """The schema of an embeddings file made by one CLIP: both vectors are lists of exactly ``embed_dim``."""
    if isinstance(embed_dim, bool) or not isinstance(embed_dim, int) or embed_dim < 1:
        raise ValueError(f"embed_dim must be an integer >= 1, got {embed_dim!r}")
    if not isinstance(clip_version, str) or not clip_version:
        raise ValueError(f"clip_version must be a non-empty string, got {clip_version!r}")
    extra = {EMBED_DIM_KEY: str(embed_dim), CLIP_VERSION_KEY: clip_version}
    return with_metadata(pa.schema(_fields(pa.list_(pa.float32(), embed_dim))), NAME, VERSION, extra)


def embedding_metadata(schema: pa.Schema) -> tuple[int, str] | None:
    """``(embed_dim, clip_version)`` recorded in ``schema``, or None if it records neither.

    ``SchemaError`` when only one is there or the dimension does not parse.
    """
    metadata = schema.metadata or {}
    present = [key for key in _KEYS if key.encode() in metadata]
    if not present:
        return None
    if len(present) != len(_KEYS):
        missing = [key for key in _KEYS if key not in present]
        raise SchemaError(f"{NAME}: metadata has {present} but lacks {missing}")
    dim, version = (metadata[key.encode()].decode() for key in _KEYS)
    try:
        return int(dim), version
    except ValueError:
        raise SchemaError(f"{NAME}: {EMBED_DIM_KEY} metadata {dim!r} is not an integer") from None


def validate(table: pa.Table | pa.Schema, *, check_metadata: bool = False) -> None:
    """Raise ``SchemaError`` on a missing/mistyped column, a null key or vector, or a vector not of unit length.

    When the schema metadata records the dimension and CLIP version (always,
    for a file this project wrote, and required with ``check_metadata``), both
    vectors must hold ``embed_dim`` floats; without that metadata any fixed
    list size of ``float32`` (the same for both) is accepted. Every vector must
    be finite with an L2 norm within :data:`NORM_TOLERANCE` of 1.
    """
    schema = table if isinstance(table, pa.Schema) else table.schema
    recorded = embedding_metadata(schema)
    if recorded is None:
        if check_metadata:
            raise SchemaError(f"{NAME}: file metadata lacks the embedding dimension and CLIP version {_KEYS}")
        expected = _expected_without_metadata(schema)
    else:
        expected = embeddings_schema(*recorded)
    validate_table(
        table,
        expected,
        name=NAME,
        version=VERSION,
        non_nullable=_NON_NULLABLE,
        check_metadata=check_metadata,
    )
    if isinstance(table, pa.Table) and table.num_rows:
        for column in VECTOR_COLUMNS:
            _check_unit_length(table, column)


def _expected_without_metadata(schema: pa.Schema) -> pa.Schema:
    if "image_embedding" not in schema.names:
        return SCHEMA
    got = schema.field("image_embedding").type
    if not (pa.types.is_fixed_size_list(got) and got.value_type == pa.float32()):
        raise SchemaError(
            f"{NAME}: column 'image_embedding' has type {got}, expected a fixed-size list of float32 "
            "(build the schema with embeddings_schema)"
        )
    return pa.schema(_fields(got))


def _check_unit_length(table: pa.Table, column: str) -> None:
    """``SchemaError`` naming the first row whose vector is not finite or not of unit length."""
    array = table.column(column).combine_chunks()
    values = pc.list_flatten(array).cast(pa.float64())  # (N * D,)
    rows = pc.list_parent_indices(array)  # (N * D,): the row of each value
    squares = pa.table({"row": rows, "square": pc.multiply(values, values)})
    norms = squares.group_by("row").aggregate([("square", "sum")])
    norm = pc.sqrt(norms.column("square_sum"))  # NaN for a NaN value, inf for an infinite one
    good = pc.less_equal(pc.abs(pc.subtract(norm, 1.0)), NORM_TOLERANCE)
    bad = pc.invert(pc.fill_null(good, False))
    count = pc.sum(bad).as_py() or 0
    if count:
        row = pc.min(pc.filter(norms.column("row"), bad)).as_py()
        value = norm[pc.index(norms.column("row"), row).as_py()].as_py()
        raise SchemaError(
            f"{NAME}: column {column!r} row {row} (key {_key(table, row)!r}) has L2 norm {value:.6g}, "
            f"expected 1 ± {NORM_TOLERANCE} (finite, unit length; {count} such row(s))"
        )


def _key(table: pa.Table, row: int) -> str | None:
    return table.column("key")[row].as_py() if "key" in table.column_names else None
