"""The token stream: split over ranks × workers, shuffle buffer, exact resume, Parquet tokens shards."""

from __future__ import annotations

from itertools import takewhile

import lightning as L
import numpy as np
import pyarrow as pa
import pytest
import torch
from torch.utils.data import DataLoader

import data_schemas.tokens as tokens_schema
from dalle_lightning.data.shard_stream import buffer_shuffle
from dalle_lightning.data.token_stream import (
    InMemoryTokenShards,
    ParquetTokenShards,
    TokenStream,
    TokenStreamDataModule,
)
from dalle_lightning.datasets.layout import DatasetLayout
from dalle_lightning.datasets.parquet_io import write_parquet_atomic
from dalle_lightning.stages.bpe import PAD_ID, BPEConfig, CaptionEncoder, train_bpe
from dalle_lightning.synth.shapes_dataset import ShapesConfig, make_example

pytestmark = pytest.mark.timeout(120)

CELLS = 4


def _rows(n: int) -> tuple[list[str], np.ndarray]:
    """Shapes captions and codes whose first entry is the row index (the item's identity)."""
    config = ShapesConfig(n=n, size=32, seed=1)
    captions = [make_example(config, i)[1] for i in range(n)]
    codes = np.zeros((n, CELLS), dtype=np.uint16)
    codes[:, 0] = np.arange(n)
    codes[:, 1:] = np.arange(n)[:, None] % 7
    return captions, codes


CAPTIONS, CODES = _rows(60)
TOKENIZER = train_bpe(CAPTIONS, BPEConfig(vocab_size=320))
TRAIN = CaptionEncoder(TOKENIZER, 12, dropout=0.3)
PLAIN = CaptionEncoder(TOKENIZER, 12)


def _epoch0(stream: TokenStream, rank: int, world_size: int, worker: int, num_workers: int) -> list:
    items = stream.items(rank, world_size, worker, num_workers)
    return [(s, r) for _, s, r in takewhile(lambda item: item[0] == 0, items)]


@pytest.mark.parametrize(
    ("rows", "per_shard", "world_size", "num_workers", "buffer"),
    [(60, 10, 2, 2, 0), (60, 10, 2, 2, 16), (37, 5, 3, 2, 8), (23, 23, 2, 2, 5), (30, 7, 2, 5, 100)],
)
def test_ranks_times_workers_cover_every_item_once_per_epoch(
    rows, per_shard, world_size, num_workers, buffer
):
    shards = InMemoryTokenShards(CAPTIONS[:rows], CODES[:rows], rows_per_shard=per_shard)
    everything = {(s, r) for s in range(len(shards)) for r in range(shards.num_rows(s))}
    seen = []
    for rank in range(world_size):
        stream = TokenStream(shards, PLAIN, batch_size=2, seed=5, shuffle_buffer=buffer, rank=rank)
        for worker in range(num_workers):
            part = _epoch0(stream, rank, world_size, worker, num_workers)
            assert part, (rank, worker)
            seen += part
    assert len(seen) == len(set(seen)) and set(seen) == everything


def test_shuffle_buffer_is_deterministic_and_mixes_shards():
    shards = InMemoryTokenShards(CAPTIONS, CODES, rows_per_shard=10)

    def order(seed: int, buffer: int, epoch: int = 0) -> list[tuple[int, int]]:
        stream = TokenStream(shards, PLAIN, batch_size=4, seed=seed, shuffle_buffer=buffer)
        items = stream.items(0, 1, 0, 1)
        return [(s, r) for e, s, r in takewhile(lambda item: item[0] <= epoch, items) if e == epoch]

    plain, buffered = order(3, 0), order(3, 16)
    assert buffered == order(3, 16) and sorted(buffered) == sorted(plain) and buffered != plain
    assert order(3, 16, epoch=1) != buffered and order(4, 16) != buffered
    # without a buffer the first ten rows are one shard; with one they come from several
    assert len({s for s, _ in plain[:10]}) == 1 and len({s for s, _ in buffered[:10]}) > 1
    # the buffer: a permutation, each output among the next `size` inputs
    items = list(range(100))
    out = buffer_shuffle(items, 8, np.random.default_rng(0))
    assert sorted(out) == items and all(out[i] < i + 8 for i in range(100))
    assert buffer_shuffle(items, 1, np.random.default_rng(0)) == items


