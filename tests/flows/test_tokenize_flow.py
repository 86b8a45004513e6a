"""The ``tokenize`` flow: every filtered shard encoded once per dVAE; a new dVAE re-tokenizes into its own folder."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from dalle_lightning.models.dvae import DiscreteVAE, DVAEConfig, dvae_version, save_dvae

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]


def _tiny_dvae(path: Path, seed: int) -> str:
    torch.manual_seed(seed)
    model = DiscreteVAE(DVAEConfig(image_size=32, n_hid=16, n_blk_per_group=1, group_count=3, vocab_size=64))
    save_dvae(model, path)
    return str(path)


def test_tokenize_flow_is_incremental_per_dvae(tmp_path, prefect_harness, write_filtered_dataset):
    from dalle_lightning.datasets.verify import verify_tree
    from flows.tokenize_images import run_tokenize

    write_filtered_dataset(tmp_path / "root", "t")
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
