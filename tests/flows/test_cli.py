"""The ``dalle`` command line: commands parse their options and call the stage/flow code."""

from __future__ import annotations

import pyarrow as pa
from typer.testing import CliRunner

from dalle_lightning.datasets.layout import DatasetLayout
from dalle_lightning.stages.sources import plan_shards, write_source_shard
from flows.cli import app

runner = CliRunner()


def test_synth_shapes_writes_images_and_index(tmp_path):
    result = runner.invoke(app, ["synth", "shapes", str(tmp_path / "s"), "--n", "12", "--size", "32"])
    assert result.exit_code == 0, result.output
    assert "wrote 12 images" in result.output
    assert len(list((tmp_path / "s" / "images").glob("*.png"))) == 12


def test_synth_shapes_can_make_lone_object_scenes(tmp_path):
    import json

    import pyarrow.parquet as pq

    args = ["synth", "shapes", str(tmp_path / "s"), "--n", "40", "--size", "32", "--p-two-objects", "0"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    objects = pq.read_table(tmp_path / "s" / "shapes.parquet").column("objects").to_pylist()
    assert len(objects) == 40 and all(len(json.loads(o)) == 1 for o in objects)


def test_verify_exit_code_follows_problems(tmp_path):
    layout = DatasetLayout(str(tmp_path))
    table = pa.table({"url": [f"http://127.0.0.1/{i}" for i in range(5)], "caption": ["c"] * 5})
    (shard,) = plan_shards(table, 10)
    write_source_shard(layout, "d", shard)
    ok = runner.invoke(app, ["verify", str(tmp_path)])
    assert ok.exit_code == 0 and "0 problem(s)" in ok.output
    path = layout.shard("sources", "d", shard.shard_id)
    with open(path, "r+b") as f:
        f.truncate(10)
    bad = runner.invoke(app, ["verify", str(tmp_path), "--json"])
    assert bad.exit_code == 1 and "unreadable Parquet" in bad.output


def test_ingest_rejects_unknown_settings(tmp_path):
    result = runner.invoke(app, ["ingest", "--root", str(tmp_path), "--set", "download.timout=3"])
    assert result.exit_code != 0
    assert "unknown field 'timout'" in str(result.exception) or "timout" in result.output


def test_reconstruct_writes_a_grid(tmp_path):
    import torch
    from PIL import Image

    from dalle_lightning.models.dvae import DiscreteVAE, DVAEConfig, save_dvae

    torch.manual_seed(0)
    save_dvae(
        DiscreteVAE(DVAEConfig(image_size=32, n_hid=16, n_blk_per_group=1, group_count=3, vocab_size=64)),
        tmp_path / "d.pt",
    )
    for i in range(3):
        Image.new("RGB", (40, 32), (80 * i, 100, 200)).save(tmp_path / f"{i}.png")
    out = tmp_path / "grid.png"
    args = [
        "reconstruct",
        *(str(tmp_path / f"{i}.png") for i in range(3)),
        "--dvae",
        str(tmp_path / "d.pt"),
        "--out",
        str(out),
    ]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    grid = Image.open(out)
    assert grid.width > grid.height  # 3 columns, 2 rows