def test_items_are_encoded_captions_and_codes():
    shards = InMemoryTokenShards(CAPTIONS, CODES, rows_per_shard=16)
    stream = TokenStream(shards, PLAIN, batch_size=4, seed=0, rank=0, world_size=1)
    for text, image in [item for item, _ in zip(stream, range(20), strict=False)]:
        assert text.dtype == image.dtype == torch.int64 and text.shape == (12,) and image.shape == (CELLS,)
        row = int(image[0])
        assert image.tolist() == CODES[row].tolist()
        expected, _ = PLAIN.encode(CAPTIONS[row])
        assert text.tolist() == expected.tolist()
        length = int((text != PAD_ID).sum())
        assert (text[length:] == PAD_ID).all()


def _batches(shards, encoder, start_batch: int, count: int, num_workers: int) -> list[tuple[list, list]]:
    stream = TokenStream(
        shards,
        encoder,
        batch_size=4,
        seed=3,
        shuffle_buffer=12,
        start_batch=start_batch,
        rank=0,
        world_size=1,
    )
    out = []
    for text, image in DataLoader(stream, batch_size=4, num_workers=num_workers):
        assert text.shape == (4, 12) and image.shape == (4, CELLS)
        out.append((text.tolist(), image.tolist()))
        if len(out) == count:
            break
    return out


def test_resume_gives_the_same_batches_dropout_included():
    shards = InMemoryTokenShards(CAPTIONS[:30], CODES[:30], rows_per_shard=7)
    straight = _batches(shards, TRAIN, 0, 12, num_workers=2)  # 12 batches of 4 > 30 rows: crosses an epoch
    for start in (1, 4, 5):
        assert _batches(shards, TRAIN, start, 12 - start, num_workers=2) == straight[start:]
    single = _batches(shards, TRAIN, 0, 10, num_workers=0)
    assert _batches(shards, TRAIN, 6, 4, num_workers=0) == single[6:]
    # dropout: a row's segmentation is drawn per (epoch, row), so it differs between epochs
    by_epoch: dict[int, list] = {}
    for texts, images in single:
        for text, image in zip(texts, images, strict=True):
            by_epoch.setdefault(image[0], []).append(text)
    assert any(len({tuple(t) for t in texts}) > 1 for texts in by_epoch.values())
    for row, texts in by_epoch.items():
        for text in texts:
            assert PLAIN.decode(text) == CAPTIONS[row].lower()[: len(PLAIN.decode(text))]


