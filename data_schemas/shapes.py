"""``shapes``: the synthetic data set's index — one row per image with its caption and ground truth."""

from __future__ import annotations

import pyarrow as pa

from data_schemas.base import validate_table, with_metadata

NAME = "shapes"
VERSION = 1
SCHEMA = with_metadata(
    pa.schema(
        [
            pa.field("id", pa.string(), nullable=False),
            pa.field("file", pa.string(), nullable=False),  # images/<id>.png, relative to the data set folder
            pa.field("caption", pa.string(), nullable=False),
            pa.field("split", pa.string(), nullable=False),  # train | heldout
            pa.field("objects", pa.string(), nullable=False),  # JSON list, see objects_to_json
            pa.field("relation", pa.string()),  # first object relative to second; null for one object
        ]
    ),
    NAME,
    VERSION,
)


def validate(table: pa.Table, *, check_metadata: bool = False) -> None:
    """Raise ``SchemaError`` on a missing/mistyped column or a null id, file, caption, split or objects."""
    validate_table(
        table,
        SCHEMA,
        name=NAME,
        version=VERSION,
        non_nullable=("id", "file", "caption", "split", "objects"),
        check_metadata=check_metadata,
    )
