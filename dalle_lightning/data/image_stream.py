"""A resumable stream of training images, split over DDP ranks and data-loader workers.

Images come from *shards*: the ``filtered`` Parquet files (only their
``image`` column is read, see :class:`ParquetImageShards`) or lists of images
in memory (:class:`InMemoryImageShards`, for tests and benchmarks). Every
item is a random square crop resized to the model size (paper, Appendix A.2;
:func:`~dalle_lightning.data.transforms.random_crop_resize`).

Order, split and resume are those of :mod:`~dalle_lightning.data.shard_stream`:
epoch ``e`` visits the shards in a permutation drawn from ``(seed, e)`` and
the rows of each shard in a permutation drawn from ``(seed, e, shard)``; the
crop of a row is drawn from ``(seed, e, shard, row)``. The
``world_size × num_workers`` loader workers read disjoint items that cover
every row once per epoch, and a stream restarted at batch ``n`` (the
checkpointed position) yields the batches an uninterrupted run would have.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import pyarrow.parquet as pq
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from dalle_lightning.data.shard_stream import (
    ResumableStreamDataModule,
    batches_served,
    consumer_items,
    rank_and_world,
    resumed_epochs,
)
from dalle_lightning.data.transforms import decode_image, random_crop_resize

__all__ = [
    "ImageShards",
    "ImageStream",
    "ImageStreamDataModule",
    "InMemoryImageShards",
    "ParquetImageShards",
    "batches_served",
    "consumer_items",
]

ImageLike = bytes | Image.Image | np.ndarray


class ImageShards(Protocol):
    """Where a stream's images come from: a fixed list of shards with known row counts."""

    def __len__(self) -> int:
        """Number of shards."""
        ...

    def num_rows(self, shard: int) -> int:
        """Rows in shard ``shard``, without reading its images."""
        ...

    def read(self, shard: int) -> Sequence[ImageLike]:
        """All images of shard ``shard``, in row order (encoded bytes, PIL images or uint8 HWC arrays)."""
        ...


class ParquetImageShards:
    """The ``image`` column of Parquet shard files (any fsspec URL), e.g. ``filtered`` dataset parts."""

    def __init__(self, paths: Sequence[str], column: str = "image") -> None:
        if not paths:
            raise ValueError("paths is empty: there are no Parquet shards to read images from")
        self.paths = list(paths)
        self.column = column
        self._rows: list[int] | None = None

    def __len__(self) -> int:
        return len(self.paths)

    def num_rows(self, shard: int) -> int:
        if self._rows is None:
            self._rows = [self._count(path) for path in self.paths]
        return self._rows[shard]

    @staticmethod
    def _count(path: str) -> int:
        import fsspec

        fs, fs_path = fsspec.core.url_to_fs(path)
        with fs.open(fs_path, "rb") as f:
            return pq.ParquetFile(f).metadata.num_rows

    def read(self, shard: int) -> list[bytes]:
        from dalle_lightning.datasets.parquet_io import read_parquet

        table = read_parquet(self.paths[shard], columns=[self.column])
        return table.column(self.column).to_pylist()


