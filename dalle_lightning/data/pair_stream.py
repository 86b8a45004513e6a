"""A resumable stream of (image, caption ids) pairs for contrastive (CLIP) training.

Rows come from *shards*: the ``filter`` Parquet files (their ``image`` and
``caption`` columns, see :class:`ParquetPairShards`) or images and captions in
memory (:class:`InMemoryPairShards`, for tests and benchmarks). Each item is a
pair:

- image uint8 ``(3, S, S)``: a random square crop resized to the model size,
  drawn from ``(seed, epoch, shard, row)`` as in
  :mod:`~dalle_lightning.data.image_stream` (``min_scale = 1`` keeps the whole
  short side, which a caption that names positions needs);
- text int64 ``(text_len,)``: the caption encoded by a
  :class:`~dalle_lightning.stages.bpe.CaptionEncoder`, padded with
  :data:`~dalle_lightning.stages.bpe.PAD_ID`; with BPE dropout the draws come
  from ``(seed, epoch, shard, row)`` as well (kept apart from the crop's).
  An optional ``caption_transform(caption, rng)`` (caption augmentation, e.g.
  :class:`~dalle_lightning.training.clip_captions.ObjectCaptions`) rewrites
  the caption first, with its own draws from ``(seed, epoch, shard, row)``.

Order, split over DDP ranks × loader workers, the optional shuffle buffer and
resume are those of :mod:`~dalle_lightning.data.shard_stream`: with the same
seed, batch size, shuffle buffer, world size and number of workers, a stream
restarted at batch ``n`` yields the batches an uninterrupted one would have.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from dalle_lightning.data.image_stream import ImageLike, ParquetImageShards, _as_pil
from dalle_lightning.data.shard_stream import (
    ResumableStreamDataModule,
    ShardIndex,
    rank_and_world,
    resumed_epochs,
)
from dalle_lightning.data.transforms import random_crop_resize
from dalle_lightning.stages.bpe import CaptionEncoder

_BPE_TAG = 0xB9E  # keeps the BPE-dropout draws of a row apart from its crop's
_CAPTION_TAG = 0xCA9  # and the caption transform's apart from both
_NEGATIVE_TAG = 0x9E9  # and the hard negative's

CaptionTransform = Callable[[str, np.random.Generator], str]
"""(caption, seeded generator) → the caption to train on."""
NegativeCaption = Callable[[str, np.random.Generator], str | None]
"""(caption, seeded generator) → a caption that must not match the image, or None (no negative)."""


class PairShards(ShardIndex, Protocol):
    """Where a stream's rows come from: shards of (image, caption) with known row counts."""

    def read(self, shard: int) -> tuple[Sequence[ImageLike], Sequence[str]]:
        """Images (encoded bytes, PIL images or uint8 HWC arrays) and captions of shard ``shard``, in row order."""
        ...


class ParquetPairShards:
    """The ``image`` and ``caption`` columns of Parquet shard files (any fsspec URL), e.g. ``filter`` parts."""

    def __init__(self, paths: Sequence[str]) -> None:
        self._index = ParquetImageShards(paths)  # row counts from the footers
        self.paths = self._index.paths

    @classmethod
    def from_dataset(cls, root: str, dataset: str) -> ParquetPairShards:
        """The shards of ``<root>/filter/<dataset>``; ``ValueError`` if it has none."""
        from dalle_lightning.datasets.layout import DatasetLayout
        from dalle_lightning.datasets.parquet_io import list_parts

        folder = DatasetLayout(root).dataset("filter", dataset)
        parts = list_parts(folder)
        if not parts:
            raise ValueError(
                f"no part-*.parquet shards in {folder}: run the filter stage for {dataset!r} first"
            )
        return cls(parts)

    def __len__(self) -> int:
        return len(self._index)

    def num_rows(self, shard: int) -> int:
        return self._index.num_rows(shard)

    def read(self, shard: int) -> tuple[list[bytes], list[str]]:
        from dalle_lightning.datasets.parquet_io import read_parquet

        table = read_parquet(self.paths[shard], columns=["image", "caption"])
        captions = table.column("caption").to_pylist()
        if any(c is None for c in captions):
            raise ValueError(
                f"{self.paths[shard]}: a row has no caption; contrastive training needs one per image"
            )
        return table.column("image").to_pylist(), captions


