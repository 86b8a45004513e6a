"""``downloaded``: one row per input URL after the download stage, image bytes or the reason there are none.

``status`` is img2dataset's: ``success``, ``failed_to_download`` or
``failed_to_resize``; ``error_message`` says why for the failures.
``sha256`` is the digest of the bytes as downloaded (before resizing).
"""

from __future__ import annotations

import pyarrow as pa

from data_schemas.base import validate_table, with_metadata

NAME = "downloaded"
VERSION = 1
STATUSES = ("success", "failed_to_download", "failed_to_resize")
SCHEMA = with_metadata(
    pa.schema(
        [
            pa.field("key", pa.string(), nullable=False),
            pa.field("url", pa.string(), nullable=False),
            pa.field("caption", pa.string()),
            pa.field("image", pa.binary()),
            pa.field("width", pa.int32()),
            pa.field("height", pa.int32()),
            pa.field("original_width", pa.int32()),
            pa.field("original_height", pa.int32()),
            pa.field("sha256", pa.string()),
            pa.field("status", pa.string(), nullable=False),
            pa.field("error_message", pa.string()),
        ]
    ),
    NAME,
    VERSION,
)


def validate(table: pa.Table, *, check_metadata: bool = False) -> None:
    """Raise ``SchemaError`` on a missing/mistyped column, a null key/url/status or an unknown status."""
    validate_table(
        table,
        SCHEMA,
        name=NAME,
        version=VERSION,
        non_nullable=("key", "url", "status"),
        check_metadata=check_metadata,
    )
    unknown = set(table.column("status").to_pylist()) - set(STATUSES)
    if unknown:
        from data_schemas.base import SchemaError

        raise SchemaError(
            f"{NAME}: column 'status' has unknown value(s) {sorted(unknown)}; expected {STATUSES}"
        )
    success = pa.compute.equal(table.column("status"), "success")
    missing = pa.compute.sum(pa.compute.and_(success, pa.compute.is_null(table.column("image")))).as_py() or 0
    if missing:
        from data_schemas.base import SchemaError

        raise SchemaError(f"{NAME}: column 'image' is null in {missing} row(s) whose status is 'success'")
