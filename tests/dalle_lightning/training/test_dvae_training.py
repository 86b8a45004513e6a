"""dVAE training: the image stream's split and resume, presets, exact resume, MLflow logging, learning."""

from __future__ import annotations

import io
import json
import math
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from dalle_lightning.data.image_stream import (
    ImageStream,
    InMemoryImageShards,
    ParquetImageShards,
    batches_served,
    consumer_items,
)
from dalle_lightning.data.transforms import to_tensor, to_uint8
from dalle_lightning.models.dvae import DiscreteVAE, load_dvae
from dalle_lightning.models.schedules import cosine_schedule
from dalle_lightning.synth.checker import compare, read_shapes, summarise
from dalle_lightning.synth.shapes import render
from dalle_lightning.synth.shapes_dataset import ShapesConfig, make_example
from dalle_lightning.training.dvae_module import DVAELightningModule
from dalle_lightning.training.dvae_train import (
    PRESETS,
    DVAETrainConfig,
    config_from_yaml,
    load_preset,
    train_dvae,
)

MICRO = DVAETrainConfig.from_dict(
    {
        "model": {
            "image_size": 16,
            "n_hid": 8,
            "n_blk_per_group": 1,
            "group_count": 2,
            "vocab_size": 16,
            "n_init": 8,
            "temperature_steps": 6,
            "kl_weight_steps": 4,
        },
        "max_steps": 6,
        "batch_size": 4,
        "lr": 1e-3,
        "lr_end": 1e-5,
        "lr_steps": 6,
        "num_workers": 0,
        "accelerator": "cpu",
        "devices": 1,
        "log_every_n_steps": 1,
        "recon_every_n_steps": 3,
        "recon_images": 2,
        "checkpoint_every_n_steps": 3,
        "ema_decay": 0.9,
    }
)


def _numbered_images(count: int, size: int = 16) -> list[np.ndarray]:
    """uint8 images whose first pixel holds their index (mod 256) and second its high byte."""
    images = []
    for i in range(count):
        array = np.full((size, size, 3), 128, dtype=np.uint8)
        array[0, 0] = (i % 256, i // 256, 0)
        images.append(array)
    return images


def _index_of(image: torch.Tensor) -> int:
    return int(image[0, 0, 0]) + 256 * int(image[1, 0, 0])


def _jpeg(image: Image.Image) -> np.ndarray:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=95)
    buffer.seek(0)
    return np.asarray(Image.open(buffer).convert("RGB"))


def _shapes(count: int, size: int, seed: int = 0) -> tuple[list[np.ndarray], list[list]]:
    """``count`` shapes images (JPEG q95 round trip, as downloaded) and their ground-truth objects."""
    config = ShapesConfig(n=count, size=size, seed=seed)
    images, truths = [], []
    for i in range(count):
        scene, _, _ = make_example(config, i)
        images.append(_jpeg(render(scene, size)))
        truths.append(list(scene.objects))
    return images, truths


# --- the image stream -----------------------------------------------------------------------------


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("rows", "per_shard", "world_size", "num_workers"),
    [(40, 10, 2, 2), (40, 10, 1, 3), (37, 5, 3, 2), (23, 23, 2, 2), (12, 4, 4, 1), (30, 7, 2, 5)],
)
def test_consumers_are_disjoint_and_cover_every_row_each_epoch(rows, per_shard, world_size, num_workers):
    shards = InMemoryImageShards(_numbered_images(rows), rows_per_shard=per_shard)
    everything = {(s, r) for s in range(len(shards)) for r in range(shards.num_rows(s))}
    for epoch in range(2):
        seen: list[tuple[int, int]] = []
        for rank in range(world_size):
            for worker in range(num_workers):
                items = consumer_items(shards, 7, epoch, rank, world_size, worker, num_workers)
                assert items, (rank, worker)
                seen += items
        assert len(seen) == len(set(seen)) and set(seen) == everything
    first = consumer_items(shards, 7, 0, 0, world_size, 0, num_workers)
    assert first == consumer_items(shards, 7, 0, 0, world_size, 0, num_workers)  # deterministic
    assert first != consumer_items(shards, 7, 1, 0, world_size, 0, num_workers)  # reshuffled per epoch


def test_ranks_read_only_their_own_shards_when_there_are_enough():
    shards = InMemoryImageShards(_numbered_images(40), rows_per_shard=5)  # 8 shards
    per_rank = [
        {s for w in range(2) for s, _ in consumer_items(shards, 0, 0, rank, 4, w, 2)} for rank in range(4)
    ]
    assert all(len(s) == 2 for s in per_rank) and len(set.union(*per_rank)) == 8


