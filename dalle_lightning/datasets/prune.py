"""Removing shards that are no longer part of a dataset's plan."""

from __future__ import annotations

import fsspec

from dalle_lightning.datasets.layout import DatasetLayout, shard_id_of
from dalle_lightning.datasets.parquet_io import list_parts


def prune_stale(
    layout: DatasetLayout,
    stage: str,
    name: str,
    keep: set[str],
    *sub: str,
    manifests: tuple[str, str] | None = None,
) -> list[str]:
    """Remove shard files under ``<stage>/<name>/<sub…>`` whose ids are not in ``keep``; returns their ids.

    Called after planning so that a shard replaced by a changed one (the last,
    partial shard of an appended URL list) does not linger beside it. Their
    manifests go too: those of ``(stage, name)`` for a top-level folder, or of
    ``manifests=(manifest stage, name)`` when given.
    """
    removed = []
    fs = layout.fs
    manifest_of = manifests or ((stage, name) if not sub else None)
    for path in list_parts(layout.dataset(stage, name, *sub)):
        shard_id = shard_id_of(path)
        if shard_id in keep:
            continue
        fs.rm(fsspec.core.url_to_fs(path)[1])
        if manifest_of is not None:
            manifest = fsspec.core.url_to_fs(layout.manifest(manifest_of[0], manifest_of[1], shard_id))[1]
            if fs.exists(manifest):
                fs.rm(manifest)
        removed.append(shard_id)
    return removed
