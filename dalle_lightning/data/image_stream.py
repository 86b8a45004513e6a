"""A resumable stream of training images, split over DDP ranks and data-loader workers.

Images come from *shards*: the ``filtered`` Parquet files (only their
``image`` column is read, see :class:`ParquetImageShards`) or lists of images
in memory (:class:`InMemoryImageShards`, for tests and benchmarks). Every
item is a random square crop resized to the model size (paper, Appendix A.2;
:func:`~dalle_lightning.data.transforms.random_crop_resize`).

Order. Epoch ``e`` visits the shards in a permutation drawn from
``(seed, e)`` and the rows of each shard in a permutation drawn from
``(seed, e, shard)``; the crop of a row is drawn from ``(seed, e, shard,
row)``. The stream never ends (epoch after epoch), so training runs for a
number of steps, not epochs.

Split. Consumers are the ``world_size × num_workers`` loader workers. At each
level (ranks, then the workers of a rank) the shards are dealt round-robin
when there are at least as many shards as parts (each reads only its own
files); otherwise every part reads all of the level's shards and takes every
n-th row of their concatenated rows. The consumers' items are disjoint and
together cover every row once per epoch.

Resume. The position is the number of batches this rank has consumed. A
:class:`torch.utils.data.DataLoader` takes batch ``j`` from worker
``j mod num_workers``, so on resume worker ``w`` takes over the part that
would have served the next batch after ``w`` more, and skips the batches that
part has already served — without decoding them. With the same seed, batch
size, world size and number of workers, the batches after a resume are the
ones an uninterrupted run would have seen.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

import lightning as L
import numpy as np
import pyarrow.parquet as pq
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from dalle_lightning.data.transforms import decode_image, random_crop_resize

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


def _deal(shards: list[int], offset: int, stride: int, parts: int, part: int) -> tuple[list[int], int, int]:
    """One level of the split: shards round-robin when there are enough, else every ``parts``-th row."""
    if stride == 1 and len(shards) >= parts:
        return shards[part::parts], offset, stride
    return shards, offset + part * stride, stride * parts


def consumer_items(
    shards: ImageShards,
    seed: int,
    epoch: int,
    rank: int,
    world_size: int,
    worker: int,
    num_workers: int,
) -> list[tuple[int, int]]:
    """The (shard, row) items of one consumer in epoch ``epoch``, in the order it yields them."""
    nonempty = [s for s in range(len(shards)) if shards.num_rows(s) > 0]
    order = [nonempty[i] for i in np.random.default_rng([seed, epoch]).permutation(len(nonempty))]
    mine, offset, stride = _deal(order, 0, 1, world_size, rank)
    mine, offset, stride = _deal(mine, offset, stride, num_workers, worker)
    items = [
        (shard, int(row))
        for shard in mine
        for row in np.random.default_rng([seed, epoch, shard]).permutation(shards.num_rows(shard))
    ]
    return items[offset::stride]


def batches_served(worker: int, num_workers: int, batches: int) -> int:
    """How many of the first ``batches`` batches of a loader came from ``worker`` (round-robin)."""
    return max(0, -(-(batches - worker) // num_workers))


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
        if self.rank is not None and self.world_size is not None:
            return self.rank, self.world_size
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return torch.distributed.get_rank(), torch.distributed.get_world_size()
        return 0, 1

    def items(self, rank: int, world_size: int, worker: int, num_workers: int) -> Iterator[tuple[int, int, int]]:
        """(epoch, shard, row) of every item one consumer yields from the resume position on, forever."""
        part = (worker + self.start_batch) % num_workers  # the part that serves this worker's next batch
        skip = batches_served(part, num_workers, self.start_batch) * self.batch_size
        total = sum(self.shards.num_rows(s) for s in range(len(self.shards)))
        if total < world_size * num_workers:
            raise ValueError(
                f"{total} images cannot feed {world_size} rank(s) × {num_workers} worker(s): "
                "every worker needs at least one image"
            )
        epoch = 0
        while True:
            items = consumer_items(self.shards, self.seed, epoch, rank, world_size, part, num_workers)
            if skip >= len(items):
                skip -= len(items)
            else:
                for shard, row in items[skip:]:
                    yield epoch, shard, row
                skip = 0
            epoch += 1

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



class ImageStreamDataModule(L.LightningDataModule):
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
        super().__init__()
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        self.shards = shards
        self.image_size = image_size
        self.batch_size = batch_size
        self.seed = seed
        self.min_scale = min_scale
        self.num_workers = num_workers
        self.start_batch = 0

    def _order_settings(self) -> dict[str, int]:
        world_size = self.trainer.world_size if self.trainer is not None else 1
        return {
            "seed": self.seed,
            "batch_size": self.batch_size,
            "num_workers": self.num_workers,
            "world_size": world_size,
        }

    def train_dataloader(self) -> DataLoader:
        rank, world_size = (self.trainer.global_rank, self.trainer.world_size) if self.trainer else (0, 1)
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

    def state_dict(self) -> dict[str, int]:
        consumed = self.trainer.global_step if self.trainer is not None else self.start_batch
        return {"batches_consumed": consumed, **self._order_settings()}

    def load_state_dict(self, state: dict[str, int]) -> None:
        now = self._order_settings()
        changed = {k: (state[k], v) for k, v in now.items() if k in state and state[k] != v}
        if changed:
            warnings.warn(
                f"resuming with different data settings {changed} (saved, now): the data order after "
                "the resume differs from an uninterrupted run",
                stacklevel=2,
            )
        self.start_batch = int(state["batches_consumed"])