@pytest.mark.timeout(120)
def test_loader_workers_stream_disjoint_items_and_resume_exactly():
    images = _numbered_images(30)
    shards = InMemoryImageShards(images, rows_per_shard=7)

    def batches(start_batch: int, count: int, num_workers: int) -> list[list[int]]:
        stream = ImageStream(shards, 16, batch_size=4, seed=3, start_batch=start_batch, rank=0, world_size=1)
        loader = DataLoader(stream, batch_size=4, num_workers=num_workers)
        out = []
        for batch in loader:
            assert batch.shape == (4, 3, 16, 16) and batch.dtype == torch.uint8
            out.append([_index_of(image) for image in batch])
            if len(out) == count:
                break
        return out

    straight = batches(0, 12, num_workers=2)
    # worker w serves batches w, w + 2, …; its first epoch is its part of the rows, each row once
    covered: set[int] = set()
    for worker in range(2):
        part = [7 * s + r for s, r in consumer_items(shards, 3, 0, 0, 1, worker, 2)]
        served = [i for batch in straight[worker::2] for i in batch][: len(part)]
        assert served == part
        covered |= set(part)
    assert covered == set(range(30))
    for start in (1, 4, 5):
        assert batches(start, 12 - start, num_workers=2) == straight[start:]
    assert batches(3, 3, num_workers=0) == batches(0, 6, num_workers=0)[3:]
    assert [batches_served(w, 3, 7) for w in range(3)] == [3, 2, 2]


def test_stream_reads_filtered_parquet_shards_and_crops(tmp_path):
    for shard in range(2):
        blobs = []
        for _ in range(3):
            buffer = io.BytesIO()
            Image.fromarray(_numbered_images(1, 24)[0]).save(buffer, format="PNG")
            blobs.append(buffer.getvalue())
        table = pa.table({"key": [f"{shard}{i}" for i in range(3)], "image": pa.array(blobs, pa.binary())})
        pq.write_table(table, tmp_path / f"part-{shard:05d}.parquet")
    shards = ParquetImageShards(sorted(str(p) for p in tmp_path.glob("part-*.parquet")))
    assert len(shards) == 2 and shards.num_rows(1) == 3
    stream = ImageStream(shards, 16, batch_size=2, seed=0, min_scale=0.5, rank=0, world_size=1)
    items = [item for item, _ in zip(stream, range(7), strict=False)]
    assert all(item.shape == (3, 16, 16) for item in items)
    with pytest.raises(ValueError, match="cannot feed"):
        next(iter(ImageStream(shards, 16, batch_size=2, rank=0, world_size=7)))
    with pytest.raises(ValueError, match="paths is empty"):
        ParquetImageShards([])


# --- config and presets ---------------------------------------------------------------------------


def test_presets_load_as_typed_configs():
    for name in PRESETS:
        config = load_preset(name)
        assert isinstance(config, DVAETrainConfig)
        assert DVAETrainConfig.from_dict(config.to_dict()) == config
    paper = load_preset("paper").model
    assert (paper.image_size, paper.grid_size, paper.vocab_size, paper.n_hid) == (256, 32, 8192, 256)
    assert (paper.n_blk_per_group, paper.group_count, paper.kl_weight_end) == (2, 4, 6.6)
    small = load_preset("small").model
    assert (small.image_size, small.grid_size) == (128, 16) and 1024 <= small.vocab_size <= 8192
    tiny = load_preset("tiny").model
    assert tiny.image_size in (32, 64) and tiny.grid_size in (8, 16) and tiny.vocab_size >= 128


def test_unknown_preset_sections_and_fields_are_value_errors():
    with pytest.raises(ValueError, match="unknown dVAE preset 'huge'"):
        load_preset("huge")
    with pytest.raises(ValueError, match="unknown section"):
        config_from_yaml("model: {}\noptim: {}\n")
    with pytest.raises(ValueError, match="unknown field 'n_heads'"):
        config_from_yaml("model: {n_heads: 4}\n")
    with pytest.raises(ValueError, match="unknown field 'epochs'"):
        config_from_yaml("train: {epochs: 4}\n")
    with pytest.raises(ValueError, match="batch_size"):
        config_from_yaml("train: {batch_size: 0}\n")
    with pytest.raises(ValueError, match="precision"):
        config_from_yaml("train: {precision: fp8}\n")


