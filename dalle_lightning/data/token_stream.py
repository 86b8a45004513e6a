"""A resumable stream of (caption tokens, image tokens) for transformer training.

Rows come from *shards*: the ``tokens`` Parquet files (their ``caption`` and
``image_tokens`` columns, see :class:`ParquetTokenShards`) or captions and
codes in memory (:class:`InMemoryTokenShards`, for tests and benchmarks).
Each item is a pair of int64 tensors:

- text ``(text_len,)``: the caption BPE-encoded on the fly by a
  :class:`~dalle_lightning.stages.bpe.CaptionEncoder` — with BPE dropout when
  it is the training encoder, drawn from a generator seeded by
  ``(seed, epoch, shard, row)`` — cut or padded with
  :data:`~dalle_lightning.stages.bpe.PAD_ID` (``text != PAD_ID`` is the mask);
- image ``(H·W,)``: the dVAE codes of the image, row-major.

Order, split over DDP ranks × loader workers, and resume are those of
:mod:`~dalle_lightning.data.shard_stream`, with an optional shuffle buffer
that mixes rows of neighbouring shards; the buffer is a pure function of
(seed, epoch, consumer), so a resumed stream recomputes it and skips into it.
With the same seed, batch size, shuffle buffer, world size and number of
workers, "N steps straight" and "N/2 steps, checkpoint, resume for N/2" see
the same batches, BPE-dropout segmentations included.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from dalle_lightning.data.shard_stream import (
    ResumableStreamDataModule,
    ShardIndex,
    rank_and_world,
    resumed_epochs,
)
from dalle_lightning.stages.bpe import CaptionEncoder


class TokenShards(ShardIndex, Protocol):
    """Where a stream's rows come from: shards of (caption, image codes) with known row counts."""

    def read(self, shard: int) -> tuple[Sequence[str], np.ndarray]:
        """Captions and codes ``(rows, H·W)`` (any integer dtype) of shard ``shard``, in row order."""
        ...