class _Recorder(L.LightningModule):
    """Records the batches it trains on; one parameter so the optimizer has something to step."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(()))
        self.seen: list[tuple[list, list]] = []

    def training_step(self, batch, batch_idx):
        text, image = batch
        self.seen.append((text.tolist(), image.tolist()))
        return (self.w - image.float().mean()) ** 2

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def _fit(tmp_path, steps: int, resume: str | None = None) -> tuple[_Recorder, L.Trainer]:
    shards = InMemoryTokenShards(CAPTIONS[:30], CODES[:30], rows_per_shard=7)
    data = TokenStreamDataModule(shards, TRAIN, 4, seed=2, shuffle_buffer=9)
    module = _Recorder()
    trainer = L.Trainer(
        max_steps=steps,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(module, datamodule=data, ckpt_path=resume)
    return module, trainer


def test_datamodule_checkpoint_resumes_where_it_stopped(tmp_path):
    straight, _ = _fit(tmp_path / "a", 10)
    half, trainer = _fit(tmp_path / "b", 5)
    trainer.save_checkpoint(tmp_path / "half.ckpt")
    resumed, _ = _fit(tmp_path / "c", 10, resume=str(tmp_path / "half.ckpt"))
    assert half.seen == straight.seen[:5] and resumed.seen == straight.seen[5:]

    data = TokenStreamDataModule(InMemoryTokenShards(CAPTIONS, CODES), TRAIN, 4, shuffle_buffer=9)
    state = data.state_dict()
    assert state == {"batches_consumed": 0, "seed": 0, "batch_size": 4, "num_workers": 0, "world_size": 1} | {
        "shuffle_buffer": 9
    }
    with pytest.warns(UserWarning, match="shuffle_buffer"):
        data.load_state_dict({**state, "batches_consumed": 7, "shuffle_buffer": 0})
    assert data.start_batch == 7


def _tokens_dataset(root, name: str, per_shard: list[int], cells: int = CELLS) -> list[str]:
    layout = DatasetLayout(str(root))
    schema = tokens_schema.tokens_schema(2, cells // 2, 64, "dvae-v1")
    start = 0
    for s, n in enumerate(per_shard):
        rows = range(start, start + n)
        table = pa.table(
            {
                "key": [f"k{i}" for i in rows],
                "caption": [CAPTIONS[i] for i in rows],
                "image_tokens": pa.FixedSizeListArray.from_arrays(
                    pa.array(np.resize(CODES[list(rows)] % 64, n * cells).astype(np.uint16)), cells
                ),
            }
        )
        write_parquet_atomic(
            table, layout.join("tokens", "dvae-v1", name, f"part-{s:012x}.parquet"), tokens_schema, schema
        )
        start += n
    return [layout.join("tokens", "dvae-v1", name, f"part-{s:012x}.parquet") for s in range(len(per_shard))]


def test_reads_parquet_tokens_shards(tmp_path):
    _tokens_dataset(tmp_path, "d", [5, 0, 8])
    shards = ParquetTokenShards.from_dataset(str(tmp_path), "dvae-v1", "d")
    assert len(shards) == 3 and [shards.num_rows(s) for s in range(3)] == [5, 0, 8]
    assert shards.image_seq_len == CELLS
    captions, codes = shards.read(2)
    assert captions == CAPTIONS[5:13] and codes.shape == (8, CELLS) and codes[0, 0] == 5
    stream = TokenStream(shards, PLAIN, batch_size=2, seed=0, shuffle_buffer=4, rank=0, world_size=1)
    rows = []
    for text, image in [item for item, _ in zip(stream, range(13), strict=False)]:
        row = int(image[0])
        rows.append(row)
        assert text.tolist() == PLAIN.encode(CAPTIONS[row])[0].tolist()
    assert sorted(rows) == list(range(13))  # the first epoch: every row once

    with pytest.raises(ValueError, match="no part"):
        ParquetTokenShards.from_dataset(str(tmp_path), "dvae-v1", "missing")
    mixed = _tokens_dataset(tmp_path, "m", [3], cells=8)[:1] + _tokens_dataset(tmp_path, "n", [3])[:1]
    with pytest.raises(ValueError, match="different token counts"):
        ParquetTokenShards(mixed).num_rows(0)
    with pytest.raises(ValueError, match="cannot feed"):
        next(iter(TokenStream(shards, PLAIN, batch_size=2, rank=0, world_size=14)))


def test_argument_errors():
    with pytest.raises(ValueError, match="image_tokens must have shape"):
        InMemoryTokenShards(CAPTIONS, CODES[:3])
    with pytest.raises(ValueError, match="captions is empty"):
        InMemoryTokenShards([], CODES[:0])
    shards = InMemoryTokenShards(CAPTIONS, CODES)
    with pytest.raises(ValueError, match="shuffle_buffer"):
        TokenStream(shards, PLAIN, batch_size=2, shuffle_buffer=-1)
    with pytest.raises(ValueError, match="batch_size"):
        TokenStream(shards, PLAIN, batch_size=0)
    with pytest.raises(ValueError, match="num_workers"):
        TokenStreamDataModule(shards, PLAIN, 2, num_workers=-1)
