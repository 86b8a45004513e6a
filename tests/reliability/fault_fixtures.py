"""Fault injection for the reliability tests: a Dask worker that dies mid-task, a task that fails once.

This file is also a Dask *preload*: a worker started with
``distributed.worker.preload = [this file]`` and ``DALLE_FAULT_DIR`` in its
environment runs :func:`dask_setup`, which

- records the worker's address and pid in ``$DALLE_FAULT_DIR/workers/<pid>.json``;
- wraps ``write_parquet_atomic`` of the stage module ``$DALLE_FAULT_STAGE``
  (e.g. ``dalle_lightning.stages.tokenize``) so that the first call in the
  whole cluster — the task has read its shard and computed its output, and is
  about to write it — creates ``$DALLE_FAULT_DIR/killed`` (``O_EXCL``: exactly
  one worker wins) and sends SIGKILL to its own process. The Dask scheduler
  sees the worker die with the task running; the nanny starts a new worker.

Nothing here imports pytest, so a worker can import it cheaply.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import json
import os
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

FAULT_DIR_ENV = "DALLE_FAULT_DIR"
FAULT_STAGE_ENV = "DALLE_FAULT_STAGE"


def dask_setup(worker: Any) -> None:
    """Dask preload hook, run once in each worker process as it starts."""
    folder = os.environ.get(FAULT_DIR_ENV)
    if not folder:
        return
    workers = Path(folder) / "workers"
    workers.mkdir(parents=True, exist_ok=True)
    (workers / f"{os.getpid()}.json").write_text(json.dumps({"address": worker.address, "pid": os.getpid()}))
    stage = os.environ.get(FAULT_STAGE_ENV)
    if stage:
        module = importlib.import_module(stage)
        module.write_parquet_atomic = _kill_first_writer(module.write_parquet_atomic, Path(folder) / "killed")


def _kill_first_writer(write: Any, marker: Path) -> Any:
    def write_or_die(*args: Any, **kwargs: Any) -> Any:
        try:
            fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:  # another worker (or this one, earlier) already died once
            return write(*args, **kwargs)
        os.write(fd, json.dumps({"pid": os.getpid(), "path": str(args[1])}).encode())
        os.close(fd)
        os.kill(os.getpid(), signal.SIGKILL)
        raise AssertionError("unreachable: SIGKILL was sent to this process")

    return write_or_die


@contextlib.contextmanager
def kill_one_dask_worker(folder: Path, stage_module: str) -> Iterator[Path]:
    """Within the block, Dask workers started by this process run :func:`dask_setup` (see the module doc).

    Yields ``folder``; after the block ``folder / "killed"`` names the pid that died.
    """
    import dask
    import distributed  # noqa: F401  (loads its config defaults first: leaving the block restores them)

    folder.mkdir(parents=True, exist_ok=True)
    saved = {k: os.environ.get(k) for k in (FAULT_DIR_ENV, FAULT_STAGE_ENV)}
    os.environ[FAULT_DIR_ENV] = str(folder)
    os.environ[FAULT_STAGE_ENV] = stage_module
    try:
        with dask.config.set({"distributed.worker.preload": [__file__]}):
            yield folder
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def sha256_of_parts(folder: Path) -> dict[str, str]:
    """``part-*.parquet`` name -> sha256 of its bytes, for every shard file directly in ``folder``."""
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.glob("part-*.parquet"))}


def tree_listing(root: Path) -> list[str]:
    """Every file under ``root``, relative, sorted (hidden temporary files included)."""
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def write_filtered_dataset(root: Path, name: str, shards: int = 4, per_shard: int = 6) -> list[str]:
    """A ``filter/<name>`` dataset of 64 px shapes images written as the stages write it; returns shard ids.

    The images are the same for every root; the manifests' fingerprints include the root, so that
    Prefect's cache (one per test session) never hands one test's task results to another.
    """
    import io

    import pyarrow as pa

    import data_schemas.filtered as filtered_schema
    from dalle_lightning.datasets.layout import DatasetLayout
    from dalle_lightning.datasets.manifest import run_once
    from dalle_lightning.datasets.parquet_io import write_parquet_atomic
    from dalle_lightning.synth.shapes import render
    from dalle_lightning.synth.shapes_dataset import ShapesConfig, make_example

    layout = DatasetLayout(str(root))
    config = ShapesConfig(n=shards * per_shard, size=64, seed=5)
    ids = []
    for s in range(shards):
        shard_id = f"{s + 1:012x}"
        rows = []
        for r in range(per_shard):
            scene, caption, _ = make_example(config, s * per_shard + r)
            buffer = io.BytesIO()
            render(scene, 64).save(buffer, format="PNG")
            rows.append(
                {
                    "key": f"{shard_id}-{r:06d}",
                    "url": f"http://127.0.0.1/{s}/{r}",
                    "caption": caption,
                    "image": buffer.getvalue(),
                    "width": 64,
                    "height": 64,
                    "original_width": 64,
                    "original_height": 64,
                    "sha256": hashlib.sha256(buffer.getvalue()).hexdigest(),
                    "phash": s * 100 + r,
                    "caption_len": len(caption),
                }
            )
        table = pa.Table.from_pylist(rows, schema=filtered_schema.SCHEMA)
        path = layout.shard("filter", name, shard_id)
        run_once(
            layout.manifest("filter", name, shard_id),
            f"filter-fp-{s}-{root}",
            lambda t=table, p=path: ({"output": write_parquet_atomic(t, p, filtered_schema)}, {}),
            stage="filter",
            dataset=name,
            shard_id=shard_id,
            input_fingerprint=f"in-{s}",
        )
        ids.append(shard_id)
    return ids


def tiny_dvae(path: Path, seed: int = 0) -> str:
    """An untrained 32 px dVAE (8×8 codes out of 64), saved as training exports it."""
    import torch

    from dalle_lightning.models.dvae import DiscreteVAE, DVAEConfig, save_dvae

    torch.manual_seed(seed)
    model = DiscreteVAE(DVAEConfig(image_size=32, n_hid=16, n_blk_per_group=1, group_count=3, vocab_size=64))
    return str(save_dvae(model, path))


def reference_tokens(root: Path, name: str, dvae: str, out: Path) -> dict[str, str]:
    """Tokenize every ``filter/<name>`` shard by calling the stage function directly (no Prefect, no Dask)
    into ``out``; returns :func:`sha256_of_parts` of it: the bytes an undisturbed run writes."""
    from dalle_lightning.models.dvae import dvae_version, load_dvae
    from dalle_lightning.stages.tokenize import TokenizeConfig, tokenize_shard

    model = load_dvae(dvae).eval()
    version = dvae_version(dvae)
    for part in sorted((root / "filter" / name).glob("part-*.parquet")):
        tokenize_shard(str(part), str(out / part.name), model, dvae_version=version, config=TokenizeConfig())
    return sha256_of_parts(out)


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def own_prefect_api(home: Path) -> Iterator[str]:
    """A Prefect API server of its own (database and result storage under ``home``) for the block.

    The test session's shared server stays untouched; this one is stopped at
    the end of the block, so its database file can be deleted between two blocks.
    """
    from prefect.server.api.server import SubprocessASGIServer
    from prefect.settings import (
        PREFECT_API_DATABASE_CONNECTION_URL,
        PREFECT_API_URL,
        PREFECT_HOME,
        PREFECT_LOCAL_STORAGE_PATH,
        temporary_settings,
    )

    from flows.prefect_api import _flush_logs

    home.mkdir(parents=True, exist_ok=True)
    settings = {
        PREFECT_HOME: str(home),
        PREFECT_API_DATABASE_CONNECTION_URL: f"sqlite+aiosqlite:///{home / 'prefect.db'}",
        PREFECT_LOCAL_STORAGE_PATH: str(home / "storage"),
    }
    with temporary_settings(updates=settings, restore_defaults={PREFECT_API_URL}):
        server = SubprocessASGIServer(port=free_port())  # its own port: not the session's server instance
        server.start(timeout=180)
        try:
            with temporary_settings(updates={PREFECT_API_URL: server.api_url}):
                yield server.api_url
                _flush_logs()
        finally:
            server.stop()
