"""``rejects``: downloaded images a filter or deduplication dropped, with the reason.

Same columns as ``filtered`` (``image``/``phash`` may be null when the image
could not be decoded) plus ``reject_reason`` (a short stable code such as
``caption_too_short`` or ``near_duplicate``) and ``reject_detail`` (a
human-readable explanation, e.g. which key it duplicates).
"""

from __future__ import annotations

import pyarrow as pa

from data_schemas.base import validate_table, with_metadata
from data_schemas.filtered import FIELDS

NAME = "rejects"
VERSION = 1
SCHEMA = with_metadata(
    pa.schema(
        [
            *FIELDS,
            pa.field("reject_reason", pa.string(), nullable=False),
            pa.field("reject_detail", pa.string()),
        ]
    ),
    NAME,
    VERSION,
)


def validate(table: pa.Table, *, check_metadata: bool = False) -> None:
    """Raise ``SchemaError`` on a missing/mistyped column or a row without a reject reason."""
    validate_table(
        table,
        SCHEMA,
        name=NAME,
        version=VERSION,
        non_nullable=("key", "url", "reject_reason"),
        check_metadata=check_metadata,
    )
