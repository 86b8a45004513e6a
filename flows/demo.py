"""``dalle demo`` / ``make demo``: synthetic shapes → loopback server → ``ingest`` → ``train_dvae`` → ``tokenize``
→ ``train_bpe`` → ``train_dalle``.

Everything lives under one folder (default ``demo-data/``): the images, the
dataset root, Prefect's ephemeral database (``PREFECT_HOME``) and the MLflow
SQLite store, so the UIs can be opened on exactly this run afterwards. The
server listens on a fixed loopback port so that URLs, and therefore shard ids,
are the same on every run: a second ``make demo`` skips all stage work.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from rich.console import Console


def _environment(out: Path) -> tuple[str, Path]:
    """Point Prefect and MLflow at folders under ``out`` unless the user already chose servers."""
    out.mkdir(parents=True, exist_ok=True)
    prefect_home = out / "prefect"
    if "PREFECT_API_URL" not in os.environ:
        os.environ.setdefault("PREFECT_HOME", str(prefect_home.resolve()))
    tracking_uri = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{(out / 'mlruns.db').resolve()}"
    return tracking_uri, Path(os.environ.get("PREFECT_HOME", prefect_home))


SHOWN_METRICS = ("loss", "recon_loss", "text_loss", "image_loss", "psnr", "codebook_usage", "perplexity")


def _metrics_line(metrics: dict[str, Any]) -> str:
    """``name value, …`` of the main final training metrics, 3 significant digits."""
    values = {k.split("/")[-1]: v for k, v in metrics.items() if isinstance(v, int | float)}
    return ", ".join(f"{k} {values[k]:.3g}" for k in SHOWN_METRICS if k in values)


def run_demo(
    out: Path,
    *,
    n: int = 2000,
    size: int = 64,
    port: int = 8765,
    workers: int = 2,
    dvae_preset: str = "tiny",
    dvae_overrides: dict[str, dict[str, Any]] | None = None,
    dalle_preset: str = "tiny",
    dalle_overrides: dict[str, dict[str, Any]] | None = None,
    bpe_vocab_size: int = 1024,
) -> dict:
    """Run the demo end to end and print the counts and how to look at the results."""
    console = Console()
    started = time.monotonic()
    tracking_uri, prefect_home = _environment(out)

    from dalle_lightning.serving.image_server import ImageServer, url_list_for_folder
    from dalle_lightning.stages.bpe import BPEConfig
    from dalle_lightning.synth.shapes_dataset import ShapesConfig, write_shapes_dataset
    from flows.ingest import run_ingest
    from flows.prefect_api import prefect_api
    from flows.summary import print_ingest_summary
    from flows.tokenize import run_tokenize
    from flows.train_bpe import train_bpe
    from flows.train_dalle import train_dalle
    from flows.train_dvae import train_dvae

    root = str(out / "data")
    shapes_dir = out / "shapes"
    if (shapes_dir / "shapes.parquet").exists():
        console.print(f"[1/7] synth: reusing {shapes_dir}")
    else:
        console.print(f"[1/7] synth: rendering {n} shapes images at {size}px into {shapes_dir}")
        write_shapes_dataset(str(shapes_dir), ShapesConfig(n=n, size=size, seed=0))
    with prefect_api(), ImageServer(str(shapes_dir), port=port) as server:
        urls = out / "urls.parquet"
        url_list_for_folder(server, str(urls))
        console.print(f"[2/7] serve: {shapes_dir} at {server.base_url}")
        console.print("[3/7] ingest: download (img2dataset on Dask) → filter + dedup")
        summary = run_ingest(
            root,
            n_workers=workers,
            name="shapes",
            urls=[str(urls)],
            shard_size=250,
            tracking_uri=tracking_uri,
            experiment="dalle-demo",
        )
        print_ingest_summary(summary, console)
        console.print(f"[4/7] train_dvae: the {dvae_preset!r} dVAE on filter/shapes (its own process)")
        dvae = train_dvae(
            root,
            dataset="shapes",
            preset=dvae_preset,
            overrides=dvae_overrides or {},
            tracking_uri=tracking_uri,
            experiment="dalle-demo",
        )
        console.print(
            f"      dVAE {dvae['dvae_version']} ({'trained' if dvae['did_work'] else 'reused'}): "
            + _metrics_line(dvae["metrics"])
        )
        console.print("[5/7] tokenize: filtered images → dVAE codes (Parquet)")
        tokens = run_tokenize(
            root,
            n_workers=workers,
            dataset="shapes",
            dvae=dvae["model_path"],
            tracking_uri=tracking_uri,
            experiment="dalle-demo",
        )
        work = ", ".join(f"{k} {v}" for k, v in sorted(tokens["work"]["tokenize"].items()))
        console.print(
            f"      {tokens['rows']} images in {tokens['shards']} shards ({work}) → {tokens['path']}"
        )
        console.print("[6/7] train_bpe: byte-level BPE on the filtered captions")
        bpe = train_bpe(
            root,
            dataset="shapes",
            config=BPEConfig(vocab_size=bpe_vocab_size),
            tracking_uri=tracking_uri,
            experiment="dalle-demo",
        )
        console.print(f"      BPE {bpe['bpe_fingerprint']} ({'trained' if bpe['did_work'] else 'reused'})")
        console.print(f"[7/7] train_dalle: the {dalle_preset!r} transformer on the codes (its own process)")
        dalle = train_dalle(
            root,
            dataset="shapes",
            dvae=dvae["model_path"],
            preset=dalle_preset,
            overrides=dalle_overrides or {},
            tracking_uri=tracking_uri,
            experiment="dalle-demo",
        )
        console.print(
            f"      DALL-E model ({'trained' if dalle['did_work'] else 'reused'}): "
            + _metrics_line(dalle.get("metrics", {}))
        )
    summary["dvae"] = dvae
    summary["tokens"] = tokens
    summary["bpe"] = bpe
    summary["dalle"] = dalle
    elapsed = time.monotonic() - started
    lines = [
        f"demo finished in {elapsed:.1f}s; dataset under {out / 'data'}",
        f"  reconstructions: dalle reconstruct IMAGE… --dvae {dvae['model_path']}",
        f"  transformer:     {dalle.get('model_path')}",
        "look at the results:",
        f"  Prefect UI:  PREFECT_HOME={prefect_home.resolve()} prefect server start  → http://127.0.0.1:4200",
        f"  MLflow UI:   mlflow ui --backend-store-uri {tracking_uri} --port 5000  → http://127.0.0.1:5000",
        f"  check data:  dalle verify {out / 'data'}",
    ]
    for line in lines:
        console.print(line, soft_wrap=True, highlight=False)
    summary["elapsed_s"] = elapsed
    return summary
