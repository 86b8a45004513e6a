"""``tokens``: each filtered image as the dVAE's grid of codes, with its caption.

``image_tokens`` holds the codes of one image in row-major order (row by row
of the ``grid_height`` × ``grid_width`` grid) as a fixed-size list of
``uint16``, so a codebook of up to 65,536 entries fits (the paper's is 8192).
The list size differs from one dVAE to another, so a file's schema is built
per dVAE by :func:`tokens_schema`, which also records in the Parquet schema
metadata the grid shape (``dalle.grid_height``, ``dalle.grid_width``), the
codebook size (``dalle.vocab_size``) and the version of the dVAE that made the
codes (``dalle.dvae_version``). :data:`SCHEMA` is the column layout only: its
``image_tokens`` is a variable-length list, which :func:`validate` does not
accept in a table.
"""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc

from data_schemas.base import SchemaError, validate_table, with_metadata

NAME = "tokens"
VERSION = 1
MAX_VOCAB = 2**16
"""Largest codebook whose codes fit in ``uint16``."""
GRID_HEIGHT_KEY = "dalle.grid_height"
GRID_WIDTH_KEY = "dalle.grid_width"
VOCAB_SIZE_KEY = "dalle.vocab_size"
DVAE_VERSION_KEY = "dalle.dvae_version"
_KEYS = (GRID_HEIGHT_KEY, GRID_WIDTH_KEY, VOCAB_SIZE_KEY, DVAE_VERSION_KEY)
_NON_NULLABLE = ("key", "caption", "image_tokens")


def _fields(image_tokens: pa.DataType) -> list[pa.Field]:
    return [
        pa.field("key", pa.string(), nullable=False),
        pa.field("caption", pa.string()),
        pa.field("image_tokens", image_tokens),
    ]


SCHEMA = with_metadata(pa.schema(_fields(pa.list_(pa.uint16()))), NAME, VERSION)


def tokens_schema(grid_h: int, grid_w: int, vocab_size: int, dvae_version: str) -> pa.Schema:
    """The schema of a tokens file made by one dVAE: ``image_tokens`` is a list of exactly ``grid_h * grid_w``."""
    for name, value in (("grid_h", grid_h), ("grid_w", grid_w)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or not 2 <= vocab_size <= MAX_VOCAB:
        raise ValueError(
            f"vocab_size must be an integer in [2, {MAX_VOCAB}] (codes are uint16), got {vocab_size!r}"
        )
    if not isinstance(dvae_version, str) or not dvae_version:
        raise ValueError(f"dvae_version must be a non-empty string, got {dvae_version!r}")
    extra = {
        GRID_HEIGHT_KEY: str(grid_h),
        GRID_WIDTH_KEY: str(grid_w),
        VOCAB_SIZE_KEY: str(vocab_size),
        DVAE_VERSION_KEY: dvae_version,
    }
    return with_metadata(pa.schema(_fields(pa.list_(pa.uint16(), grid_h * grid_w))), NAME, VERSION, extra)


def token_metadata(schema: pa.Schema) -> tuple[int, int, int, str] | None:
    """``(grid_h, grid_w, vocab_size, dvae_version)`` recorded in ``schema``, or None if it records none.

    ``SchemaError`` when only some of the keys are there or a number does not parse.
    """
    metadata = schema.metadata or {}
    present = [key for key in _KEYS if key.encode() in metadata]
    if not present:
        return None
    if len(present) != len(_KEYS):
        missing = [key for key in _KEYS if key not in present]
        raise SchemaError(f"{NAME}: metadata has {present} but lacks {missing}")
    values = [metadata[key.encode()].decode() for key in _KEYS]
    try:
        grid_h, grid_w, vocab_size = (int(v) for v in values[:3])
    except ValueError:
        raise SchemaError(f"{NAME}: grid shape / vocab size metadata {values[:3]} are not integers") from None
    return grid_h, grid_w, vocab_size, values[3]


def validate(table: pa.Table | pa.Schema, *, check_metadata: bool = False) -> None:
    """Raise ``SchemaError`` on a missing/mistyped column, a null key, caption or token list, or a bad code.

    When the schema metadata records the grid and codebook (always, for a
    file this project wrote, and required with ``check_metadata``), each
    ``image_tokens`` list must hold ``grid_h * grid_w`` codes, all below
    ``vocab_size``; without that metadata any fixed list size of ``uint16`` is
    accepted.
    """
    schema = table if isinstance(table, pa.Schema) else table.schema
    recorded = token_metadata(schema)
    if recorded is None:
        if check_metadata:
            raise SchemaError(
                f"{NAME}: file metadata lacks the grid shape, vocab size and dVAE version {_KEYS}"
            )
        if "image_tokens" in schema.names:
            got = schema.field("image_tokens").type
            if not (pa.types.is_fixed_size_list(got) and got.value_type == pa.uint16()):
                raise SchemaError(
                    f"{NAME}: column 'image_tokens' has type {got}, expected a fixed-size list of uint16 "
                    "(build the schema with tokens_schema)"
                )
            expected = pa.schema(_fields(got))
        else:
            expected = SCHEMA
    else:
        expected = tokens_schema(*recorded)
    validate_table(
        table,
        expected,
        name=NAME,
        version=VERSION,
        non_nullable=_NON_NULLABLE,
        check_metadata=check_metadata,
    )
    if isinstance(table, pa.Table) and recorded is not None and table.num_rows:
        codes = pc.list_flatten(table.column("image_tokens"))
        if codes.null_count:
            raise SchemaError(f"{NAME}: column 'image_tokens' has {codes.null_count} null code(s)")
        vocab_size = recorded[2]
        top = pc.max(codes).as_py()
        if top is not None and top >= vocab_size:
            raise SchemaError(
                f"{NAME}: column 'image_tokens' has code {top}, the codebook has {vocab_size} codes"
            )