@dataclass
class InMemoryPairShards:
    """Images and captions held in memory, cut into shards of ``rows_per_shard`` (the last may be shorter)."""

    images: Sequence[ImageLike]
    captions: Sequence[str]
    rows_per_shard: int = 256

    def __post_init__(self) -> None:
        if not len(self.images):
            raise ValueError("images is empty")
        if len(self.captions) != len(self.images):
            raise ValueError(
                f"{len(self.images)} images but {len(self.captions)} captions: give one per image"
            )
        if self.rows_per_shard < 1:
            raise ValueError(f"rows_per_shard must be >= 1, got {self.rows_per_shard}")

    def __len__(self) -> int:
        return -(-len(self.images) // self.rows_per_shard)

    def num_rows(self, shard: int) -> int:
        return min(self.rows_per_shard, len(self.images) - shard * self.rows_per_shard)

    def read(self, shard: int) -> tuple[Sequence[ImageLike], Sequence[str]]:
        rows = slice(shard * self.rows_per_shard, (shard + 1) * self.rows_per_shard)
        return self.images[rows], self.captions[rows]


class PairStream(IterableDataset):
    """Endless stream of (image uint8 ``(3, S, S)``, text int64 ``(text_len,)``) pairs, resumable.

    ``encoder`` encodes the captions (with BPE dropout or without).
    ``min_scale`` is the smallest crop side over the image's short side.
    ``shuffle_buffer`` (0: off) mixes rows across shards. ``rank`` and
    ``world_size`` default to those of the initialised ``torch.distributed``
    group (0 and 1 without one); the worker comes from the data loader.
    ``start_batch`` is the number of batches of ``batch_size`` this rank has
    consumed before. ``caption_transform`` (None: off) rewrites each caption
    before it is encoded. With ``negative_caption`` each item also holds the
    encoded hard negative of its (transformed) caption and whether it has one:
    ``(image, text, negative text, has negative)``; a row without one gets pads.
    """

    def __init__(
        self,
        shards: PairShards,
        encoder: CaptionEncoder,
        image_size: int,
        *,
        batch_size: int,
        seed: int = 0,
        min_scale: float = 1.0,
        shuffle_buffer: int = 0,
        start_batch: int = 0,
        rank: int | None = None,
        world_size: int | None = None,
        caption_transform: CaptionTransform | None = None,
        negative_caption: NegativeCaption | None = None,
    ) -> None:
        super().__init__()
        if image_size < 1:
            raise ValueError(f"image_size must be >= 1, got {image_size}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if start_batch < 0:
            raise ValueError(f"start_batch must be >= 0, got {start_batch}")
        if shuffle_buffer < 0:
            raise ValueError(f"shuffle_buffer must be >= 0, got {shuffle_buffer}")
        if not 0.0 < min_scale <= 1.0:
            raise ValueError(f"min_scale must be in (0, 1], got {min_scale}")
        self.shards = shards
        self.encoder = encoder
        self.image_size = image_size
        self.batch_size = batch_size
        self.seed = seed
        self.min_scale = min_scale
        self.shuffle_buffer = shuffle_buffer
        self.start_batch = start_batch
        self.rank = rank
        self.world_size = world_size
        self.caption_transform = caption_transform
        self.negative_caption = negative_caption

    def _epochs(
        self, rank: int, world_size: int, worker: int, num_workers: int
    ) -> Iterator[tuple[int, list[tuple[int, int]]]]:
        return resumed_epochs(
            self.shards,
            seed=self.seed,
            batch_size=self.batch_size,
            start_batch=self.start_batch,
            rank=rank,
            world_size=world_size,
            worker=worker,
            num_workers=num_workers,
            shuffle_buffer=self.shuffle_buffer,
            noun="image-caption pairs",
        )

    def items(
        self, rank: int, world_size: int, worker: int, num_workers: int
    ) -> Iterator[tuple[int, int, int]]:
        """(epoch, shard, row) of every item one consumer yields from the resume position on, forever."""
        for epoch, items in self._epochs(rank, world_size, worker, num_workers):
            for shard, row in items:
                yield epoch, shard, row

    def _crop(self, item: ImageLike, rng: np.random.Generator) -> np.ndarray:
        """The random crop of one image as uint8 (S, S, 3); an array already S × S needs none at scale 1."""
        size = self.image_size
        if (
            self.min_scale == 1.0
            and isinstance(item, np.ndarray)
            and item.dtype == np.uint8
            and item.shape == (size, size, 3)
        ):
            return item  # what random_crop_resize returns for it, without the round trip through PIL
        return np.asarray(random_crop_resize(_as_pil(item), size, rng, self.min_scale))

    def __iter__(self) -> Iterator[tuple[torch.Tensor, ...]]:
        rank, world_size = rank_and_world(self.rank, self.world_size)
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        dropout = self.encoder.dropout > 0
        loaded: dict[int, tuple[Sequence[ImageLike], Sequence[str]]] = {}
        for epoch, items in self._epochs(rank, world_size, worker, num_workers):
            last_use = {
                shard: i for i, (shard, _) in enumerate(items)
            }  # a shard is dropped after its last row
            for i, (shard, row) in enumerate(items):
                if shard not in loaded:
                    loaded[shard] = self.shards.read(shard)
                images, captions = loaded[shard]
                crop = self._crop(images[row], np.random.default_rng([self.seed, epoch, shard, row]))
                caption = captions[row]
                if self.caption_transform is not None:
                    caption_rng = np.random.default_rng([self.seed, epoch, shard, row, _CAPTION_TAG])
                    caption = self.caption_transform(caption, caption_rng)
                bpe_rng = np.random.default_rng([self.seed, epoch, shard, row, _BPE_TAG]) if dropout else None
                text, _ = self.encoder.encode(caption, bpe_rng)
                if last_use[shard] == i:
                    del loaded[shard]
                image = torch.from_numpy(np.array(crop)).permute(2, 0, 1)  # (3, S, S) uint8, a writable copy
                if self.negative_caption is None:
                    yield image, torch.from_numpy(text)
                    continue
                negative_rng = np.random.default_rng([self.seed, epoch, shard, row, _NEGATIVE_TAG])
                negative = self.negative_caption(caption, negative_rng)
                negative_ids = np.full_like(text, self.encoder.pad_id)
                if negative is not None:
                    negative_ids, _ = self.encoder.encode(negative)
                has_negative = torch.tensor(negative is not None)
                yield image, torch.from_numpy(text), torch.from_numpy(negative_ids), has_negative


class PairStreamDataModule(ResumableStreamDataModule):
    """Training batches (images uint8 ``(B, 3, S, S)``, text int64 ``(B, text_len)``) from a :class:`PairStream`.

    Its checkpointed state is the stream position (the trainer's global step)
    with the settings that fix the order; on resume the stream starts right
    after it.
    """

    def __init__(
        self,
        shards: PairShards,
        encoder: CaptionEncoder,
        image_size: int,
        batch_size: int,
        *,
        seed: int = 0,
        min_scale: float = 1.0,
        shuffle_buffer: int = 0,
        num_workers: int = 0,
        caption_transform: CaptionTransform | None = None,
        negative_caption: NegativeCaption | None = None,
    ) -> None:
        super().__init__(batch_size, seed=seed, num_workers=num_workers)
        self.caption_transform = caption_transform
        self.negative_caption = negative_caption
        self.shards = shards
        self.encoder = encoder
        self.image_size = image_size
        self.min_scale = min_scale
        self.shuffle_buffer = shuffle_buffer

    def _order_settings(self) -> dict[str, int]:
        return {**super()._order_settings(), "shuffle_buffer": self.shuffle_buffer}

    def train_dataloader(self) -> DataLoader:
        rank, world_size = self._rank_and_world()
        stream = PairStream(
            self.shards,
            self.encoder,
            self.image_size,
            batch_size=self.batch_size,
            seed=self.seed,
            min_scale=self.min_scale,
            shuffle_buffer=self.shuffle_buffer,
            start_batch=self.start_batch,
            rank=rank,
            world_size=world_size,
            caption_transform=self.caption_transform,
            negative_caption=self.negative_caption,
        )
        return DataLoader(
            stream,
            batch_size=self.batch_size,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
        )
