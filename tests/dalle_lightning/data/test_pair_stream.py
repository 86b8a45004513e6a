"""The (image, caption ids) stream for CLIP: pairs stay together, split over consumers, resume, BPE dropout."""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from dalle_lightning.data.pair_stream import InMemoryPairShards, PairStream, ParquetPairShards
from dalle_lightning.stages.bpe import PAD_ID, BPEConfig, CaptionEncoder, train_bpe

pytestmark = pytest.mark.timeout(60)

WORDS = ["red", "green", "blue", "circle", "square", "triangle", "small", "large"]


def _caption(i: int) -> str:
    return f"a {WORDS[i % 8]} {WORDS[(i // 8) % 8]} number {i}"


def _images(count: int, size: int = 8) -> list[np.ndarray]:
    """uint8 images whose pixels all hold their index (mod 256)."""
    return [np.full((size, size, 3), i % 256, dtype=np.uint8) for i in range(count)]


@pytest.fixture(scope="module")
def tokenizer():
    return train_bpe([_caption(i) for i in range(200)], BPEConfig(vocab_size=300, min_frequency=1))


@pytest.fixture(scope="module")
def encoder(tokenizer) -> CaptionEncoder:
    return CaptionEncoder(tokenizer, 12)


def _take(stream: PairStream, count: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    iterator = iter(stream)
    return [next(iterator) for _ in range(count)]


def test_items_are_matching_pairs_of_the_right_types(encoder):
    shards = InMemoryPairShards(_images(30), [_caption(i) for i in range(30)], rows_per_shard=7)
    stream = PairStream(shards, encoder, 8, batch_size=5, seed=1, shuffle_buffer=8)
    items = _take(stream, 60)  # two epochs
    for image, text in items:
        assert image.dtype == torch.uint8 and image.shape == (3, 8, 8)
        assert text.dtype == torch.int64 and text.shape == (12,)
        index = int(image[0, 0, 0])
        assert encoder.decode(text.numpy()) == _caption(index)[: len(encoder.decode(text.numpy()))]
    first_epoch = sorted(int(image[0, 0, 0]) for image, _ in items[:30])
    assert first_epoch == list(range(30))  # every pair once per epoch
    assert [int(i[0, 0, 0]) for i, _ in items[:30]] != [int(i[0, 0, 0]) for i, _ in items[30:]]


def test_ranks_read_disjoint_pairs_that_cover_the_data(encoder):
    shards = InMemoryPairShards(_images(24), [_caption(i) for i in range(24)], rows_per_shard=6)
    seen = []
    for rank in range(2):
        stream = PairStream(shards, encoder, 8, batch_size=4, seed=0, rank=rank, world_size=2)
        seen.append({int(image[0, 0, 0]) for image, _ in _take(stream, 12)})
    assert seen[0].isdisjoint(seen[1]) and seen[0] | seen[1] == set(range(24))


def test_a_resumed_stream_continues_where_it_stopped(encoder):
    shards = InMemoryPairShards(_images(40), [_caption(i) for i in range(40)], rows_per_shard=9)
    settings = {"batch_size": 4, "seed": 3, "shuffle_buffer": 16}
    straight = _take(PairStream(shards, encoder, 8, **settings), 100)
    resumed = _take(PairStream(shards, encoder, 8, start_batch=7, **settings), 72)
    for (a_image, a_text), (b_image, b_text) in zip(straight[28:], resumed, strict=True):
        assert torch.equal(a_image, b_image) and torch.equal(a_text, b_text)


def test_random_crops_are_drawn_per_row_and_epoch(encoder):
    gradient = np.tile(
        np.arange(16, dtype=np.uint8)[None, :, None] * 16, (16, 1, 3)
    )  # brightness grows left→right
    shards = InMemoryPairShards([gradient] * 4, [_caption(i) for i in range(4)])
    full = _take(PairStream(shards, encoder, 16, batch_size=2, min_scale=1.0), 4)
    assert all(torch.equal(image, full[0][0]) for image, _ in full)  # the whole square image each time
    crops = _take(PairStream(shards, encoder, 16, batch_size=2, min_scale=0.5), 12)
    assert len({image.numpy().tobytes() for image, _ in crops}) > 1


def test_bpe_dropout_is_seeded_by_row_and_epoch(tokenizer, encoder):
    dropping = CaptionEncoder(tokenizer, 12, dropout=0.5)
    captions = [_caption(i) for i in range(16)]
    shards = InMemoryPairShards(_images(16), captions, rows_per_shard=4)
    first = _take(PairStream(shards, dropping, 8, batch_size=4, seed=5), 32)
    again = _take(PairStream(shards, dropping, 8, batch_size=4, seed=5), 32)
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(first, again, strict=True))
    plain = {int(i[0, 0, 0]): t for i, t in _take(PairStream(shards, encoder, 8, batch_size=4), 16)}
    assert any(not torch.equal(t, plain[int(i[0, 0, 0])]) for i, t in first)  # some merges were dropped
    for image, text in first:  # the text still spells the caption
        assert (
            dropping.decode(text.numpy())
            == captions[int(image[0, 0, 0])][: len(dropping.decode(text.numpy()))]
        )
        assert (text != PAD_ID).sum() > 0