def test_module_learning_rate_follows_the_cosine_schedule():
    module = DVAELightningModule(MICRO.model, lr=1e-3, lr_end=1e-5, lr_steps=10)
    opt = module.configure_optimizers()
    optimizer, scheduler = opt["optimizer"], opt["lr_scheduler"]["scheduler"]
    assert optimizer.defaults["betas"] == (0.9, 0.999) and optimizer.defaults["eps"] == 1e-8
    assert optimizer.defaults["weight_decay"] == 1e-4
    for step in range(12):
        expected = 1e-5 + 0.5 * (1e-3 - 1e-5) * (1 + math.cos(math.pi * min(step, 10) / 10))
        assert optimizer.param_groups[0]["lr"] == pytest.approx(expected, rel=1e-9)
        optimizer.step()
        scheduler.step()


# --- training runs --------------------------------------------------------------------------------


def _weights(path: str) -> dict[str, torch.Tensor]:
    return torch.load(path, weights_only=True)["state_dict"]


@pytest.mark.timeout(180)
def test_resumed_training_gives_the_same_weights(tmp_path):
    shards = InMemoryImageShards(_numbered_images(40), rows_per_shard=8)
    start = time.perf_counter()
    straight = train_dvae(MICRO, shards=shards, out_dir=tmp_path / "straight")
    half = train_dvae(replace(MICRO, max_steps=3), shards=shards, out_dir=tmp_path / "half")
    resumed = train_dvae(MICRO, shards=shards, out_dir=tmp_path / "resumed", resume_from=half["checkpoint"])
    elapsed = time.perf_counter() - start
    assert straight["steps"] == resumed["steps"] == 6 and half["steps"] == 3
    a, b = (torch.load(r["checkpoint"], weights_only=False)["state_dict"] for r in (straight, resumed))
    assert set(a) == set(b) and any(k.startswith("ema.") for k in a)
    for key in a:
        assert torch.allclose(a[key], b[key], rtol=1e-5, atol=1e-7), key
    c = torch.load(half["checkpoint"], weights_only=False)["state_dict"]
    assert not torch.allclose(a["model.decoder.blocks.0.weight"], c["model.decoder.blocks.0.weight"])
    exported = load_dvae(straight["model_path"])  # the EMA weights
    for key, value in exported.state_dict().items():
        assert torch.allclose(value, a[f"ema.{key}"]), key
    print(f"\nresume test: 6 steps + 3 + resumed 3 steps in {elapsed:.1f} s")


@pytest.mark.timeout(180)
def test_decoder_finetune_phase_trains_only_the_decoder_from_the_tokens(tmp_path):
    shards = InMemoryImageShards(_numbered_images(40), rows_per_shard=8)
    base = replace(MICRO, ema_decay=None)
    first = train_dvae(replace(base, max_steps=3), shards=shards, out_dir=tmp_path / "a")
    tuned = train_dvae(replace(base, decoder_finetune_steps=3), shards=shards, out_dir=tmp_path / "b")
    a, b = (torch.load(r["checkpoint"], weights_only=False)["state_dict"] for r in (first, tuned))
    for key in a:
        if key.startswith("model.encoder."):
            assert torch.equal(a[key], b[key]), key  # the first 3 updates alike, then frozen
    assert not torch.equal(a["model.decoder.blocks.0.weight"], b["model.decoder.blocks.0.weight"])
    with pytest.raises(ValueError, match="decoder_finetune_steps"):
        replace(base, decoder_finetune_steps=6)


def test_decoder_finetune_restarts_the_learning_rate():
    module = DVAELightningModule(
        MICRO.model, lr=1e-3, lr_end=1e-5, lr_steps=4, decoder_finetune_from=4, decoder_finetune_lr=5e-4
    )
    assert module._lr_factor(0) * 1e-3 == pytest.approx(1e-3)
    assert module._lr_factor(3) * 1e-3 == pytest.approx(cosine_schedule(3, 4, 1e-3, 1e-5))
    assert module._lr_factor(4) * 1e-3 == pytest.approx(5e-4)  # restarted


def test_token_reconstruction_loss_only_reaches_the_decoder():
    model = DiscreteVAE(MICRO.model)
    x = torch.rand(2, 3, 16, 16)
    loss, reconstruction = model.token_reconstruction_loss(x)
    loss.backward()
    assert reconstruction.shape == x.shape
    assert all(p.grad is None for p in model.encoder.parameters())
    assert all(p.grad is not None for p in model.decoder.parameters())
    expected = model.decode_indices(model.get_codebook_indices(x))
    torch.testing.assert_close(reconstruction, expected)


