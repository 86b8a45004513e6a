"""``sources``: the URL list a user starts from — one row per image URL with its caption.

Extra columns (licence, original id, …) are allowed and kept.
"""

from __future__ import annotations

import pyarrow as pa

from data_schemas.base import validate_table, with_metadata

NAME = "sources"
VERSION = 1
SCHEMA = with_metadata(
    pa.schema(
        [
            pa.field("url", pa.string(), nullable=False),
            pa.field("caption", pa.string()),
        ]
    ),
    NAME,
    VERSION,
)


def validate(table: pa.Table, *, check_metadata: bool = False) -> None:
    """Raise ``SchemaError`` if ``table`` lacks ``url``/``caption`` strings or has null URLs."""
    validate_table(
        table,
        SCHEMA,
        name=NAME,
        version=VERSION,
        allow_extra_columns=True,
        non_nullable=("url",),
        check_metadata=check_metadata,
    )