def test_parquet_pair_shards_read_images_and_captions(tmp_path, encoder):
    paths = []
    for s in range(2):
        encoded = []
        for r in range(3):
            buffer = io.BytesIO()
            Image.fromarray(_images(1 + s * 3 + r, size=8)[-1]).save(buffer, format="PNG")
            encoded.append(buffer.getvalue())
        table = pa.table({"image": encoded, "caption": [_caption(s * 3 + r) for r in range(3)]})
        pq.write_table(table, tmp_path / f"part-{s:05d}.parquet")
        paths.append(str(tmp_path / f"part-{s:05d}.parquet"))
    shards = ParquetPairShards(paths)
    assert len(shards) == 2 and shards.num_rows(1) == 3
    images, captions = shards.read(1)
    assert captions == [_caption(3), _caption(4), _caption(5)] and isinstance(images[0], bytes)
    pairs = _take(PairStream(shards, encoder, 8, batch_size=2), 6)
    assert sorted(int(image[0, 0, 0]) for image, _ in pairs) == list(range(6))

    pq.write_table(pa.table({"image": [encoded[0]], "caption": [None]}), tmp_path / "part-00009.parquet")
    with pytest.raises(ValueError, match="no caption"):
        ParquetPairShards([str(tmp_path / "part-00009.parquet")]).read(0)
    with pytest.raises(ValueError, match="empty"):
        InMemoryPairShards([], [])
    with pytest.raises(ValueError, match="one per image"):
        InMemoryPairShards(_images(2), ["a"])


def test_caption_transform_is_seeded_by_row_and_epoch_and_resumes(encoder):
    """The transform sees each row's caption with its own generator: same seed, same captions; resume too."""

    def rename_sometimes(caption: str, rng: np.random.Generator) -> str:
        return caption.replace("number", "circle") if rng.random() < 0.5 else caption

    shards = InMemoryPairShards(_images(16), [_caption(i) for i in range(16)], rows_per_shard=5)
    settings = dict(batch_size=4, seed=2, shuffle_buffer=6, caption_transform=rename_sometimes)
    first = _take(PairStream(shards, encoder, 8, **settings), 48)
    again = _take(PairStream(shards, encoder, 8, **settings), 48)
    resumed = _take(PairStream(shards, encoder, 8, start_batch=3, **settings), 36)
    plain = {int(i[0, 0, 0]): t for i, t in _take(PairStream(shards, encoder, 8, batch_size=4), 16)}
    assert all(torch.equal(a[1], b[1]) for a, b in zip(first, again, strict=True))
    assert all(torch.equal(a[1], b[1]) for a, b in zip(first[12:], resumed, strict=True))
    changed = [not torch.equal(t, plain[int(i[0, 0, 0])]) for i, t in first]
    assert 0 < sum(changed) < len(changed)  # some captions rewritten, not all
    epochs = [
        {
            int(i[0, 0, 0]): c
            for (i, _), c in zip(first[e * 16 : (e + 1) * 16], changed[e * 16 : (e + 1) * 16], strict=True)
        }
        for e in range(3)
    ]
    assert epochs[0] != epochs[1] or epochs[1] != epochs[2]  # drawn anew each epoch


def test_hard_negatives_come_with_their_row_and_pads_when_there_is_none(encoder):
    def negative(caption: str, rng: np.random.Generator) -> str | None:
        index = int(caption.split()[-1])
        return None if index % 3 == 0 else caption.replace("number", "not")

    shards = InMemoryPairShards(_images(12), [_caption(i) for i in range(12)], rows_per_shard=5)
    items = _take(PairStream(shards, encoder, 8, batch_size=4, negative_caption=negative), 12)
    for image, text, negative_ids, has_negative in items:
        index = int(image[0, 0, 0])
        assert bool(has_negative) == (index % 3 != 0)
        if has_negative:
            expected, _ = encoder.encode(_caption(index).replace("number", "not"))
            assert torch.equal(negative_ids, torch.from_numpy(expected)) and not torch.equal(
                negative_ids, text
            )
        else:
            assert bool((negative_ids == PAD_ID).all())
