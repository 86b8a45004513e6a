"""``image_hashes``: per downloaded shard, the small columns the global deduplication step reads.

One row per successfully downloaded image, in the order of the download
shard. ``ordinal`` is the shard's position in the source list and ``row`` the
row's position in the download shard file: deduplication keeps the earliest
copy by (ordinal, row). ``sha256`` is the digest of the original bytes,
``phash`` the 64-bit DCT perceptual hash (null when the image does not
decode). ``rule_reason``/``rule_detail`` say which row filter rejected the
row (null when it passed every rule and so takes part in deduplication).
"""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc

from data_schemas.base import SchemaError, validate_table, with_metadata

NAME = "image_hashes"
VERSION = 1
SCHEMA = with_metadata(
    pa.schema(
        [
            pa.field("key", pa.string(), nullable=False),
            pa.field("ordinal", pa.int32(), nullable=False),
            pa.field("row", pa.int32(), nullable=False),
            pa.field("sha256", pa.string()),
            pa.field("phash", pa.uint64()),
            pa.field("rule_reason", pa.string()),
            pa.field("rule_detail", pa.string()),
        ]
    ),
    NAME,
    VERSION,
)


def validate(table: pa.Table, *, check_metadata: bool = False) -> None:
    """Raise ``SchemaError`` on a missing/mistyped column, a null key/ordinal/row, or a row that passed the rules without a phash."""
    validate_table(
        table,
        SCHEMA,
        name=NAME,
        version=VERSION,
        non_nullable=("key", "ordinal", "row"),
        check_metadata=check_metadata,
    )
    passed = pc.is_null(table.column("rule_reason"))
    missing = pc.sum(pc.and_(passed, pc.is_null(table.column("phash")))).as_py() or 0
    if missing:
        raise SchemaError(f"{NAME}: column 'phash' is null in {missing} row(s) with no rule_reason")
