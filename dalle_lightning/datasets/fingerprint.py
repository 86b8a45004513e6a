"""Content fingerprints: a stage's work on a shard is keyed by hash(input, config, stage version)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any

import pyarrow as pa


def _canonical(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {"__type__": type(value).__name__, **_canonical(dataclasses.asdict(value))}
    if isinstance(value, dict):
        return {str(k): _canonical(v) for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))}
    if isinstance(value, (list, tuple, set, frozenset)):
        items = [_canonical(v) for v in value]
        return sorted(items, key=repr) if isinstance(value, (set, frozenset)) else items
    if isinstance(value, bytes):
        return hashlib.sha256(value).hexdigest()
    return value


def fingerprint(*parts: Any, length: int = 16) -> str:
    """A stable hex digest of ``parts`` (strings, numbers, dicts, lists, dataclass configs)."""
    payload = json.dumps([_canonical(p) for p in parts], sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(payload.encode()).hexdigest()[:length]


def table_fingerprint(table: pa.Table, columns: list[str] | None = None, length: int = 16) -> str:
    """A digest of the contents of ``columns`` (default: all) of ``table``, row order included."""
    digest = hashlib.sha256()
    for name in columns or table.column_names:
        digest.update(name.encode())
        for value in table.column(name).to_pylist():
            digest.update(b"\x00" if value is None else repr(value).encode())
            digest.update(b"\x1f")
    return digest.hexdigest()[:length]
