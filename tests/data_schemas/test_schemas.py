import pyarrow as pa
import pytest

import data_schemas
from data_schemas import SchemaError, downloaded, filtered, rejects, sources
from data_schemas.base import schema_identity


def _downloaded_row(**over):
    row = {
        "key": "abc-000000",
        "url": "http://127.0.0.1/x.png",
        "caption": "a red circle",
        "image": b"\xff\xd8",
        "width": 64,
        "height": 64,
        "original_width": 64,
        "original_height": 64,
        "sha256": "0" * 64,
        "status": "success",
        "error_message": None,
    }
    row.update(over)
    return row


def test_every_module_carries_name_and_version_in_metadata():
    for name, module in data_schemas.MODULES.items():
        assert schema_identity(module.SCHEMA) == (name, module.VERSION)


def test_sources_accepts_extra_columns_and_rejects_null_url():
    table = pa.table({"url": ["http://a"], "caption": ["x"], "licence": ["cc"]})
    sources.validate(table)
    with pytest.raises(SchemaError, match="'url'.*null"):
        sources.validate(pa.table({"url": pa.array([None], pa.string()), "caption": ["x"]}))


def test_error_names_missing_column():
    with pytest.raises(SchemaError, match="missing column 'caption'"):
        sources.validate(pa.table({"url": ["http://a"]}))


def test_error_names_mistyped_column():
    row = _downloaded_row()
    table = pa.Table.from_pylist([row], schema=downloaded.SCHEMA).set_column(
        4, "width", pa.array([64], pa.int64())
    )
    with pytest.raises(SchemaError, match="column 'width' has type int64, expected int32"):
        downloaded.validate(table)


def test_downloaded_checks_status_values_and_image_presence():
    downloaded.validate(pa.Table.from_pylist([_downloaded_row()], schema=downloaded.SCHEMA))
    with pytest.raises(SchemaError, match="unknown value"):
        downloaded.validate(pa.Table.from_pylist([_downloaded_row(status="ok")], schema=downloaded.SCHEMA))
    with pytest.raises(SchemaError, match="'image' is null"):
        downloaded.validate(pa.Table.from_pylist([_downloaded_row(image=None)], schema=downloaded.SCHEMA))


def test_unexpected_column_is_an_error_for_fixed_schemas():
    row = {**_downloaded_row(), "phash": 1, "caption_len": 3}
    table = pa.Table.from_pylist([row], schema=filtered.SCHEMA)
    filtered.validate(table)
    extra = table.append_column("surprise", pa.array([1]))
    with pytest.raises(SchemaError, match="unexpected column"):
        filtered.validate(extra)


def test_rejects_need_a_reason():
    row = {**_downloaded_row(), "phash": 1, "caption_len": 3, "reject_reason": None, "reject_detail": None}
    row.pop("status"), row.pop("error_message")
    table = pa.Table.from_pylist([row], schema=rejects.SCHEMA)
    with pytest.raises(SchemaError, match="'reject_reason'"):
        rejects.validate(table)


def test_metadata_check_catches_other_versions():
    table = pa.table({"url": ["http://a"], "caption": ["x"]}).cast(sources.SCHEMA)
    sources.validate(table, check_metadata=True)
    other = table.replace_schema_metadata({b"dalle.schema": b"sources", b"dalle.schema_version": b"99"})
    with pytest.raises(SchemaError, match="version 99"):
        sources.validate(other, check_metadata=True)


def test_module_for_unknown_name():
    with pytest.raises(ValueError, match="unknown dataset schema 'nope'"):
        data_schemas.module_for("nope")
