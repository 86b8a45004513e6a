"""``dalle demo`` / ``make demo``: synthetic shapes → loopback server → the ``pipeline`` flow (tiny presets).

The pipeline (:mod:`flows.pipeline`) runs ingest → train_dvae → tokenize →
train_bpe → train_dalle → train_clip → evaluate; the evaluation scores the
transformer on held-out ``shapes`` captions with the exact checker and writes
the ranked grid. Everything lives under one folder (default ``demo-data/``):
the images, the dataset root, Prefect's ephemeral database (``PREFECT_HOME``)
and the MLflow SQLite store, so the UIs can be opened on exactly this run
afterwards. The server listens on a fixed loopback port so that URLs, and
therefore shard ids, are the same on every run: a second ``make demo`` skips
all stage work.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table


def _environment(out: Path) -> tuple[str, Path]:
    """Point Prefect and MLflow at folders under ``out`` unless the user already chose servers."""
    out.mkdir(parents=True, exist_ok=True)
    prefect_home = out / "prefect"
    if "PREFECT_API_URL" not in os.environ:
        os.environ.setdefault("PREFECT_HOME", str(prefect_home.resolve()))
    tracking_uri = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{(out / 'mlruns.db').resolve()}"
    return tracking_uri, Path(os.environ.get("PREFECT_HOME", prefect_home))


SHOWN_METRICS = {
    "train_dvae": ("recon_loss", "psnr", "codebook_usage"),
    "train_dalle": ("loss", "text_loss", "image_loss"),
    "train_clip": ("loss", "accuracy"),
    "evaluate": (
        "clip_score_n1",
        "clip_score_n16",
        "shapes_accuracy_all_n1",
        "shapes_accuracy_all_n16",
        "dvae_ceiling_all",
        "fid",
    ),
}
DEMO_EVAL = {"captions": 48, "n_max": 16}


def run_demo(
    out: Path,
    *,
    n: int = 2000,
    size: int = 64,
    port: int = 8765,
    workers: int = 2,
    **pipeline_params: Any,
) -> dict:
    """Run the demo end to end, print a summary table and how to look at the results.

    ``pipeline_params`` go to :func:`flows.pipeline.pipeline` (e.g. ``dvae_overrides``).
    """
    console = Console()
    started = time.monotonic()
    tracking_uri, prefect_home = _environment(out)

    from dalle_lightning.serving.image_server import ImageServer, url_list_for_folder
    from dalle_lightning.synth.shapes_dataset import ShapesConfig, write_shapes_dataset
    from flows.pipeline import run_pipeline

    root = str(out / "data")
    shapes_dir = out / "shapes"
    if (shapes_dir / "shapes.parquet").exists():
        console.print(f"[1/3] synth: reusing {shapes_dir}")
    else:
        console.print(f"[1/3] synth: rendering {n} shapes images at {size}px into {shapes_dir}")
        write_shapes_dataset(str(shapes_dir), ShapesConfig(n=n, size=size, seed=0))
    with ImageServer(str(shapes_dir), port=port) as server:
        urls = out / "urls.parquet"
        url_list_for_folder(server, str(urls))
        console.print(f"[2/3] serve: {shapes_dir} at {server.base_url}")
        console.print(
            "[3/3] pipeline: ingest → train_dvae → tokenize → train_bpe → train_dalle → train_clip → evaluate"
        )
        params = {
            "dataset": "shapes",
            "urls": [str(urls)],
            "shard_size": 250,
            "bpe_vocab_size": 1024,
            "eval_source": "shapes",
            "eval_captions": DEMO_EVAL["captions"],
            "eval_n_max": DEMO_EVAL["n_max"],
            "promote_metric": f"shapes_accuracy_all_n{DEMO_EVAL['n_max']}",
            "tracking_uri": tracking_uri,
            "experiment": "dalle-demo",
            **pipeline_params,
        }
        summary = run_pipeline(root, n_workers=workers, **params)
    summary["elapsed_s"] = time.monotonic() - started
    print_demo_summary(summary, console)
    grid = summary["evaluate"].get("files", {}).get("ranked") or summary["evaluate"].get("artifact_uri")
    lines = [
        f"demo finished in {summary['elapsed_s']:.1f}s; dataset under {out / 'data'}",
        f"  ranked grid:     {grid}",
        f"  generate more:   dalle generate 'a red circle' --dalle {summary['train_dalle']['model_path']} "
        f"--clip {summary['train_clip']['model_path']}",
        f"  reconstructions: dalle reconstruct IMAGE… --dvae {summary['train_dvae']['model_path']}",
        "look at the results:",
        f"  Prefect UI:  PREFECT_HOME={prefect_home.resolve()} prefect server start  → http://127.0.0.1:4200",
        f"  MLflow UI:   mlflow ui --backend-store-uri {tracking_uri} --port 5000  → http://127.0.0.1:5000",
        f"  check data:  dalle verify {out / 'data'}",
    ]
    for line in lines:
        console.print(line, soft_wrap=True, highlight=False)
    return summary


def print_demo_summary(summary: dict[str, Any], console: Console) -> None:
    """One row per stage: whether it did work, its counts, losses and metrics."""
    table = Table(title="pipeline", show_header=True)
    table.add_column("stage")
    table.add_column("work")
    table.add_column("figures")
    ingest = summary["ingest"]
    rows = {
        "ingest": f"{ingest['input']} URLs, {ingest['downloaded']} downloaded, {ingest['kept']} kept",
        "tokenize": f"{summary['tokenize']['rows']} images → {summary['tokenize']['path']}",
        "train_bpe": f"BPE {summary['train_bpe']['bpe_fingerprint'][:12]}",
    }
    for stage, keys in SHOWN_METRICS.items():
        rows[stage] = _metrics_line(summary[stage].get("metrics", {}), keys)
    for stage, work in summary["did_work"].items():
        table.add_row(stage, "done" if work else "skipped", rows.get(stage, ""))
    console.print(table)


def _metrics_line(metrics: dict[str, Any], keys: tuple[str, ...]) -> str:
    """``name value, …`` of the chosen metrics (the last path component of each name), 3 significant digits."""
    values = {k.split("/")[-1]: v for k, v in metrics.items() if isinstance(v, int | float)}
    return ", ".join(f"{k} {values[k]:.3g}" for k in keys if k in values)
