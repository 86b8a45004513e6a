"""Order, split and resume position shared by the training streams over shards (images, tokens).

A stream reads *shards* (Parquet files, or lists in memory) whose row counts
are known up front (:class:`ShardIndex`).

Order. Epoch ``e`` visits the shards in a permutation drawn from
``(seed, e)`` and the rows of each shard in a permutation drawn from
``(seed, e, shard)``. A shuffle buffer of ``b`` items can mix rows across
neighbouring shards on top (:func:`buffer_shuffle`, drawn from the seed, the
epoch and the consumer). A stream never ends (epoch after epoch), so training
runs for a number of steps, not epochs.

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
part has already served — without reading them. With the same seed, batch
size, shuffle buffer, world size and number of workers, the batches after a
resume are the ones an uninterrupted run would have seen.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from typing import Any, Protocol

import lightning as L
import numpy as np
import torch

_BUFFER_TAG = 0xB0F  # keeps the buffer's draws apart from the per-row ones of the same (seed, epoch)


class ShardIndex(Protocol):
    """A fixed list of shards with known row counts (what the order and split need)."""

    def __len__(self) -> int:
        """Number of shards."""
        ...

    def num_rows(self, shard: int) -> int:
        """Rows in shard ``shard``, without reading them."""
        ...


def _deal(shards: list[int], offset: int, stride: int, parts: int, part: int) -> tuple[list[int], int, int]:
    """One level of the split: shards round-robin when there are enough, else every ``parts``-th row."""
    if stride == 1 and len(shards) >= parts:
        return shards[part::parts], offset, stride
    return shards, offset + part * stride, stride * parts


def consumer_items(
    shards: ShardIndex,
    seed: int,
    epoch: int,
    rank: int,
    world_size: int,
    worker: int,
    num_workers: int,
) -> list[tuple[int, int]]:
    """The (shard, row) items of one consumer in epoch ``epoch``, in shard order (before any buffer)."""
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


def buffer_shuffle(items: list[Any], size: int, rng: np.random.Generator) -> list[Any]:
    """``items`` through a shuffle buffer of ``size``: each output is a random pick among the next ``size``.

    Fill the buffer with the first ``size`` items; then each further item
    replaces a random buffer entry, which is emitted; the rest leave in a
    random order. ``size <= 1`` keeps the order. A pure function of its
    arguments, so a resumed stream can recompute it and skip into it.
    """
    if size <= 1 or len(items) <= 1:
        return list(items)
    buffer = list(items[:size])
    picks = rng.integers(0, len(buffer), size=max(0, len(items) - len(buffer)))
    out = []
    for item, j in zip(items[len(buffer) :], picks, strict=True):
        out.append(buffer[j])
        buffer[j] = item
    out.extend(buffer[k] for k in rng.permutation(len(buffer)))
    return out


def batches_served(worker: int, num_workers: int, batches: int) -> int:
    """How many of the first ``batches`` batches of a loader came from ``worker`` (round-robin)."""
    return max(0, -(-(batches - worker) // num_workers))


def resumed_epochs(
    shards: ShardIndex,
    *,
    seed: int,
    batch_size: int,
    start_batch: int,
    rank: int,
    world_size: int,
    worker: int,
    num_workers: int,
    shuffle_buffer: int = 0,
    noun: str = "rows",
) -> Iterator[tuple[int, list[tuple[int, int]]]]:
    """(epoch, its remaining (shard, row) items) of one loader worker from the resume position on, forever.

    ``ValueError`` when there are fewer rows than consumers (``noun`` names
    them in the message).
    """
    part = (worker + start_batch) % num_workers  # the part that serves this worker's next batch
    skip = batches_served(part, num_workers, start_batch) * batch_size
    total = sum(shards.num_rows(s) for s in range(len(shards)))
    if total < world_size * num_workers:
        raise ValueError(
            f"{total} {noun} cannot feed {world_size} rank(s) × {num_workers} worker(s): "
            f"every worker needs at least one of the {noun}"
        )
    epoch = 0
    while True:
        items = consumer_items(shards, seed, epoch, rank, world_size, part, num_workers)
        if shuffle_buffer > 1:
            rng = np.random.default_rng([seed, epoch, rank, part, _BUFFER_TAG])
            items = buffer_shuffle(items, shuffle_buffer, rng)
        if skip >= len(items):
            skip -= len(items)
        else:
            yield epoch, items[skip:]
            skip = 0
        epoch += 1


def rank_and_world(rank: int | None, world_size: int | None) -> tuple[int, int]:
    """``(rank, world_size)`` as given, else those of the ``torch.distributed`` group, else ``(0, 1)``."""
    if rank is not None and world_size is not None:
        return rank, world_size
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class ResumableStreamDataModule(L.LightningDataModule):
    """A data module whose checkpointed state is the stream position (see the module docstring).

    The state saved in a checkpoint is the number of batches this rank has
    trained on (the trainer's global step) with the settings that fix the
    order (:meth:`_order_settings`); on resume the stream starts right after
    them (``self.start_batch``). Subclasses build the stream in
    ``train_dataloader``.
    """

    def __init__(self, batch_size: int, *, seed: int = 0, num_workers: int = 0) -> None:
        super().__init__()
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        self.batch_size = batch_size
        self.seed = seed
        self.num_workers = num_workers
        self.start_batch = 0

    def _rank_and_world(self) -> tuple[int, int]:
        return (self.trainer.global_rank, self.trainer.world_size) if self.trainer else (0, 1)

    def _order_settings(self) -> dict[str, int]:
        world_size = self.trainer.world_size if self.trainer is not None else 1
        return {
            "seed": self.seed,
            "batch_size": self.batch_size,
            "num_workers": self.num_workers,
            "world_size": world_size,
        }

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
