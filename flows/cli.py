"""The ``dalle`` command line. Every command is a thin call into a flow or a stage function.

Heavy imports (Prefect, MLflow, img2dataset) happen inside the commands, so
``dalle --help`` is fast and environment settings made by a command (e.g. the
demo's ``PREFECT_HOME``) take effect before Prefect reads them.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(
    help="dalle-lightning: DALL-E end to end on Prefect, Dask, img2dataset and MLflow.", no_args_is_help=True
)
synth_app = typer.Typer(help="Make synthetic data sets.", no_args_is_help=True)
app.add_typer(synth_app, name="synth")


@synth_app.command("shapes")
def synth_shapes(
    out: Annotated[Path, typer.Argument(help="Output folder (images/ and shapes.parquet).")],
    n: Annotated[int, typer.Option(help="Number of images.")] = 2000,
    size: Annotated[int, typer.Option(help="Image side in pixels.")] = 64,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
) -> None:
    """Render the synthetic `shapes` set: 1-2 coloured shapes per image, captions, ground truth, held-out pairings."""
    from dalle_lightning.synth.shapes_dataset import ShapesConfig, write_shapes_dataset

    table = write_shapes_dataset(str(out), ShapesConfig(n=n, size=size, seed=seed))
    splits = ", ".join(
        f"{s['values']}: {s['counts']}" for s in table.column("split").value_counts().to_pylist()
    )
    typer.echo(f"wrote {table.num_rows} images to {out} ({splits})")


@app.command("serve-images")
def serve_images(
    directory: Annotated[
        Path, typer.Argument(help="Folder to serve (e.g. the output of `dalle synth shapes`).")
    ],
    port: Annotated[int, typer.Option(help="Port (0 picks a free one).")] = 8765,
    host: Annotated[
        str, typer.Option(help="Address to bind; loopback unless you mean otherwise.")
    ] = "127.0.0.1",
    urls_out: Annotated[Path | None, typer.Option(help="Where to write the URL list Parquet.")] = None,
) -> None:
    """Serve a folder of images over HTTP and write the URL list for it; runs until Ctrl-C."""
    import time

    from dalle_lightning.serving.image_server import ImageServer, url_list_for_folder

    urls_out = urls_out or directory / "urls.parquet"
    with ImageServer(str(directory), host=host, port=port) as server:
        written = url_list_for_folder(server, str(urls_out))
        typer.echo(f"serving {directory} at {server.base_url}; {written.rows} URLs written to {urls_out}")
        typer.echo("press Ctrl-C to stop")
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            typer.echo("stopped")


@app.command()
def ingest(
    urls: Annotated[
        list[str] | None, typer.Option(help="URL list file(s)/folder: Parquet, CSV, TSV, JSONL.")
    ] = None,
    root: Annotated[str, typer.Option(help="Dataset root: a folder or any fsspec URL (s3://…).")] = "data",
    name: Annotated[str, typer.Option(help="Dataset name (folder under each stage).")] = "default",
    shard_size: Annotated[
        int, typer.Option(help="Rows per shard (the unit of parallelism and caching).")
    ] = 256,
    config: Annotated[Path | None, typer.Option(help="YAML with `download:` and `filter:` sections.")] = None,
    set_: Annotated[
        list[str] | None,
        typer.Option("--set", help="Override a setting: download.timeout=5, filter.phash_threshold=4"),
    ] = None,
    dask_address: Annotated[
        str | None, typer.Option(help="Existing Dask scheduler (default: a LocalCluster).")
    ] = None,
    workers: Annotated[int | None, typer.Option(help="Worker processes of the local Dask cluster.")] = None,
    tracking_uri: Annotated[
        str | None,
        typer.Option(help="MLflow tracking URI (default $MLFLOW_TRACKING_URI or sqlite:///mlruns.db)."),
    ] = None,
    experiment: Annotated[str, typer.Option(help="MLflow experiment.")] = "dalle-lightning",
) -> None:
    """Download and filter a URL list (flow `ingest`): only new or changed shards are processed."""
    from dalle_lightning.config_overrides import build, load_sections
    from dalle_lightning.stages.download import DownloadConfig
    from dalle_lightning.stages.filter import FilterConfig
    from flows.ingest import run_ingest
    from flows.summary import print_ingest_summary

    sections = load_sections(config, set_ or [])
    unknown = set(sections) - {"download", "filter"}
    if unknown:
        raise typer.BadParameter(f"unknown config section(s) {sorted(unknown)}; expected download, filter")
    summary = run_ingest(
        root,
        dask_address=dask_address,
        n_workers=workers,
        name=name,
        urls=urls,
        shard_size=shard_size,
        download=build(DownloadConfig, sections.get("download", {}), "download"),
        filter=build(FilterConfig, sections.get("filter", {}), "filter"),
        tracking_uri=tracking_uri,
        experiment=experiment,
    )
    print_ingest_summary(summary)


@app.command()
def verify(
    root: Annotated[str, typer.Argument(help="Dataset root to check.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
) -> None:
    """Check every Parquet file under ROOT against its schema and its manifest; exit 1 on any problem."""
    from dalle_lightning.datasets.verify import verify_tree

    report = verify_tree(root)
    if as_json:
        typer.echo(
            json.dumps(
                {"checked": report.checked, "rows": report.rows, "problems": report.problems}, indent=1
            )
        )
    else:
        for problem in report.problems:
            typer.echo(f"PROBLEM {problem}", err=True)
        typer.echo(f"{report.checked} files, {report.rows} rows checked: {len(report.problems)} problem(s)")
    raise typer.Exit(0 if report.ok else 1)


@app.command("train-dvae")
def train_dvae(
    root: Annotated[str, typer.Option(help="Dataset root.")] = "data",
    dataset: Annotated[str, typer.Option(help="Dataset name (filter/<name>).")] = "default",
    preset: Annotated[str, typer.Option(help="tiny (CPU, minutes), small (one GPU) or paper.")] = "tiny",
    set_: Annotated[
        list[str] | None,
        typer.Option("--set", help="Override a setting: train.max_steps=500, model.vocab_size=512"),
    ] = None,
    tracking_uri: Annotated[str | None, typer.Option(help="MLflow tracking URI.")] = None,
    experiment: Annotated[str, typer.Option(help="MLflow experiment.")] = "dalle-lightning",
) -> None:
    """Train the dVAE on the filtered images (flow `train_dvae`) and register it in MLflow as `dvae`."""
    from dalle_lightning.config_overrides import load_sections
    from flows.prefect_api import prefect_api
    from flows.train_dvae import train_dvae as train_dvae_flow

    with prefect_api():
        result = train_dvae_flow(
            root=root,
            dataset=dataset,
            preset=preset,
            overrides=load_sections(None, set_ or []),
            tracking_uri=tracking_uri,
            experiment=experiment,
        )
    state = "trained" if result["did_work"] else "already trained (same config and data)"
    typer.echo(f"dVAE {result['dvae_version']} {state}: {result['model_path']}")
    typer.echo(
        f"registered as dvae version {result.get('registered_version')}; metrics {result.get('metrics')}"
    )


@app.command()
def tokenize(
    root: Annotated[str, typer.Option(help="Dataset root.")] = "data",
    dataset: Annotated[str, typer.Option(help="Dataset name (filter/<name>).")] = "default",
    dvae: Annotated[
        str, typer.Option(help="dVAE checkpoint path or MLflow URI (models:/dvae/3).")
    ] = "models:/dvae/latest",
    set_: Annotated[
        list[str] | None, typer.Option("--set", help="Override a setting: tokenize.batch_size=128")
    ] = None,
    dask_address: Annotated[
        str | None, typer.Option(help="Existing Dask scheduler (default: a LocalCluster).")
    ] = None,
    workers: Annotated[int | None, typer.Option(help="Worker processes of the local Dask cluster.")] = None,
    tracking_uri: Annotated[str | None, typer.Option(help="MLflow tracking URI.")] = None,
    experiment: Annotated[str, typer.Option(help="MLflow experiment.")] = "dalle-lightning",
) -> None:
    """Encode the filtered images into dVAE codes (flow `tokenize`): only shards not yet done with this dVAE."""
    from dalle_lightning.config_overrides import build, load_sections
    from dalle_lightning.stages.tokenize import TokenizeConfig
    from flows.tokenize import run_tokenize

    sections = load_sections(None, set_ or [])
    summary = run_tokenize(
        root,
        dask_address=dask_address,
        n_workers=workers,
        dataset=dataset,
        dvae=dvae,
        config=build(TokenizeConfig, sections.get("tokenize", {}), "tokenize"),
        tracking_uri=tracking_uri,
        experiment=experiment,
    )
    work = ", ".join(f"{k} {v}" for k, v in sorted(summary["work"]["tokenize"].items()))
    typer.echo(
        f"tokenized {summary['rows']} images in {summary['shards']} shards ({work}) -> {summary['path']}"
    )


@app.command("train-bpe")
def train_bpe(
    root: Annotated[str, typer.Option(help="Dataset root.")] = "data",
    dataset: Annotated[str, typer.Option(help="Dataset name (filter/<name>: its captions).")] = "default",
    set_: Annotated[
        list[str] | None,
        typer.Option("--set", help="Override a setting: bpe.vocab_size=1024, bpe.min_frequency=2"),
    ] = None,
    tracking_uri: Annotated[str | None, typer.Option(help="MLflow tracking URI.")] = None,
    experiment: Annotated[str, typer.Option(help="MLflow experiment.")] = "dalle-lightning",
) -> None:
    """Train the caption BPE on the filtered captions (flow `train_bpe`); skipped if the same one exists."""
    from dalle_lightning.config_overrides import build, load_sections
    from dalle_lightning.stages.bpe import BPEConfig
    from flows.train_bpe import run_train_bpe

    sections = load_sections(None, set_ or [])
    unknown = set(sections) - {"bpe"}
    if unknown:
        raise typer.BadParameter(f"unknown config section(s) {sorted(unknown)}; expected bpe")
    result = run_train_bpe(
        root,
        dataset=dataset,
        config=build(BPEConfig, sections.get("bpe", {}), "bpe"),
        tracking_uri=tracking_uri,
        experiment=experiment,
    )
    state = "trained" if result["did_work"] else "already trained (same captions and settings)"
    typer.echo(
        f"BPE {result['bpe_fingerprint']} {state}: {result['vocab_size']} tokens from "
        f"{result['stats']['captions']} captions -> {result['tokenizer_path']}"
    )


@app.command("train-dalle")
def train_dalle(
    root: Annotated[str, typer.Option(help="Dataset root.")] = "data",
    dataset: Annotated[str, typer.Option(help="Dataset name (tokens/<dvae>/<name>).")] = "default",
    dvae: Annotated[
        str | None,
        typer.Option(
            help="dVAE checkpoint path or MLflow URI whose tokens to train on [default: models:/dvae/latest]."
        ),
    ] = None,
    dvae_version: Annotated[
        str | None, typer.Option(help="Train on tokens/<version>/… without naming the dVAE model.")
    ] = None,
    bpe: Annotated[
        str | None,
        typer.Option(help="Caption BPE (tokenizer.json); default: the latest `train-bpe` of the dataset."),
    ] = None,
    preset: Annotated[str, typer.Option(help="tiny (CPU, minutes), small (one GPU) or paper.")] = "tiny",
    set_: Annotated[
        list[str] | None,
        typer.Option(
            "--set", help="Override a setting: train.max_steps=500, train.devices=4, model.n_layer=8"
        ),
    ] = None,
    tracking_uri: Annotated[str | None, typer.Option(help="MLflow tracking URI.")] = None,
    experiment: Annotated[str, typer.Option(help="MLflow experiment.")] = "dalle-lightning",
) -> None:
    """Train the transformer on the dVAE tokens (flow `train_dalle`) and register it in MLflow as `dalle`."""
    from dalle_lightning.config_overrides import load_sections
    from flows.train_dalle import run_train_dalle

    if dvae is None and dvae_version is None:
        dvae = "models:/dvae/latest"
    result = run_train_dalle(
        root,
        dataset=dataset,
        dvae=dvae,
        dvae_version=dvae_version,
        bpe=bpe,
        preset=preset,
        overrides=load_sections(None, set_ or []),
        tracking_uri=tracking_uri,
        experiment=experiment,
    )
    state = "trained" if result["did_work"] else "already trained (same config and data)"
    typer.echo(f"DALL-E on dVAE {result['dvae_version']} tokens {state}: {result['model_path']}")
    typer.echo(
        f"registered as dalle version {result.get('registered_version')}; metrics {result.get('metrics')}"
    )


@app.command()
def reconstruct(
    images: Annotated[list[Path], typer.Argument(help="Image files to encode and decode.")],
    dvae: Annotated[str, typer.Option(help="dVAE checkpoint path or MLflow URI (models:/dvae/3).")],
    out: Annotated[Path, typer.Option(help="Grid PNG: originals above their reconstructions.")] = Path(
        "reconstruction.png"
    ),
    tracking_uri: Annotated[str | None, typer.Option(help="MLflow tracking URI (for models:/ URIs).")] = None,
) -> None:
    """Round-trip images through a dVAE and write an original/reconstruction grid."""
    import numpy as np
    import torch

    from dalle_lightning.data.transforms import center_crop_resize, decode_image, to_tensor, to_uint8
    from dalle_lightning.image_grid import image_grid
    from dalle_lightning.models.dvae import load_dvae
    from flows import tracking
    from flows.models_registry import resolve_checkpoint

    if dvae.startswith(("models:/", "runs:/")):
        tracking.setup(tracking_uri)
    model = load_dvae(resolve_checkpoint(dvae)).eval()
    size = model.config.image_size
    originals = np.stack([center_crop_resize(decode_image(p.read_bytes()), size) for p in images])
    with torch.inference_mode():
        codes = model.get_codebook_indices(to_tensor(originals))
        reconstructions = to_uint8(model.decode_indices(codes))
    image_grid([originals, reconstructions], scale=max(1, 128 // size)).save(out)
    typer.echo(f"wrote {out} ({len(images)} images, {tuple(codes.shape[1:])} codes each)")


@app.command()
def demo(
    out: Annotated[Path, typer.Option(help="Folder for everything the demo makes.")] = Path("demo-data"),
    n: Annotated[int, typer.Option(help="Synthetic images.")] = 2000,
    size: Annotated[int, typer.Option(help="Image side in pixels.")] = 64,
    port: Annotated[
        int, typer.Option(help="Loopback port of the image server (fixed, so URLs and shard ids are stable).")
    ] = 8765,
    workers: Annotated[int, typer.Option(help="Dask worker processes.")] = 2,
) -> None:
    """synth shapes → serve over loopback → ingest, on embedded defaults (no server to start)."""
    from flows.demo import run_demo

    run_demo(out, n=n, size=size, port=port, workers=workers)


def main() -> None:  # pragma: no cover - console entry
    app()


if __name__ == "__main__":
    sys.exit(main())
