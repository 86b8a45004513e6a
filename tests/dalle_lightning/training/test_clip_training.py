"""CLIP training: presets, config checks, optimiser and schedule, exact resume, DDP negatives, and learning.

The learning test is the issue's: a ``tiny`` CLIP trained on shapes images
rendered here retrieves the right one of 100 held-out images for each of
their (distinct) captions at least 80% of the time.
"""

from __future__ import annotations

import io
import json
import math
import os
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import lightning as L
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from dalle_lightning.data.pair_stream import InMemoryPairShards
from dalle_lightning.data.transforms import to_tensor
from dalle_lightning.datasets.layout import DatasetLayout
from dalle_lightning.models.clip import load_clip, retrieval_recall
from dalle_lightning.stages.bpe import BPEConfig, CaptionEncoder, save_bpe, train_bpe
from dalle_lightning.synth.shapes import render
from dalle_lightning.synth.shapes_dataset import ShapesConfig, make_example
from dalle_lightning.training.clip_module import ClipLightningModule, decay_groups, in_batch_accuracy
from dalle_lightning.training.clip_train import (
    PRESETS,
    ClipTrainConfig,
    config_from_yaml,
    load_preset,
    train_clip,
)

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Small models: one thread is as fast, and does not stall when other work holds the other cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


MICRO = ClipTrainConfig.from_dict(
    {
        "model": {
            "image_size": 16,
            "patch_size": 4,
            "vision_width": 32,
            "vision_layers": 1,
            "vision_heads": 2,
            "text_len": 12,
            "text_vocab": 300,
            "text_width": 32,
            "text_layers": 1,
            "text_heads": 2,
            "embed_dim": 16,
        },
        "max_steps": 6,
        "batch_size": 4,
        "lr": 1e-3,
        "warmup_steps": 2,
        "lr_end": 1e-5,
        "lr_steps": 6,  # not max_steps: a run cut short to resume has the same schedule
        "shuffle_buffer": 8,
        "num_workers": 0,
        "accelerator": "cpu",
        "devices": 1,
        "log_every_n_steps": 1,
        "checkpoint_every_n_steps": 3,
    }
)


def _shapes(first: int, count: int, size: int, seed: int = 0) -> tuple[list, list[str], list]:
    """Images (uint8 HWC), captions and scenes of shapes examples ``first … first + count - 1``."""
    config = ShapesConfig(n=first + count, size=size, seed=seed)
    images, captions, scenes = [], [], []
    for i in range(first, first + count):
        scene, caption, _ = make_example(config, i)
        images.append(np.asarray(render(scene, size)))
        captions.append(caption)
        scenes.append(scene)
    return images, captions, scenes


@pytest.fixture(scope="module")
def micro_data() -> tuple[InMemoryPairShards, object]:
    images, captions, _ = _shapes(0, 24, 16)
    tokenizer = train_bpe(captions, BPEConfig(vocab_size=300, min_frequency=1))
    return InMemoryPairShards(images, captions, rows_per_shard=10), tokenizer


def test_presets_load_as_typed_configs():
    for name in PRESETS:
        config = load_preset(name)
        assert isinstance(config, ClipTrainConfig) and config.model.image_size % config.model.patch_size == 0
    tiny = load_preset("tiny")
    assert (tiny.model.image_size, tiny.model.patch_size) == (32, 4)
    assert 64 <= tiny.model.vision_width <= 128 and 2 <= tiny.model.vision_layers <= 4
    assert tiny.model.init_logit_scale == pytest.approx(math.log(1 / 0.07))
    assert tiny.crop_min_scale == 1.0  # captions name positions
    assert ClipTrainConfig.from_dict(tiny.to_dict()) == tiny
    assert tiny.flat_params()["model.vision_width"] == tiny.model.vision_width
    with pytest.raises(ValueError, match="unknown CLIP preset"):
        load_preset("huge")


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("model: {}\noptim: {}", "unknown section"),
        ("model: {vision_widht: 64}", "vision_widht"),
        ("train: {model: {}}", "own section"),
        ("train: {lr: 0}", "lr must be > 0"),
        ("train: {lr_end: 1.0}", "lr_end"),
        ("train: {crop_min_scale: 0}", "crop_min_scale"),
        ("train: {precision: fp8}", "precision"),
        ("train: {grad_clip: -1}", "grad_clip"),
        ("train: {object_caption_size_words: 1.5}", "object_caption_size_words must be in"),
        ("model: {image_size: 30}", "image_size"),
    ],
)
def test_unknown_sections_fields_and_bad_values_are_value_errors(text, match):
    with pytest.raises(ValueError, match=match):
        config_from_yaml(text)


