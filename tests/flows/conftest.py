"""Fixtures for the flow tests: small datasets written the way the stages write them."""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path

import pyarrow as pa
import pytest

import data_schemas.filtered as filtered_schema
from dalle_lightning.datasets.layout import DatasetLayout
from dalle_lightning.datasets.manifest import run_once
from dalle_lightning.datasets.parquet_io import write_parquet_atomic
from dalle_lightning.synth.shapes import render
from dalle_lightning.synth.shapes_dataset import ShapesConfig, make_example


@pytest.fixture
def write_filtered_dataset() -> Callable[..., None]:
    """``write(root, name, shards=2, per_shard=6)``: a ``filter/<name>`` dataset of 64 px shapes images."""
    return _filtered_dataset


def _filtered_dataset(root: Path, name: str, shards: int = 2, per_shard: int = 6) -> None:
    layout = DatasetLayout(str(root))
    config = ShapesConfig(n=shards * per_shard, size=64, seed=3)
    for s in range(shards):
        shard_id = f"{s:012x}"
        rows = []
        for r in range(per_shard):
            scene, caption, _ = make_example(config, s * per_shard + r)
            buffer = io.BytesIO()
            render(scene, 64).save(buffer, format="JPEG", quality=95)
            rows.append(
                {
                    "key": f"{shard_id}-{r:06d}",
                    "url": f"http://127.0.0.1/{s}/{r}",
                    "caption": caption,
                    "image": buffer.getvalue(),
                    "width": 64,
                    "height": 64,
                    "original_width": 64,
                    "original_height": 64,
                    "sha256": f"{s}{r}".ljust(64, "0"),
                    "phash": s * 100 + r,
                    "caption_len": len(caption),
                }
            )
        table = pa.Table.from_pylist(rows, schema=filtered_schema.SCHEMA)
        path = layout.shard("filter", name, shard_id)
        run_once(
            layout.manifest("filter", name, shard_id),
            f"fp-{s}",
            lambda t=table, p=path: ({"output": write_parquet_atomic(t, p, filtered_schema)}, {}),
            stage="filter",
            dataset=name,
            shard_id=shard_id,
            input_fingerprint="in",
        )
