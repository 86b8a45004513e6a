"""The ``sources`` stage: read a user's URL list and split it into content-addressed shards.

Shards are consecutive runs of ``shard_size`` rows in list order; a shard's id
is a digest of its rows' ``url`` and ``caption``. Appending URLs to the end of
the list therefore leaves every earlier full shard (and all its downstream
work) untouched and only adds shards (plus the last, partial one, which
changes). A shard's ``ordinal`` is its position in the list: deduplication
keeps the earliest copy, so existing rows win over newly appended ones.

Every row of the list is kept, whatever its content: a missing or blank URL
stays as ``""`` (the download stage fails it as ``URL is empty``), and bytes
that are not UTF-8 in ``url`` or ``caption`` are replaced by U+FFFD with a
warning. A file that cannot be read, a missing ``url`` column or a column of
numbers raises ``ValueError`` naming the file or column.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import fsspec
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.json as pajson
import pyarrow.parquet as pq

import data_schemas.sources as sources_schema
from dalle_lightning.datasets.fingerprint import fingerprint, table_fingerprint
from dalle_lightning.datasets.layout import DatasetLayout
from dalle_lightning.datasets.manifest import ShardManifest, is_done, write_manifest
from dalle_lightning.datasets.parquet_io import conform, write_parquet_atomic

STAGE = "sources"
STAGE_VERSION = 1
URL_LIST_FORMATS = (".parquet", ".csv", ".tsv", ".jsonl", ".json")


@dataclass(frozen=True)
class SourceShard:
    """One planned shard of the URL list."""

    shard_id: str
    ordinal: int
    table: pa.Table

    @property
    def fingerprint(self) -> str:
        return fingerprint(STAGE, STAGE_VERSION, table_fingerprint(self.table))


def _read_one(path: str) -> pa.Table:
    fs, fs_path = fsspec.core.url_to_fs(path)
    suffix = "." + fs_path.rsplit(".", 1)[-1].lower() if "." in fs_path else ""
    try:
        with fs.open(fs_path, "rb") as f:
            if suffix == ".parquet":
                return pq.read_table(f)
            if suffix in (".csv", ".tsv"):
                delimiter = "\t" if suffix == ".tsv" else ","
                return pacsv.read_csv(f, parse_options=pacsv.ParseOptions(delimiter=delimiter))
            if suffix in (".jsonl", ".json"):
                return pajson.read_json(f)
    except pa.ArrowInvalid as err:
        raise ValueError(f"cannot read URL list {path!r} as {suffix[1:]}: {err}") from err
    raise ValueError(
        f"unsupported URL list format {suffix!r} for {path!r}; expected one of {URL_LIST_FORMATS}"
    )


def read_url_list(paths: str | list[str], *, url_col: str = "url", caption_col: str = "caption") -> pa.Table:
    """Read one or more URL list files (Parquet, CSV, TSV, JSON lines) into a ``sources`` table.

    ``url_col``/``caption_col`` name the input columns (e.g. ``TEXT`` in LAION
    metadata); they are renamed to ``url``/``caption``. Other columns are kept.
    A folder is read as all its URL-list files in name order.
    """
    files: list[str] = []
    for path in [paths] if isinstance(paths, str) else paths:
        fs, fs_path = fsspec.core.url_to_fs(path)
        if fs.isdir(fs_path):
            found = sorted(p for p in fs.ls(fs_path, detail=False) if p.lower().endswith(URL_LIST_FORMATS))
            prefix = (
                path[: len(path) - len(path.lstrip("/"))]
                if "://" not in path
                else path.split("://")[0] + "://"
            )
            files.extend(p if "://" not in path else prefix + p for p in found)
        elif fs.exists(fs_path):
            files.append(path)
        else:
            raise FileNotFoundError(f"URL list not found: {path!r}")
    if not files:
        raise ValueError(f"no URL list files ({', '.join(URL_LIST_FORMATS)}) in {paths!r}")
    tables = [_read_one(f) for f in files]
    table = pa.concat_tables(tables, promote_options="permissive") if len(tables) > 1 else tables[0]
    for wanted, target in ((url_col, "url"), (caption_col, "caption")):
        if wanted not in table.column_names:
            if target == "caption":
                table = table.append_column("caption", pa.nulls(table.num_rows, pa.string()))
                continue
            raise ValueError(f"URL list has no column {wanted!r} (columns: {table.column_names})")
        if wanted != target:
            if target in table.column_names:
                table = table.drop_columns([target])
            table = table.rename_columns([target if c == wanted else c for c in table.column_names])
    for name in ("url", "caption"):
        column = table.column(name)
        textual = (pa.types.is_string, pa.types.is_large_string, pa.types.is_binary, pa.types.is_large_binary)
        if pa.types.is_null(column.type):
            column = column.cast(pa.string())
        elif not any(is_type(column.type) for is_type in textual):  # bytes: a CSV field that is not UTF-8
            raise ValueError(f"URL list column {name!r} must hold strings, got {column.type}")
        table = table.set_column(table.column_names.index(name), name, _valid_utf8(column, name))
    nulls = table.column("url").null_count
    if nulls:  # kept: the download stage fails each as "URL is empty"
        table = table.set_column(
            table.column_names.index("url"), "url", pc.fill_null(table.column("url"), "")
        )
    return conform(table, sources_schema)


def _valid_utf8(column: pa.ChunkedArray, name: str) -> pa.ChunkedArray:
    """``column`` (strings, or bytes a CSV reader could not read as text) as valid UTF-8 strings.

    Byte sequences that are not UTF-8 become U+FFFD, with a warning counting the values changed.
    """
    if pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
        try:
            column.validate(full=True)
            return column.cast(pa.string())
        except pa.ArrowInvalid:
            column = column.cast(pa.binary())  # a view of the same bytes, to decode one by one
    changed, values = 0, []
    for raw in column.to_pylist():
        if raw is None:
            values.append(None)
            continue
        try:
            values.append(raw.decode("utf-8"))
        except UnicodeDecodeError:
            changed += 1
            values.append(raw.decode("utf-8", errors="replace"))
    if changed:
        warnings.warn(
            f"URL list column {name!r}: {changed} value(s) are not valid UTF-8; "
            "their invalid bytes were replaced by U+FFFD",
            stacklevel=3,
        )
    return pa.chunked_array([pa.array(values, pa.string())], type=pa.string())


def plan_shards(table: pa.Table, shard_size: int) -> list[SourceShard]:
    """Split ``table`` into consecutive shards of ``shard_size`` rows with content-derived ids."""
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    shards = []
    seen: set[str] = set()
    for ordinal, start in enumerate(range(0, table.num_rows, shard_size)):
        part = table.slice(start, shard_size)
        shard_id = table_fingerprint(part, ["url", "caption"], length=12)
        if shard_id in seen:  # an identical run of rows repeated verbatim: keep ids unique
            shard_id = fingerprint(shard_id, ordinal, length=12)
        seen.add(shard_id)
        shards.append(SourceShard(shard_id=shard_id, ordinal=ordinal, table=part))
    return shards


def write_source_shard(layout: DatasetLayout, name: str, shard: SourceShard) -> tuple[ShardManifest, bool]:
    """Write one source shard (skipped if its manifest already matches); returns (manifest, did_work)."""
    manifest_path = layout.manifest(STAGE, name, shard.shard_id)
    done = is_done(manifest_path, shard.fingerprint)
    if done is not None:
        return done, False
    written = write_parquet_atomic(shard.table, layout.shard(STAGE, name, shard.shard_id), sources_schema)
    manifest = ShardManifest(
        stage=STAGE,
        dataset=name,
        shard_id=shard.shard_id,
        fingerprint=shard.fingerprint,
        input_fingerprint=shard.fingerprint,
        stats={"rows": shard.table.num_rows, "ordinal": shard.ordinal},
    )
    manifest.add_file("output", written, manifest_path)
    write_manifest(manifest_path, manifest)
    return manifest, True