def test_optimiser_decays_matrices_only_and_lr_warms_up_then_follows_a_cosine():
    module = ClipLightningModule(
        MICRO.model, lr=1e-3, lr_end=1e-5, warmup_steps=4, lr_steps=20, weight_decay=0.2
    )
    decayed, plain = decay_groups(module.model, 0.2)
    assert decayed["weight_decay"] == 0.2 and plain["weight_decay"] == 0.0
    assert any(p is module.model.logit_scale for p in plain["params"])
    assert any(p is module.model.image_encoder.class_token for p in plain["params"])
    assert all(p.ndim >= 2 for p in decayed["params"]) and all(p.ndim < 2 for p in plain["params"])
    assert len(decayed["params"]) + len(plain["params"]) == len(list(module.model.parameters()))
    lrs = [1e-3 * module._lr_factor(step) for step in range(25)]
    assert lrs[0] == pytest.approx(1e-3 / 5) and lrs[3] == pytest.approx(1e-3 * 4 / 5)
    assert lrs[4] == pytest.approx(1e-3) and lrs[12] == pytest.approx((1e-3 + 1e-5) / 2)
    assert lrs[20] == lrs[24] == pytest.approx(1e-5)


def test_in_batch_accuracy_counts_both_directions():
    logits = torch.eye(4) * 10
    assert float(in_batch_accuracy(logits)) == 1.0
    logits[0] = torch.tensor([5.0, 20.0, 0.0, 0.0])  # image 0 prefers text 1, and text 1 image 0
    assert float(in_batch_accuracy(logits)) == pytest.approx(3 / 4)


def test_mismatched_bpe_is_a_value_error(tmp_path, micro_data):
    shards, tokenizer = micro_data
    config = replace(MICRO, model=replace(MICRO.model, text_vocab=100))
    with pytest.raises(ValueError, match="text_vocab=100"):
        train_clip(config, bpe=tokenizer, shards=shards, out_dir=tmp_path)
    with pytest.raises(ValueError, match="data_root and dataset"):
        train_clip(MICRO, bpe=tokenizer, out_dir=tmp_path)


