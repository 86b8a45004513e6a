"""The embed stage on a tiny filtered shard of ``shapes`` images made here, with a tiny random CLIP."""

from __future__ import annotations

import dataclasses
import hashlib
import io

import numpy as np
import pyarrow as pa
import pytest
import torch
from PIL import Image

import data_schemas
import data_schemas.embeddings as embeddings_schema
import data_schemas.filtered as filtered_schema
from dalle_lightning.data.transforms import center_crop_resize, decode_image, to_tensor
from dalle_lightning.datasets.parquet_io import read_parquet, write_parquet_atomic
from dalle_lightning.stages.bpe import BPEConfig, CaptionEncoder, train_bpe
from dalle_lightning.stages.embed import (
    EmbedConfig,
    clip_version,
    embed_shard,
    embeddings_fingerprint,
    encode_captions,
    model_clip_version,
    write_embeddings,
)
from dalle_lightning.synth.shapes import render
from dalle_lightning.synth.shapes_dataset import ShapesConfig, make_example

clip = pytest.importorskip(
    "dalle_lightning.models.clip", reason="dalle_lightning.models.clip is not there yet"
)

pytestmark = pytest.mark.timeout(120)

N = 11
IMAGE_SIZE = 32
DIM = 16
CPU = EmbedConfig(batch_size=4, decode_threads=2, device="cpu")


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def captions(n: int) -> list[str]:
    config = ShapesConfig(n=n, size=64)
    return [make_example(config, i)[1] for i in range(n)]


def tiny_clip(seed: int, tokenizer) -> clip.ClipModel:
    torch.manual_seed(seed)
    config = clip.ClipConfig(
        image_size=IMAGE_SIZE,
        patch_size=8,
        vision_width=32,
        vision_layers=1,
        vision_heads=2,
        text_len=16,
        text_vocab=tokenizer.get_vocab_size(),
        text_width=32,
        text_layers=1,
        text_heads=2,
        embed_dim=DIM,
    )
    return clip.ClipModel(config).eval()


@pytest.fixture(scope="module")
def tokenizer():
    return train_bpe(captions(60), BPEConfig(vocab_size=400))


@pytest.fixture(scope="module")
def model(tokenizer):
    return tiny_clip(0, tokenizer)


def filtered_rows(n: int) -> list[dict]:
    """``n`` shapes images as filtered rows; every third one is 80×64, so the centre crop matters."""
    config = ShapesConfig(n=n, size=64)
    rows = []
    for i in range(n):
        scene, text, _split = make_example(config, i)
        image = render(scene, 64)
        if i % 3 == 0:
            image = image.resize((80, 64))
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=90)
        data = buffer.getvalue()
        rows.append(
            {
                "key": f"00ab-{i:06d}",
                "url": f"https://example.com/{i}.jpg",
                "caption": text,
                "image": data,
                "width": image.width,
                "height": image.height,
                "original_width": image.width,
                "original_height": image.height,
                "sha256": hashlib.sha256(data).hexdigest(),
                "phash": i,
                "caption_len": len(text),
            }
        )
    return rows


def write_shard(path: str, rows: list[dict]) -> str:
    write_parquet_atomic(pa.Table.from_pylist(rows, schema=filtered_schema.SCHEMA), path, filtered_schema)
    return path


@pytest.fixture(scope="module")
def shard(tmp_path_factory) -> tuple[str, list[dict]]:
    rows = filtered_rows(N)
    return write_shard(str(tmp_path_factory.mktemp("filter") / "part-00ab.parquet"), rows), rows


@pytest.fixture(scope="module")
def embedded(shard, model, tokenizer) -> pa.Table:
    return embed_shard(shard[0], model, tokenizer, CPU, clip_version="v1")


def vectors(table: pa.Table, column: str) -> np.ndarray:
    array = table.column(column).combine_chunks()
    return array.flatten().to_numpy(zero_copy_only=False).reshape(len(array), -1)


def test_one_row_per_input_in_order_with_unit_vectors(shard, embedded):
    rows = shard[1]
    assert embedded.column("key").to_pylist() == [r["key"] for r in rows]
    assert embedded.column("caption").to_pylist() == [r["caption"] for r in rows]
    assert embedded.column("url").to_pylist() == [r["url"] for r in rows]
    for column in ("image_embedding", "text_embedding"):
        assert embedded.schema.field(column).type == pa.list_(pa.float32(), DIM)
        values = vectors(embedded, column)
        assert values.shape == (N, DIM) and values.dtype == np.float32
        np.testing.assert_allclose(np.linalg.norm(values, axis=1), 1.0, atol=1e-5)
    assert embeddings_schema.embedding_metadata(embedded.schema) == (DIM, "v1")


