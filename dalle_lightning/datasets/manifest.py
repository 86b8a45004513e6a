"""Per-shard completion records: what was written, from which inputs, with which settings.

A manifest is written after its shard file is in place. A stage skips a shard
whose manifest has the same fingerprint and whose file still matches it, so
finished work is skipped even if the Prefect database is wiped.
"""

from __future__ import annotations

import json
import posixpath
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import fsspec

from dalle_lightning.datasets.parquet_io import WrittenFile


@dataclass
class ShardManifest:
    """Completion record of one shard of one stage."""

    stage: str
    """Stage that wrote the shard (``sources``, ``download``, ``filter``)."""
    dataset: str
    """Dataset name (the ``<name>`` folder)."""
    shard_id: str
    """Content-derived shard id, stable across stages."""
    fingerprint: str
    """hash(input fingerprint, stage config, stage version): equal means the shard is up to date."""
    input_fingerprint: str
    """Fingerprint of what the stage read for this shard."""
    files: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Role (``output``, ``rejects``) -> {path, rows, bytes, sha256} of each file written;
    ``path`` is relative to the manifest's folder, so a dataset root can be moved or copied."""
    stats: dict[str, Any] = field(default_factory=dict)
    """Counts and engine statistics (e.g. img2dataset's per-shard stats)."""
    created: float = field(default_factory=time.time)
    """Unix time the shard was completed."""

    def add_file(self, role: str, written: WrittenFile, manifest_path: str) -> None:
        self.files[role] = {
            "path": relative_path(written.path, manifest_path),
            "rows": written.rows,
            "bytes": written.bytes,
            "sha256": written.sha256,
        }

    def file_path(self, role: str, manifest_path: str) -> str:
        """Absolute path/URL of the file recorded under ``role``."""
        return resolve_path(self.files[role]["path"], manifest_path)


def _split(url: str) -> tuple[str, str]:
    protocol, sep, rest = url.partition("://")
    return (protocol + sep, rest) if sep else ("", url)


def relative_path(path: str, manifest_path: str) -> str:
    """``path`` relative to the folder of ``manifest_path`` (both local paths or URLs of one store)."""
    _, target = _split(path)
    _, manifest = _split(manifest_path)
    return posixpath.relpath(target, posixpath.dirname(manifest))


def resolve_path(relative: str, manifest_path: str) -> str:
    """Inverse of :func:`relative_path`."""
    prefix, manifest = _split(manifest_path)
    return prefix + posixpath.normpath(posixpath.join(posixpath.dirname(manifest), relative))


def write_manifest(path: str, manifest: ShardManifest) -> None:
    fs, fs_path = fsspec.core.url_to_fs(path)
    fs.makedirs(fs_path.rsplit("/", 1)[0], exist_ok=True)
    with fs.open(fs_path, "w") as f:
        json.dump(asdict(manifest), f, indent=1, sort_keys=True)


def read_manifest(path: str) -> ShardManifest | None:
    """The manifest at ``path``, or None if absent or unreadable (treated as not done)."""
    fs, fs_path = fsspec.core.url_to_fs(path)
    try:
        with fs.open(fs_path, "r") as f:
            return ShardManifest(**json.load(f))
    except (FileNotFoundError, json.JSONDecodeError, TypeError):
        return None


def is_done(path: str, fingerprint: str) -> ShardManifest | None:
    """The manifest if the shard is complete with ``fingerprint`` and its files exist with the recorded sizes."""
    manifest = read_manifest(path)
    if manifest is None or manifest.fingerprint != fingerprint:
        return None
    for role, info in manifest.files.items():
        fs, fs_path = fsspec.core.url_to_fs(manifest.file_path(role, path))
        try:
            if fs.size(fs_path) != info["bytes"]:
                return None
        except FileNotFoundError:
            return None
    return manifest


def run_once(
    manifest_path: str,
    fingerprint: str,
    work: Callable[[], tuple[dict[str, WrittenFile], dict[str, Any]]],
    *,
    stage: str,
    dataset: str,
    shard_id: str,
    input_fingerprint: str,
) -> tuple[ShardManifest, bool]:
    """Do ``work`` for a shard unless its manifest shows it done with ``fingerprint``.

    ``work`` writes the shard's files (atomically) and returns ({role: WrittenFile}, stats).
    The manifest is written last, so a crash before it leaves the shard "not done".
    Returns (manifest, did_work).
    """
    done = is_done(manifest_path, fingerprint)
    if done is not None:
        return done, False
    files, stats = work()
    manifest = ShardManifest(
        stage=stage,
        dataset=dataset,
        shard_id=shard_id,
        fingerprint=fingerprint,
        input_fingerprint=input_fingerprint,
        stats=stats,
    )
    for role, written in files.items():
        manifest.add_file(role, written, manifest_path)
    write_manifest(manifest_path, manifest)
    return manifest, True