@pytest.mark.timeout(180)
def test_training_logs_params_curves_and_reconstruction_grids_to_mlflow(tmp_path):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    client = MlflowClient(uri)
    experiment = client.create_experiment("dvae-test", artifact_location=(tmp_path / "artifacts").as_uri())
    run = client.create_run(experiment)
    shards = InMemoryImageShards(_numbered_images(20), rows_per_shard=20)
    result = train_dvae(
        MICRO, shards=shards, out_dir=tmp_path / "out", tracking_uri=uri, run_id=run.info.run_id
    )
    data = client.get_run(run.info.run_id).data
    assert data.params["model.vocab_size"] == "16" and data.params["train.max_steps"] == "6"
    history = client.get_metric_history(run.info.run_id, "train/loss")
    assert len(history) == 6
    for key in ("train/psnr", "train/codebook_usage", "train/codebook_usage_window", "train/perplexity"):
        assert key in data.metrics, key
    artifacts = [a.path for a in client.list_artifacts(run.info.run_id, "images")]
    assert any("reconstructions" in path for path in artifacts), artifacts
    grids = sorted((tmp_path / "out" / "reconstructions").glob("*.png"))
    assert [p.name for p in grids] == ["step-0000003.png", "step-0000006.png"]
    grid = Image.open(grids[-1])
    assert grid.size == (2 * 2 * 16, 2 * 2 * 16)  # two images, originals above reconstructions, ×2
    assert result["metrics"]["train/loss"] == pytest.approx(history[-1].value)


@pytest.mark.timeout(240)
def test_module_entry_point_trains_from_the_filtered_dataset(tmp_path):
    folder = tmp_path / "data" / "filter" / "demo"
    folder.mkdir(parents=True)
    blobs = []
    for array in _numbered_images(8, 24):
        buffer = io.BytesIO()
        Image.fromarray(array).save(buffer, format="JPEG")
        blobs.append(buffer.getvalue())
    pq.write_table(pa.table({"image": pa.array(blobs, pa.binary())}), folder / "part-00000.parquet")
    config = tmp_path / "config.json"
    config.write_text(json.dumps(replace(MICRO, max_steps=2, ema_decay=None).to_dict()))
    out = tmp_path / "result.json"
    command = [
        sys.executable,
        "-m",
        "dalle_lightning.training.dvae_train",
        "--config-json",
        str(config),
        "--data-root",
        str(tmp_path / "data"),
        "--dataset",
        "demo",
        "--out-dir",
        str(tmp_path / "run"),
        "--result-json",
        str(out),
    ]
    subprocess.run(command, check=True, capture_output=True, timeout=200)
    result = json.loads(out.read_text())
    assert (
        result["steps"] == 2 and Path(result["model_path"]).exists() and Path(result["checkpoint"]).exists()
    )
    with pytest.raises(ValueError, match="no part"):
        train_dvae(MICRO, data_root=str(tmp_path / "data"), dataset="missing", out_dir=tmp_path / "x")


@pytest.mark.slow  # fails: 95 % is not reached (67 % at the preset's 800 updates in 88 s, 2026-12-06; issue 3)
@pytest.mark.timeout(600)
def test_tiny_dvae_overfits_64_shapes_images_so_the_checker_reads_them_back(tmp_path):
    """The issue's learning test: ≥ 95 % of the token reconstructions read back as the ground truth."""
    torch.set_num_threads(1)
    config = replace(load_preset("tiny"), recon_every_n_steps=10_000, checkpoint_every_n_steps=10_000)
    images, truths = _shapes(64, config.model.image_size)
    start = time.perf_counter()
    result = train_dvae(config, shards=InMemoryImageShards(images, rows_per_shard=64), out_dir=tmp_path)
    elapsed = time.perf_counter() - start
    model = load_dvae(result["model_path"])
    x = to_tensor(images)
    reconstructions = to_uint8(model.decode_indices(model.get_codebook_indices(x)))
    rates = summarise([compare(read_shapes(r), t) for r, t in zip(reconstructions, truths, strict=True)])
    print(f"\nlearning test: {config.max_steps} steps in {elapsed:.0f} s, checker agreement {rates}")
    assert rates["all"] >= 0.95, rates