def _codes(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """A fixed-size list column of codes as a ``(rows, list size)`` array (no copy per row)."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    if not pa.types.is_fixed_size_list(column.type):
        raise ValueError(
            f"image_tokens has type {column.type}, expected a fixed-size list (the tokens schema)"
        )
    flat = column.flatten().to_numpy(zero_copy_only=False)
    return flat.reshape(len(column), column.type.list_size)


class ParquetTokenShards:
    """The ``caption`` and ``image_tokens`` columns of ``tokens`` Parquet files (any fsspec URL).

    With ``dvae_version``, every file must record that dVAE in its metadata
    (``ValueError`` naming the file otherwise): codes of another dVAE mean
    nothing to a transformer trained on this one's.
    """

    def __init__(self, paths: Sequence[str], dvae_version: str | None = None) -> None:
        if not paths:
            raise ValueError("paths is empty: there are no Parquet shards to read tokens from")
        self.paths = list(paths)
        self.dvae_version = dvae_version
        self._rows: list[int] | None = None
        self._image_seq_len: int | None = None

    @classmethod
    def from_dataset(cls, root: str, dvae_version: str, dataset: str) -> ParquetTokenShards:
        """The shards of ``<root>/tokens/<dvae_version>/<dataset>``; ``ValueError`` if it has none."""
        from dalle_lightning.datasets.layout import DatasetLayout
        from dalle_lightning.datasets.parquet_io import list_parts

        folder = DatasetLayout(root).join("tokens", dvae_version, dataset)
        parts = list_parts(folder)
        if not parts:
            raise ValueError(
                f"no part-*.parquet shards in {folder}: run `dalle tokenize` for {dataset!r} first"
            )
        return cls(parts, dvae_version=dvae_version)

    def __len__(self) -> int:
        return len(self.paths)

    def _scan(self) -> None:
        """Row counts and the code-list size of every file, from the Parquet footers only."""
        import fsspec

        from data_schemas.tokens import token_metadata

        rows, sizes = [], {}
        for path in self.paths:
            fs, fs_path = fsspec.core.url_to_fs(path)
            with fs.open(fs_path, "rb") as f:
                try:
                    parquet = pq.ParquetFile(f)
                except pa.ArrowInvalid as err:
                    raise ValueError(f"{path}: not a readable Parquet file: {err}") from err
                rows.append(parquet.metadata.num_rows)
                field = parquet.schema_arrow.field("image_tokens")
                recorded = token_metadata(parquet.schema_arrow)
            if self.dvae_version is not None:
                made_by = None if recorded is None else recorded[3]
                if made_by != self.dvae_version:
                    raise ValueError(
                        f"{path}: tokens made by dVAE {made_by!r}, expected dVAE {self.dvae_version!r}; "
                        "re-run `dalle tokenize` with that dVAE or remove the file"
                    )
            if not pa.types.is_fixed_size_list(field.type):
                raise ValueError(f"{path}: image_tokens has type {field.type}, expected a fixed-size list")
            sizes.setdefault(field.type.list_size, path)
        if len(sizes) > 1:
            raise ValueError(f"the shards hold images of different token counts: {sizes} (size: first file)")
        self._rows = rows
        (self._image_seq_len,) = sizes

    def num_rows(self, shard: int) -> int:
        if self._rows is None:
            self._scan()
        assert self._rows is not None
        return self._rows[shard]

    @property
    def image_seq_len(self) -> int:
        """Codes per image (``H·W``), the same in every shard."""
        if self._image_seq_len is None:
            self._scan()
        assert self._image_seq_len is not None
        return self._image_seq_len

    def read(self, shard: int) -> tuple[list[str], np.ndarray]:
        from dalle_lightning.datasets.parquet_io import read_parquet

        table = read_parquet(self.paths[shard], columns=["caption", "image_tokens"])
        return table.column("caption").to_pylist(), _codes(table.column("image_tokens"))


@dataclass
class InMemoryTokenShards:
    """Captions and codes ``(N, H·W)`` held in memory, cut into shards of ``rows_per_shard``."""

    captions: Sequence[str]
    image_tokens: np.ndarray
    rows_per_shard: int = 256

    def __post_init__(self) -> None:
        if not len(self.captions):
            raise ValueError("captions is empty")
        self.image_tokens = np.asarray(self.image_tokens)
        if self.image_tokens.ndim != 2 or len(self.image_tokens) != len(self.captions):
            raise ValueError(
                f"image_tokens must have shape ({len(self.captions)}, H·W), got {self.image_tokens.shape}"
            )
        if self.rows_per_shard < 1:
            raise ValueError(f"rows_per_shard must be >= 1, got {self.rows_per_shard}")

    def __len__(self) -> int:
        return -(-len(self.captions) // self.rows_per_shard)

    def num_rows(self, shard: int) -> int:
        return min(self.rows_per_shard, len(self.captions) - shard * self.rows_per_shard)

    @property
    def image_seq_len(self) -> int:
        return int(self.image_tokens.shape[1])

    def read(self, shard: int) -> tuple[Sequence[str], np.ndarray]:
        rows = slice(shard * self.rows_per_shard, (shard + 1) * self.rows_per_shard)
        return self.captions[rows], self.image_tokens[rows]


class TokenStream(IterableDataset):
    """Endless stream of (text int64 ``(text_len,)``, image int64 ``(H·W,)``) pairs, resumable.

    ``encoder`` encodes the captions: the training one (BPE dropout) or a
    deterministic one. ``shuffle_buffer`` (0: off) mixes rows across shards.
    ``rank`` and ``world_size`` default to those of the initialised
    ``torch.distributed`` group (0 and 1 without one); the worker comes from
    the data loader. ``start_batch`` is the number of batches of
    ``batch_size`` this rank has consumed before.
    """

    def __init__(
        self,
        shards: TokenShards,
        encoder: CaptionEncoder,
        *,
        batch_size: int,
        seed: int = 0,
        shuffle_buffer: int = 0,
        start_batch: int = 0,
        rank: int | None = None,
        world_size: int | None = None,
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if start_batch < 0:
            raise ValueError(f"start_batch must be >= 0, got {start_batch}")
        if shuffle_buffer < 0:
            raise ValueError(f"shuffle_buffer must be >= 0, got {shuffle_buffer}")
        self.shards = shards
        self.encoder = encoder
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle_buffer = shuffle_buffer
        self.start_batch = start_batch
        self.rank = rank
        self.world_size = world_size

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
        )

    def items(
        self, rank: int, world_size: int, worker: int, num_workers: int
    ) -> Iterator[tuple[int, int, int]]:
        """(epoch, shard, row) of every item one consumer yields from the resume position on, forever."""
        for epoch, items in self._epochs(rank, world_size, worker, num_workers):
            for shard, row in items:
                yield epoch, shard, row

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        rank, world_size = rank_and_world(self.rank, self.world_size)
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        dropout = self.encoder.dropout > 0
        loaded: dict[int, tuple[Sequence[str], np.ndarray]] = {}
        for epoch, items in self._epochs(rank, world_size, worker, num_workers):
            last_use = {
                shard: i for i, (shard, _) in enumerate(items)
            }  # a shard is dropped after its last row
            for i, (shard, row) in enumerate(items):
                if shard not in loaded:
                    loaded[shard] = self.shards.read(shard)
                captions, codes = loaded[shard]
                rng = np.random.default_rng([self.seed, epoch, shard, row]) if dropout else None
                text, _ = self.encoder.encode(captions[row], rng)
                image = torch.from_numpy(codes[row].astype(np.int64))
                if last_use[shard] == i:
                    del loaded[shard]
                yield torch.from_numpy(text), image


class TokenStreamDataModule(ResumableStreamDataModule):
    """Training batches (text ``(B, text_len)``, image ``(B, H·W)``) from a :class:`TokenStream`.

    Its checkpointed state is the stream position (the trainer's global step)
    with the settings that fix the order; on resume the stream starts right
    after it. ``encoder`` is the training encoder
    (``CaptionEncoder.from_config(tokenizer, bpe_config, training=True)``).
    """

    def __init__(
        self,
        shards: TokenShards,
        encoder: CaptionEncoder,
        batch_size: int,
        *,
        seed: int = 0,
        shuffle_buffer: int = 0,
        num_workers: int = 0,
    ) -> None:
        super().__init__(batch_size, seed=seed, num_workers=num_workers)
        self.shards = shards
        self.encoder = encoder
        self.shuffle_buffer = shuffle_buffer

    def _order_settings(self) -> dict[str, int]:
        return {**super()._order_settings(), "shuffle_buffer": self.shuffle_buffer}

    def train_dataloader(self) -> DataLoader:
        rank, world_size = self._rank_and_world()
        stream = TokenStream(
            self.shards,
            self.encoder,
            batch_size=self.batch_size,
            seed=self.seed,
            shuffle_buffer=self.shuffle_buffer,
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
