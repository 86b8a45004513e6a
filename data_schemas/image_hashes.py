"""``image_hashes``: per downloaded shard, the small columns the global deduplication step reads.

One row per successfully downloaded image, in the order of the download
shard. ``ordinal`` is the shard's position in the source list and ``row`` the
row's position in the download shard file: deduplication keeps the earliest
copy by (ordinal, row). ``sha256`` is the digest of the original bytes,
``phash`` the 64-bit DCT perceptual hash and ``thumb`` a 16×16 RGB thumbnail
(768 bytes, row-major, ``uint8`` R, G, B per pixel) that confirms a pHash match;
both are null when the image does not decode. ``rule_reason``/``rule_detail``
say which row filter rejected the row (null when it passed every rule and so
takes part in deduplication).

Version 2 added ``thumb``.
"""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc

from data_schemas.base import SchemaError, validate_table, with_metadata

NAME = "image_hashes"
VERSION = 2
THUMB_SIDE = 16
"""Side of the ``thumb`` thumbnail in pixels."""
THUMB_BYTES = THUMB_SIDE * THUMB_SIDE * 3
"""Length of a ``thumb`` value: 16 × 16 pixels × 3 channels."""
SCHEMA = with_metadata(
    pa.schema(
        [
            pa.field("key", pa.string(), nullable=False),
            pa.field("ordinal", pa.int32(), nullable=False),
            pa.field("row", pa.int32(), nullable=False),
            pa.field("sha256", pa.string()),
            pa.field("phash", pa.uint64()),
            pa.field("thumb", pa.binary()),
            pa.field("rule_reason", pa.string()),
            pa.field("rule_detail", pa.string()),
        ]
    ),
    NAME,
    VERSION,
)


def validate(table: pa.Table, *, check_metadata: bool = False) -> None:
    """Raise ``SchemaError`` on a missing/mistyped column, a null key/ordinal/row, a row that passed
    the rules without a phash or thumb, or a thumb that is not :data:`THUMB_BYTES` long."""
    validate_table(
        table,
        SCHEMA,
        name=NAME,
        version=VERSION,
        non_nullable=("key", "ordinal", "row"),
        check_metadata=check_metadata,
    )
    passed = pc.is_null(table.column("rule_reason"))
    for column in ("phash", "thumb"):
        missing = pc.sum(pc.and_(passed, pc.is_null(table.column(column)))).as_py() or 0
        if missing:
            raise SchemaError(f"{NAME}: column {column!r} is null in {missing} row(s) with no rule_reason")
    wrong = pc.sum(pc.not_equal(pc.binary_length(table.column("thumb")), THUMB_BYTES)).as_py() or 0
    if wrong:
        raise SchemaError(
            f"{NAME}: column 'thumb' has {wrong} value(s) that are not {THUMB_BYTES} bytes long"
        )
