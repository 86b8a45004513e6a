"""Fingerprints that tie models and derived datasets to exactly what they were made from."""

from __future__ import annotations

import json

import fsspec

from dalle_lightning.datasets.fingerprint import fingerprint
from dalle_lightning.datasets.layout import DatasetLayout


def dataset_fingerprint(layout: DatasetLayout, stage: str, name: str) -> str:
    """hash of the per-shard fingerprints recorded in ``_manifests/<stage>/<name>`` (order-independent).

    ``ValueError`` if the dataset has no shards: a model cannot be trained on nothing.
    """
    fs, base = fsspec.core.url_to_fs(layout.manifests(stage, name))
    if not fs.exists(base):
        raise ValueError(
            f"no {stage} dataset {name!r} under {layout.root} (run the stage that makes it first)"
        )
    fingerprints = []
    for path in sorted(fs.ls(base, detail=False)):
        if path.endswith(".json"):
            with fs.open(path, "r") as f:
                fingerprints.append(json.load(f)["fingerprint"])
    if not fingerprints:
        raise ValueError(f"{stage} dataset {name!r} under {layout.root} has no finished shards")
    return fingerprint(stage, name, sorted(fingerprints))
