"""The dataset tree under one root URI (see DESIGN.md "Datasets and shards").

    <root>/sources/<name>/part-<shard>.parquet
    <root>/download/<name>/part-<shard>.parquet   (+ _stats/<shard>.json: img2dataset's stats)
    <root>/filter/<name>/part-<shard>.parquet      and  filter/<name>/rejects/part-<shard>.parquet
    <root>/_manifests/<stage>/<name>/<shard>.json

A shard keeps its id through every stage; only the fingerprint changes.
The root may be a local path or any fsspec URL (``s3://bucket/prefix``).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

import fsspec

MODELS_DIR_ENV = "DALLE_MODELS_DIR"
"""Local folder for the training runs of a dataset root on an object store (default ``~/.cache/dalle-lightning/models``)."""

PART_RE = re.compile(r"^part-([0-9a-f]+)\.parquet$")

# stage folder -> schema name of the Parquet files directly inside <stage>/<name>/
STAGE_SCHEMAS = {"sources": "sources", "download": "downloaded", "filter": "filtered"}
SUBDIR_SCHEMAS = {("filter", "rejects"): "rejects"}


def part_name(shard_id: str) -> str:
    """File name of a shard: ``part-<shard id>.parquet``."""
    return f"part-{shard_id}.parquet"


def shard_id_of(path: str) -> str:
    """Shard id of a ``part-<id>.parquet`` path; ``ValueError`` for other names."""
    match = PART_RE.match(path.rstrip("/").rsplit("/", 1)[-1])
    if not match:
        raise ValueError(f"not a shard file name (expected part-<hex id>.parquet): {path!r}")
    return match.group(1)


@dataclass(frozen=True)
class DatasetLayout:
    """Paths of every dataset under ``root`` (a local path or fsspec URL)."""

    root: str

    def __post_init__(self) -> None:
        if not self.root:
            raise ValueError("root must be a non-empty path or URL")
        object.__setattr__(self, "root", self.root.rstrip("/"))

    @property
    def fs(self) -> fsspec.AbstractFileSystem:
        return fsspec.core.url_to_fs(self.root)[0]

    def join(self, *parts: str) -> str:
        return "/".join([self.root, *parts])

    def dataset(self, stage: str, name: str, *sub: str) -> str:
        """Folder of dataset ``name`` at ``stage`` (``sources``, ``download``, ``filter``, …)."""
        return self.join(stage, name, *sub)

    def shard(self, stage: str, name: str, shard_id: str, *sub: str) -> str:
        return self.join(stage, name, *sub, part_name(shard_id))

    @property
    def is_local(self) -> bool:
        return "://" not in self.root or self.root.startswith(("file://", "local://"))

    def model_dir(self, kind: str, run: str) -> str:
        """Local folder of one training run (``kind``: dvae, dalle, clip): ``<root>/models/<kind>/<run>``.

        Training writes checkpoints as files, so for a root on an object store the
        folder is local instead: ``$DALLE_MODELS_DIR/<protocol>/<bucket>/<prefix>/<kind>/<run>``
        (the models themselves are logged to MLflow, which keeps them with its artifacts).
        """
        if self.is_local:
            return self.join("models", kind, run).removeprefix("file://").removeprefix("local://")
        protocol, rest = self.root.split("://", 1)
        base = os.environ.get(MODELS_DIR_ENV) or os.path.join(
            os.path.expanduser("~"), ".cache", "dalle-lightning", "models"
        )
        return os.path.join(base, protocol, *rest.split("/"), kind, run)

    def manifest(self, stage: str, name: str, shard_id: str) -> str:
        return self.join("_manifests", stage, name, f"{shard_id}.json")

    def manifests(self, stage: str, name: str) -> str:
        return self.join("_manifests", stage, name)
