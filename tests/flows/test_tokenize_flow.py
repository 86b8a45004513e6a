"""The ``tokenize`` flow: every filtered shard encoded once per dVAE; a new dVAE re-tokenizes into its own folder."""

from __future__ import annotations

import io
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

import data_schemas.filtered as filtered_schema
from dalle_lightning.datasets.layout import DatasetLayout
from dalle_lightning.datasets.manifest import run_once
from dalle_lightning.datasets.parquet_io import write_parquet_atomic
from dalle_lightning.models.dvae import DiscreteVAE, DVAEConfig, dvae_version, save_dvae
from dalle_lightning.synth.shapes import render
from dalle_lightning.synth.shapes_dataset import ShapesConfig, make_example

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]


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


def _tiny_dvae(path: Path, seed: int) -> str:
    torch.manual_seed(seed)
    model = DiscreteVAE(DVAEConfig(image_size=32, n_hid=16, n_blk_per_group=1, group_count=3, vocab_size=64))
    save_dvae(model, path)
    return str(path)


def test_tokenize_flow_is_incremental_per_dvae(tmp_path, prefect_harness):
    from dalle_lightning.datasets.verify import verify_tree
    from flows.tokenize import run_tokenize

    _filtered_dataset(tmp_path / "root", "t")
    first = _tiny_dvae(tmp_path / "a.pt", seed=0)
    summary = run_tokenize(str(tmp_path / "root"), n_workers=1, dataset="t", dvae=first)
    assert summary["rows"] == 12 and summary["work"]["tokenize"] == {"executed": 2}
    version = dvae_version(first)
    files = sorted((tmp_path / "root" / "tokens" / version / "t").glob("part-*.parquet"))
    assert len(files) == 2
    table = pq.read_table(files[0])
    assert table.schema.field("image_tokens").type == pa.list_(pa.uint16(), 64)  # 8×8 grid
    assert verify_tree(str(tmp_path / "root")).ok

    again = run_tokenize(str(tmp_path / "root"), n_workers=1, dataset="t", dvae=first)
    assert set(again["work"]["tokenize"]) == {"cached"}

    second = _tiny_dvae(tmp_path / "b.pt", seed=1)
    other = run_tokenize(str(tmp_path / "root"), n_workers=1, dataset="t", dvae=second)
    assert other["dvae_version"] != version and other["work"]["tokenize"] == {"executed": 2}
    assert len(list((tmp_path / "root" / "tokens").iterdir())) == 2