@dataclass
class InMemoryImageShards:
    """Images held in memory, cut into shards of ``rows_per_shard`` (the last one may be shorter)."""

    images: Sequence[ImageLike]
    rows_per_shard: int = 256

    def __post_init__(self) -> None:
        if not self.images:
            raise ValueError("images is empty")
        if self.rows_per_shard < 1:
            raise ValueError(f"rows_per_shard must be >= 1, got {self.rows_per_shard}")

    def __len__(self) -> int:
        return -(-len(self.images) // self.rows_per_shard)

    def num_rows(self, shard: int) -> int:
        return min(self.rows_per_shard, len(self.images) - shard * self.rows_per_shard)

    def read(self, shard: int) -> Sequence[ImageLike]:
        start = shard * self.rows_per_shard
        return self.images[start : start + self.rows_per_shard]


def _as_pil(item: ImageLike) -> Image.Image:
    if isinstance(item, bytes | bytearray | memoryview):
        return decode_image(bytes(item))
    if isinstance(item, np.ndarray):
        return Image.fromarray(item).convert("RGB")
    if isinstance(item, Image.Image):
        return item.convert("RGB")
    raise TypeError(f"expected encoded bytes, a PIL image or a uint8 array, got {type(item).__name__}")


class ImageStream(IterableDataset):
    """Endless stream of uint8 tensors (3, S, S): random crops of the shards' images, resumable.

    ``rank`` and ``world_size`` default to those of the initialised
    ``torch.distributed`` process group (0 and 1 without one); the worker comes
    from the data loader. ``start_batch`` is the number of batches of
    ``batch_size`` this rank has consumed before (see the module docstring).
    """

    def __init__(
        self,
        shards: ImageShards,
        image_size: int,
        *,
        batch_size: int,
        seed: int = 0,
        min_scale: float = 1.0,
        start_batch: int = 0,
        rank: int | None = None,
        world_size: int | None = None,
    ) -> None:
        super().__init__()
        if image_size < 1:
            raise ValueError(f"image_size must be >= 1, got {image_size}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if start_batch < 0:
            raise ValueError(f"start_batch must be >= 0, got {start_batch}")
        if not 0.0 < min_scale <= 1.0:
            raise ValueError(f"min_scale must be in (0, 1], got {min_scale}")
        self.shards = shards
        self.image_size = image_size
        self.batch_size = batch_size
        self.seed = seed
        self.min_scale = min_scale
        self.start_batch = start_batch
        self.rank = rank
        self.world_size = world_size

    def _rank_and_world(self) -> tuple[int, int]:
        return rank_and_world(self.rank, self.world_size)

    def items(
        self, rank: int, world_size: int, worker: int, num_workers: int
    ) -> Iterator[tuple[int, int, int]]:
        """(epoch, shard, row) of every item one consumer yields from the resume position on, forever."""
        epochs = resumed_epochs(
            self.shards,
            seed=self.seed,
            batch_size=self.batch_size,
            start_batch=self.start_batch,
            rank=rank,
            world_size=world_size,
            worker=worker,
            num_workers=num_workers,
            noun="images",
        )
        for epoch, items in epochs:
            for shard, row in items:
                yield epoch, shard, row

    def __iter__(self) -> Iterator[torch.Tensor]:
        rank, world_size = self._rank_and_world()
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        cached_shard, images = -1, None
        for epoch, shard, row in self.items(rank, world_size, worker, num_workers):
            if shard != cached_shard:
                cached_shard, images = shard, self.shards.read(shard)
            rng = np.random.default_rng([self.seed, epoch, shard, row])
            crop = random_crop_resize(_as_pil(images[row]), self.image_size, rng, self.min_scale)
            yield torch.from_numpy(np.array(crop)).permute(2, 0, 1)  # (3, S, S) uint8, a writable copy


class ImageStreamDataModule(ResumableStreamDataModule):
    """Training batches from an :class:`ImageStream`; its checkpointed state is the stream position.

    The state saved in a checkpoint is the number of batches this rank has
    trained on (the trainer's global step) with the settings that fix the
    order; on resume the stream starts right after them.
    """

    def __init__(
        self,
        shards: ImageShards,
        image_size: int,
        batch_size: int,
        *,
        seed: int = 0,
        min_scale: float = 1.0,
        num_workers: int = 0,
    ) -> None:
        super().__init__(batch_size, seed=seed, num_workers=num_workers)
        self.shards = shards
        self.image_size = image_size
        self.min_scale = min_scale

    def train_dataloader(self) -> DataLoader:
        rank, world_size = self._rank_and_world()
        stream = ImageStream(
            self.shards,
            self.image_size,
            batch_size=self.batch_size,
            seed=self.seed,
            min_scale=self.min_scale,
            start_batch=self.start_batch,
            rank=rank,
            world_size=world_size,
        )
        return DataLoader(
            stream,
            batch_size=self.batch_size,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
        )
