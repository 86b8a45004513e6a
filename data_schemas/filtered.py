"""``filtered``: the downloaded images that passed every filter and deduplication.

``phash`` is the 64-bit perceptual hash (DCT pHash) used for near-duplicate
detection; ``caption_len`` the caption length in characters.
"""

from __future__ import annotations

import pyarrow as pa

from data_schemas.base import validate_table, with_metadata

NAME = "filtered"
VERSION = 1
FIELDS = [
    pa.field("key", pa.string(), nullable=False),
    pa.field("url", pa.string(), nullable=False),
    pa.field("caption", pa.string()),
    pa.field("image", pa.binary()),
    pa.field("width", pa.int32()),
    pa.field("height", pa.int32()),
    pa.field("original_width", pa.int32()),
    pa.field("original_height", pa.int32()),
    pa.field("sha256", pa.string()),
    pa.field("phash", pa.uint64()),
    pa.field("caption_len", pa.int32()),
]
SCHEMA = with_metadata(pa.schema(FIELDS), NAME, VERSION)


def validate(table: pa.Table, *, check_metadata: bool = False) -> None:
    """Raise ``SchemaError`` on a missing/mistyped column or a null key, url, caption or image."""
    validate_table(
        table,
        SCHEMA,
        name=NAME,
        version=VERSION,
        non_nullable=("key", "url", "caption", "image", "sha256", "phash"),
        check_metadata=check_metadata,
    )