def test_vectors_equal_the_encoders_on_the_same_inputs(shard, embedded, model, tokenizer):
    rows = shard[1]
    pixels = to_tensor([center_crop_resize(decode_image(r["image"]), IMAGE_SIZE) for r in rows])
    ids, _ = CaptionEncoder(tokenizer, 16).encode_batch([r["caption"] for r in rows])
    with torch.inference_mode():
        images = model.encode_image(pixels).numpy()
        texts = model.encode_text(torch.from_numpy(ids)).numpy()
    np.testing.assert_allclose(vectors(embedded, "image_embedding"), images, atol=1e-5)
    np.testing.assert_allclose(vectors(embedded, "text_embedding"), texts, atol=1e-5)
    assert np.ptp(images, axis=0).max() > 1e-3  # different images get different vectors: the check has teeth
    np.testing.assert_allclose(
        encode_captions(model, tokenizer, [rows[2]["caption"]])[0], texts[2], atol=1e-6
    )


def test_batch_size_does_not_change_the_vectors(shard, embedded, model, tokenizer):
    other = embed_shard(
        shard[0], model, tokenizer, dataclasses.replace(CPU, batch_size=64), clip_version="v1"
    )
    for column in ("image_embedding", "text_embedding"):
        np.testing.assert_allclose(vectors(other, column), vectors(embedded, column), atol=1e-5)


def test_written_file_validates_and_is_a_registered_schema(embedded, tmp_path):
    path = str(tmp_path / "part-00ab.parquet")
    written = write_embeddings(embedded, path)
    assert written.rows == N
    table = read_parquet(path)
    data_schemas.module_for("embeddings").validate(table, check_metadata=True)
    assert embeddings_schema.embedding_metadata(table.schema) == (DIM, "v1")


def test_clip_version_follows_the_content_and_the_fingerprint_the_model(tmp_path, model, tokenizer):
    a, b = tmp_path / "a.pt", tmp_path / "sub" / "b.pt"
    clip.save_clip(model, a, tokenizer)
    clip.save_clip(model, b, tokenizer)
    version = clip_version(a)
    assert version == clip_version(b) == model_clip_version(model, tokenizer)  # same content, any path
    assert model_clip_version(*clip.load_clip(a)) == version
    clip.save_clip(tiny_clip(1, tokenizer), tmp_path / "c.pt", tokenizer)
    other_weights = clip_version(tmp_path / "c.pt")
    other_bpe = model_clip_version(model, train_bpe(captions(60), BPEConfig(vocab_size=380)))
    assert len({version, other_weights, other_bpe}) == 3

    fp = embeddings_fingerprint("in", version, CPU)
    assert fp != embeddings_fingerprint("in", other_weights, CPU)
    assert fp != embeddings_fingerprint("in2", version, CPU)
    assert fp == embeddings_fingerprint("in", version, EmbedConfig(batch_size=7, decode_threads=1))


def test_version_is_computed_when_not_given_and_training_flag_is_restored(shard, model, tokenizer):
    model.train()
    try:
        table = embed_shard(shard[0], model, tokenizer, CPU)
        assert model.training
    finally:
        model.eval()
    assert embeddings_schema.embedding_metadata(table.schema) == (DIM, model_clip_version(model, tokenizer))


def test_empty_shard_and_bad_image(tmp_path, model, tokenizer):
    rows = filtered_rows(2)
    empty = embed_shard(write_shard(str(tmp_path / "e.parquet"), []), model, tokenizer, CPU, clip_version="v")
    assert empty.num_rows == 0 and empty.schema.field("image_embedding").type.list_size == DIM
    rows[1]["image"] = b"not an image"
    bad = write_shard(str(tmp_path / "b.parquet"), rows)
    with pytest.raises(ValueError, match="00ab-000001"):
        embed_shard(bad, model, tokenizer, CPU, clip_version="v")


def test_reading_another_dataset_is_an_error(tmp_path, embedded, model, tokenizer):
    path = str(tmp_path / "part-00ab.parquet")
    write_embeddings(embedded, path)
    with pytest.raises(ValueError, match="expected 'filtered'"):
        embed_shard(path, model, tokenizer, CPU, clip_version="v")


@pytest.mark.parametrize(
    "field, value", [("batch_size", 0), ("decode_threads", True), ("device", "tpu"), ("batch_size", 2.5)]
)
def test_config_names_the_bad_field(field, value):
    with pytest.raises(ValueError, match=f"EmbedConfig.{field}"):
        EmbedConfig(**{field: value})


def test_a_grey_image_still_embeds(tmp_path, model, tokenizer):
    rows = filtered_rows(1)
    buffer = io.BytesIO()
    Image.new("RGB", (20, 20), (128, 128, 128)).save(buffer, format="PNG")
    rows[0]["image"] = buffer.getvalue()
    table = embed_shard(
        write_shard(str(tmp_path / "g.parquet"), rows), model, tokenizer, CPU, clip_version="v"
    )
    np.testing.assert_allclose(np.linalg.norm(vectors(table, "image_embedding"), axis=1), 1.0, atol=1e-5)
