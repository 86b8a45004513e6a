"""The ``embed`` flow (every filtered shard once per CLIP, a new CLIP into its own folder) and ``dalle search``."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from dalle_lightning.stages.bpe import BPEConfig, train_bpe
from dalle_lightning.synth.shapes_dataset import ShapesConfig, make_example

clip = pytest.importorskip(
    "dalle_lightning.models.clip", reason="dalle_lightning.models.clip is not there yet"
)
pytest.importorskip("faiss", reason="faiss-cpu is not installed (the `search` extra)")

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]


def _tiny_clip(path: Path, seed: int) -> str:
    config = ShapesConfig(n=40, size=64, seed=3)
    tokenizer = train_bpe([make_example(config, i)[1] for i in range(40)], BPEConfig(vocab_size=320))
    torch.manual_seed(seed)
    model = clip.ClipModel(
        clip.ClipConfig(
            image_size=32,
            patch_size=8,
            vision_width=32,
            vision_layers=1,
            vision_heads=2,
            text_len=16,
            text_vocab=tokenizer.get_vocab_size(),
            text_width=32,
            text_layers=1,
            text_heads=2,
            embed_dim=16,
        )
    )
    clip.save_clip(model, path, tokenizer)
    return str(path)


def test_embed_flow_is_incremental_per_clip_and_search_finds_images(
    tmp_path, prefect_harness, write_filtered_dataset, monkeypatch
):
    from dalle_lightning.datasets.verify import verify_tree
    from dalle_lightning.stages.embed import clip_version
    from flows.cli import app
    from flows.embed import run_embed

    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # one torch thread in each Dask worker process
    root = tmp_path / "root"
    write_filtered_dataset(root, "t")
    first = _tiny_clip(tmp_path / "a.pt", seed=0)
    summary = run_embed(str(root), n_workers=1, dataset="t", clip=first)
    assert summary["rows"] == 12 and summary["work"]["embed"] == {"executed": 2}
    version = clip_version(first)
    assert summary["clip_version"] == version
    files = sorted((root / "embeddings" / version / "t").glob("part-*.parquet"))
    assert [f.name for f in files] == [f.name for f in sorted((root / "filter" / "t").glob("part-*.parquet"))]
    table = pq.read_table(files[0])
    assert table.schema.field("image_embedding").type == pa.list_(pa.float32(), 16)
    report = verify_tree(str(root))  # every file validates against its schema and manifest
    assert report.ok, report.problems
    assert report.checked == 4

    again = run_embed(str(root), n_workers=1, dataset="t", clip=first)
    assert set(again["work"]["embed"]) == {"cached"}

    second = _tiny_clip(tmp_path / "b.pt", seed=1)
    other = run_embed(str(root), n_workers=1, dataset="t", clip=second)
    assert other["clip_version"] != version and other["work"]["embed"] == {"executed": 2}
    assert len(list((root / "embeddings").iterdir())) == 2
    assert verify_tree(str(root)).ok

    out = tmp_path / "grid.png"
    args = ["search", "a red circle", "--k", "5", "--root", str(root), "--dataset", "t", "--clip", first]
    result = CliRunner().invoke(app, [*args, "--out", str(out)])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].split()[:3] == ["rank", "score", "key"]
    assert [line.split()[0] for line in lines[1:6]] == ["1", "2", "3", "4", "5"]
    assert f"wrote {out} (5 images)" in result.output
    assert Image.open(out).format == "PNG"

    missing = CliRunner().invoke(app, [*args[:-1], str(tmp_path / "nope.pt")])
    assert missing.exit_code != 0