class BatchRecorder(L.Callback):
    """Keeps every training batch."""

    def __init__(self) -> None:
        self.batches: list[tuple[torch.Tensor, torch.Tensor]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.batches.append((batch[0].clone(), batch[1].clone()))


@pytest.mark.timeout(90)
def test_resumed_training_sees_the_same_data_and_gives_the_same_weights(tmp_path, micro_data):
    shards, tokenizer = micro_data
    config = replace(MICRO, bpe_dropout=0.2)  # shuffle buffer and BPE dropout: every random draw of the data
    runs = {}
    for name, steps, resume in (("straight", 6, None), ("half", 3, None), ("resumed", 6, "half")):
        recorder = BatchRecorder()
        result = train_clip(
            replace(config, max_steps=steps),
            bpe=tokenizer,
            shards=shards,
            out_dir=tmp_path / name,
            resume_from=runs[resume][0]["checkpoint"] if resume else None,
            callbacks=[recorder],
        )
        runs[name] = (result, recorder.batches)
    (straight, seen), (half, first), (resumed, then) = runs["straight"], runs["half"], runs["resumed"]
    assert straight["steps"] == resumed["steps"] == 6 and half["steps"] == 3
    for (a_images, a_text), (b_images, b_text) in zip(seen, first + then, strict=True):
        assert torch.equal(a_images, b_images) and torch.equal(a_text, b_text)
    a, b = (torch.load(r["checkpoint"], weights_only=True)["state_dict"] for r in (straight, resumed))
    assert set(a) == set(b)
    for key in a:
        assert torch.allclose(a[key], b[key], rtol=1e-5, atol=1e-7), key
    c = torch.load(half["checkpoint"], weights_only=True)["state_dict"]
    assert not torch.allclose(a["model.image_encoder.proj.weight"], c["model.image_encoder.proj.weight"])
    exported, exported_tokenizer = load_clip(straight["model_path"])
    for key, value in exported.state_dict().items():
        assert torch.equal(value, a[f"model.{key}"]), key
    assert exported_tokenizer.to_str() == tokenizer.to_str()
    for name in ("train/loss", "train/logit_scale", "train/accuracy", "train/lr"):
        assert name in straight["metrics"], name
    assert straight["metrics"]["train/loss"] == pytest.approx(resumed["metrics"]["train/loss"], rel=1e-5)


def _write_filtered(root: Path, name: str, images: list, captions: list[str]) -> None:
    """One ``filter/<name>`` shard with the columns the pair stream reads (image bytes and caption)."""
    encoded = []
    for image in images:
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="PNG")
        encoded.append(buffer.getvalue())
    path = Path(DatasetLayout(str(root)).shard("filter", name, "000000000000"))
    path.parent.mkdir(parents=True)
    pq.write_table(pa.table({"image": encoded, "caption": captions}), path)


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_ddp_gathers_the_negatives_of_every_rank(tmp_path):
    """DDP (gloo, 2 ranks × 4) through the entry point vs one process × 8 on the same rows and pairs.

    The data is one global batch (8 rows, one shard): each rank's share of an
    epoch is one batch of 4, and with the embeddings gathered over the ranks
    both runs score the same 8 × 8 pairs, so losses and updates agree.
    """
    images, captions, _ = _shapes(0, 8, 16)
    tokenizer = train_bpe(captions, BPEConfig(vocab_size=300, min_frequency=1))
    _write_filtered(tmp_path / "root", "t", images, captions)
    bpe_path = save_bpe(tokenizer, str(tmp_path / "tokenizer.json"))
    config = replace(MICRO, max_steps=3, warmup_steps=0, shuffle_buffer=0)

    ddp_config = replace(config, batch_size=4, devices=2, strategy="ddp")
    (tmp_path / "config.json").write_text(json.dumps(ddp_config.to_dict()))
    command = [
        sys.executable,
        "-m",
        "dalle_lightning.training.clip_train",
        "--config-json",
        str(tmp_path / "config.json"),
    ]
    command += ["--data-root", str(tmp_path / "root"), "--dataset", "t", "--bpe-path", bpe_path]
    command += ["--out-dir", str(tmp_path / "ddp"), "--result-json", str(tmp_path / "ddp.json")]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    done = subprocess.run(command, capture_output=True, text=True, timeout=200, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    ddp = json.loads((tmp_path / "ddp.json").read_text())
    single = train_clip(
        replace(config, batch_size=8),
        bpe=bpe_path,
        data_root=str(tmp_path / "root"),
        dataset="t",
        out_dir=tmp_path / "single",
    )
    assert ddp["steps"] == single["steps"] == 3
    assert "GLOBAL_RANK: 1, MEMBER: 2/2" in done.stderr + done.stdout
    assert ddp["metrics"]["train/loss"] == pytest.approx(single["metrics"]["train/loss"], rel=1e-4)
    a, b = load_clip(ddp["model_path"])[0].state_dict(), load_clip(single["model_path"])[0].state_dict()
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 2e-4


# --- learning ------------------------------------------------------------------------------------

TRAIN_IMAGES = 3000
"""Shapes images to train on (rendered here at 32 px)."""
HELD_OUT = 100
"""Held-out images with distinct scenes (and so distinct captions) to retrieve among."""


def _held_out(first: int, count: int, seed: int = 0) -> tuple[list, list[str]]:
    """``count`` ``train``-split shapes examples from index ``first`` on, each scene different from the others.

    Scenes are compared by their objects (shape, colour, size, position word),
    so no two held-out captions describe the same picture in other words.
    """
    config = ShapesConfig(n=first + 50 * count, size=32, seed=seed)
    images, captions, seen = [], [], set()
    index = first
    while len(images) < count:
        scene, caption, split = make_example(config, index)
        index += 1
        key = frozenset((o.shape, o.colour, o.size, o.position) for o in scene.objects)
        if split != "train" or key in seen:
            continue
        seen.add(key)
        images.append(np.asarray(render(scene, 32)))
        captions.append(caption)
    return images, captions


@pytest.mark.timeout(240)
def test_tiny_clip_retrieves_held_out_shapes_images_from_their_captions(tmp_path):
    """The issue's test: text→image R@1 ≥ 80% over 100 held-out images with distinct captions."""
    start = time.perf_counter()
    images, captions, _ = _shapes(0, TRAIN_IMAGES, 32)
    tokenizer = train_bpe(captions, BPEConfig(vocab_size=512))
    held_images, held_captions = _held_out(TRAIN_IMAGES, HELD_OUT)
    prepared = time.perf_counter() - start

    config = replace(load_preset("tiny"), accelerator="cpu", checkpoint_every_n_steps=10_000)
    config = replace(config, model=replace(config.model, text_vocab=tokenizer.get_vocab_size()))
    start = time.perf_counter()
    result = train_clip(
        config, bpe=tokenizer, shards=InMemoryPairShards(images, captions), out_dir=tmp_path / "clip"
    )
    trained = time.perf_counter() - start

    model, loaded_tokenizer = load_clip(result["model_path"])
    ids, _ = CaptionEncoder(loaded_tokenizer, model.config.text_len).encode_batch(held_captions)
    with torch.no_grad():
        image_embeddings = model.encode_image(to_tensor(np.stack(held_images)))
        text_embeddings = model.encode_text(torch.from_numpy(ids))
    recall = retrieval_recall(text_embeddings, image_embeddings, k=1)
    recall5 = retrieval_recall(text_embeddings, image_embeddings, k=5)
    print(
        f"\ntiny CLIP on {TRAIN_IMAGES} shapes images: {result['steps']} steps of {config.batch_size} in "
        f"{trained:.1f} s (data {prepared:.1f} s); final loss {result['metrics']['train/loss']:.3f}, "
        f"logit scale {result['metrics']['train/logit_scale']:.1f}; text→image R@1 {recall:.0%}, "
        f"R@5 {recall5:.0%} over {HELD_OUT} held-out images"
    )
    assert recall >= 0.8
