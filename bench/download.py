"""Download stage vs plain img2dataset on the same loopback URLs, timed in one run.

    .venv/bin/python bench/download.py --n 500 --processes 2 --threads 16

Serves ``n`` synthetic PNGs (``original_size`` px, resized to ``image_size``)
from an ImageServer in this process, then times

  plain  ``img2dataset.download(output_format="parquet", processes_count=P, thread_count=T)``
         (its own spawn process pool; start-up included);
  ours   the same URL list cut into shards of the same size, ``download_shard`` per shard as
         tasks on a ``dask.distributed.LocalCluster(n_workers=P, threads_per_worker=1)``: once on
         fresh workers ("cold": each imports img2dataset on its first task) and once more ("warm").

Cluster start-up is reported apart: in the pipeline one cluster serves every stage.
"""

from __future__ import annotations

import glob
import os
import tempfile
import time
from pathlib import Path

import typer

RESIZE_MODE = "keep_ratio"


def make_images(folder: Path, n: int, size: int) -> list[str]:
    """``n`` noisy PNGs of ``size``×``size`` px (blocks of colour plus noise); returns relative paths."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    files = []
    for i in range(n):
        blocks = (
            rng.integers(0, 256, size=(8, 8, 3), dtype=np.uint8).repeat(size // 8, 0).repeat(size // 8, 1)
        )
        noise = rng.integers(-12, 13, size=blocks.shape)
        pixels = np.clip(blocks.astype(int) + noise, 0, 255).astype(np.uint8)
        rel = f"images/{i:05d}.png"
        Image.fromarray(pixels).save(folder / rel)
        files.append(rel)
    return files


def run_plain(
    url_list: str, out: str, processes: int, threads: int, image_size: int, shard_size: int
) -> float:
    """Wall time of ``img2dataset.download`` on ``url_list``; returns seconds."""
    from img2dataset import download

    start = time.perf_counter()
    download(
        url_list=url_list,
        output_folder=out,
        input_format="parquet",
        url_col="url",
        caption_col="caption",
        output_format="parquet",
        processes_count=processes,
        thread_count=threads,
        image_size=image_size,
        resize_mode=RESIZE_MODE,
        number_sample_per_shard=shard_size,
        encode_format="jpg",
        encode_quality=95,
        timeout=10,
        retries=0,
        extract_exif=False,
        compute_hash="sha256",
        user_agent_token="dalle-lightning",
        enable_wandb=False,
    )
    return time.perf_counter() - start


def plain_window(out: str) -> float:
    """Seconds from the first shard's start to the last shard's end (img2dataset's stats files)."""
    import json

    stats = [json.loads(Path(p).read_text()) for p in glob.glob(f"{out}/*_stats.json")]
    return max(s["end_time"] for s in stats) - min(s["start_time"] for s in stats)


def plain_successes(out: str) -> int:
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    return sum(
        pc.sum(pc.equal(pq.read_table(p, columns=["status"]).column("status"), "success")).as_py() or 0
        for p in glob.glob(f"{out}/*.parquet")
    )


def write_shards(url_list: str, folder: Path, shard_size: int) -> list[tuple[str, str]]:
    """Cut the URL list into ``sources`` shards of ``shard_size`` rows: [(shard id, path)]."""
    import pyarrow.parquet as pq

    import data_schemas.sources as sources_schema
    from dalle_lightning.datasets.parquet_io import write_parquet_atomic

    table = pq.read_table(url_list)
    shards = []
    for ordinal, start in enumerate(range(0, table.num_rows, shard_size)):
        shard_id = f"{ordinal:05x}"
        path = str(folder / f"part-{shard_id}.parquet")
        write_parquet_atomic(table.slice(start, shard_size), path, sources_schema)
        shards.append((shard_id, path))
    return shards


def run_ours(
    client, shards: list[tuple[str, str]], out: Path, threads: int, image_size: int
) -> tuple[float, int]:
    """Wall time of ``download_shard`` over ``shards`` as Dask tasks, and the number of successes."""
    from dalle_lightning.stages.download import DownloadConfig, download_shard

    config = DownloadConfig(image_size=image_size, resize_mode=RESIZE_MODE, thread_count=threads, timeout=10)
    start = time.perf_counter()
    futures = [
        client.submit(download_shard, src, str(out / f"part-{sid}.parquet"), config, shard_id=sid, pure=False)
        for sid, src in shards
    ]
    results = client.gather(futures)
    wall = time.perf_counter() - start
    window = max(r.stats["end_time"] for r in results) - min(r.stats["start_time"] for r in results)
    return wall, window, sum(r.stats["successes"] for r in results)


def main(
    n: int = typer.Option(500, help="number of images"),
    processes: int = typer.Option(2, help="img2dataset processes = Dask workers"),
    threads: int = typer.Option(16, help="download threads per shard"),
    shard_size: int = typer.Option(50, help="rows per shard"),
    image_size: int = typer.Option(64, help="resized size"),
    original_size: int = typer.Option(128, help="size of the served images"),
) -> None:
    """Time plain img2dataset against the download stage on Dask; print both and the ratio."""
    from dask.distributed import Client, LocalCluster

    from dalle_lightning.serving.image_server import ImageServer, write_url_list

    with tempfile.TemporaryDirectory(prefix="bench-download-") as tmp_dir:
        tmp = Path(tmp_dir)
        files = make_images(tmp / "www", n, original_size)
        with ImageServer(tmp / "www") as server:
            url_list = str(tmp / "urls.parquet")
            write_url_list(server, files, [f"image {i}" for i in range(n)], url_list)
            plain_s = run_plain(url_list, str(tmp / "plain"), processes, threads, image_size, shard_size)
            plain_ok = plain_successes(str(tmp / "plain"))
            plain_w = plain_window(str(tmp / "plain"))
            shards = write_shards(url_list, tmp / "sources", shard_size)
            start = time.perf_counter()
            cluster = LocalCluster(
                n_workers=processes, threads_per_worker=1, processes=True, dashboard_address=None
            )
            with cluster, Client(cluster) as client:
                cluster_s = time.perf_counter() - start
                cold_s, cold_w, cold_ok = run_ours(client, shards, tmp / "ours-cold", threads, image_size)
                warm_s, warm_w, warm_ok = run_ours(client, shards, tmp / "ours-warm", threads, image_size)
    print(
        f"\nn={n} shards={len(shards)}x{shard_size} processes={processes} threads={threads} "
        f"{original_size}px -> {image_size}px {RESIZE_MODE}   (window: first shard start -> last shard end)"
    )
    for name, wall, window, ok in (
        ("plain img2dataset.download", plain_s, plain_w, plain_ok),
        ("ours, Dask, cold workers", cold_s, cold_w, cold_ok),
        ("ours, Dask, warm workers", warm_s, warm_w, warm_ok),
    ):
        print(f"{name:28s} wall {wall:6.2f} s  window {window:6.2f} s  {ok} ok  {n / wall:6.1f} img/s")
    print(f"{'LocalCluster start':28s} wall {cluster_s:6.2f} s")
    print(
        f"ratio ours/plain wall: cold {cold_s / plain_s:.2f}, warm {warm_s / plain_s:.2f}, "
        f"cold + cluster start {(cold_s + cluster_s) / plain_s:.2f};  "
        f"window: cold {cold_w / plain_w:.2f}, warm {warm_w / plain_w:.2f}"
    )


if __name__ == "__main__":
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # inherited by every worker process
    typer.run(main)
