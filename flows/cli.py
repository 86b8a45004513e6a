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
    p_two_objects: Annotated[
        float,
        typer.Option(
            help="Share of images with two objects (0: one object each, what `tiny_search` CLIP wants)."
        ),
    ] = 0.5,
) -> None:
    """Render the synthetic `shapes` set: 1-2 coloured shapes per image, captions, ground truth, held-out pairings."""
    from dalle_lightning.synth.shapes_dataset import ShapesConfig, write_shapes_dataset

    table = write_shapes_dataset(
        str(out), ShapesConfig(n=n, size=size, seed=seed, p_two_objects=p_two_objects)
    )
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
    from collections import Counter

    from dalle_lightning.datasets.verify import verify_tree

    report = verify_tree(root)
    if as_json:
        typer.echo(
            json.dumps(
                {
                    "checked": report.checked,
                    "rows": report.rows,
                    "problems": report.problems,
                    "findings": report.findings,
                },
                indent=1,
            )
        )
    else:
        for problem in report.problems:
            typer.echo(f"PROBLEM {problem}", err=True)
        kinds = Counter(f["kind"] for f in report.findings)
        by_kind = f" ({', '.join(f'{n} {k}' for k, n in sorted(kinds.items()))})" if kinds else ""
        typer.echo(
            f"{report.checked} files, {report.rows} rows checked: {len(report.problems)} problem(s){by_kind}"
        )
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
    from flows.tokenize_images import run_tokenize

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


@app.command()
def embed(
    root: Annotated[str, typer.Option(help="Dataset root.")] = "data",
    dataset: Annotated[str, typer.Option(help="Dataset name (filter/<name>).")] = "default",
    clip: Annotated[
        str, typer.Option(help="CLIP checkpoint path or MLflow URI (models:/clip/3).")
    ] = "models:/clip/latest",
    set_: Annotated[
        list[str] | None, typer.Option("--set", help="Override a setting: embed.batch_size=512")
    ] = None,
    dask_address: Annotated[
        str | None, typer.Option(help="Existing Dask scheduler (default: a LocalCluster).")
    ] = None,
    workers: Annotated[int | None, typer.Option(help="Worker processes of the local Dask cluster.")] = None,
    tracking_uri: Annotated[str | None, typer.Option(help="MLflow tracking URI.")] = None,
    experiment: Annotated[str, typer.Option(help="MLflow experiment.")] = "dalle-lightning",
) -> None:
    """Embed the filtered images and captions with a CLIP (flow `embed`): only shards not yet done with it."""
    from dalle_lightning.config_overrides import build, load_sections
    from dalle_lightning.stages.embed import EmbedConfig
    from flows.embed import run_embed

    sections = load_sections(None, set_ or [])
    unknown = set(sections) - {"embed"}
    if unknown:
        raise typer.BadParameter(f"unknown config section(s) {sorted(unknown)}; expected embed")
    summary = run_embed(
        root,
        dask_address=dask_address,
        n_workers=workers,
        dataset=dataset,
        clip=clip,
        config=build(EmbedConfig, sections.get("embed", {}), "embed"),
        tracking_uri=tracking_uri,
        experiment=experiment,
    )
    work = ", ".join(f"{k} {v}" for k, v in sorted(summary["work"]["embed"].items()))
    typer.echo(
        f"embedded {summary['rows']} images in {summary['shards']} shards ({work}) -> {summary['path']}"
    )


@app.command()
def search(
    query: Annotated[str, typer.Argument(help='What to look for, in words: "a red circle".')],
    k: Annotated[int, typer.Option(help="Number of results.", min=1)] = 16,
    root: Annotated[str, typer.Option(help="Dataset root.")] = "data",
    dataset: Annotated[str, typer.Option(help="Dataset name (embeddings/<clip>/<name>).")] = "default",
    clip: Annotated[
        str, typer.Option(help="CLIP checkpoint path or MLflow URI the embeddings were made with.")
    ] = "models:/clip/latest",
    out: Annotated[Path | None, typer.Option(help="Write the hits' images as a PNG grid here.")] = None,
    tracking_uri: Annotated[str | None, typer.Option(help="MLflow tracking URI (for models:/ URIs).")] = None,
) -> None:
    """Find the dataset's images that best match QUERY by their CLIP embeddings (made by `dalle embed`)."""
    from dalle_lightning.search.index import ImageSearch
    from flows import tracking
    from flows.models_registry import resolve_checkpoint

    if clip.startswith(("models:/", "runs:/")):
        tracking.setup(tracking_uri)
    searcher = ImageSearch.from_clip(root, dataset, resolve_checkpoint(clip))
    hits = searcher.search(query, k)
    typer.echo(f"{'rank':>4}  {'score':>7}  {'key':<24}  caption  [url]")
    for rank, hit in enumerate(hits, 1):
        typer.echo(f"{rank:>4}  {hit.score:7.4f}  {hit.key:<24}  {hit.caption}  [{hit.url}]")
    if out is not None and hits:
        searcher.grid_png(hits, out)
        typer.echo(f"wrote {out} ({len(hits)} images)")


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


@app.command("train-clip")
def train_clip(
    root: Annotated[str, typer.Option(help="Dataset root.")] = "data",
    dataset: Annotated[
        str, typer.Option(help="Dataset name (filter/<name>: its images and captions).")
    ] = "default",
    bpe: Annotated[
        str | None,
        typer.Option(help="Caption BPE (tokenizer.json); default: the latest `train-bpe` of the dataset."),
    ] = None,
    preset: Annotated[str, typer.Option(help="tiny (CPU, minutes) or small (one GPU).")] = "tiny",
    set_: Annotated[
        list[str] | None,
        typer.Option("--set", help="Override a setting: train.max_steps=500, model.vision_layers=4"),
    ] = None,
    tracking_uri: Annotated[str | None, typer.Option(help="MLflow tracking URI.")] = None,
    experiment: Annotated[str, typer.Option(help="MLflow experiment.")] = "dalle-lightning",
) -> None:
    """Train CLIP on the filtered images and captions (flow `train_clip`) and register it in MLflow as `clip`."""
    from dalle_lightning.config_overrides import load_sections
    from flows.train_clip import run_train_clip

    result = run_train_clip(
        root,
        dataset=dataset,
        bpe=bpe,
        preset=preset,
        overrides=load_sections(None, set_ or []),
        tracking_uri=tracking_uri,
        experiment=experiment,
    )
    state = "trained" if result["did_work"] else "already trained (same config, data and BPE)"
    typer.echo(f"CLIP {state}: {result['model_path']}")
    typer.echo(
        f"registered as clip version {result.get('registered_version')}; metrics {result.get('metrics')}"
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
def pipeline(
    root: Annotated[str, typer.Option(help="Dataset root (a folder or fsspec URL).")] = "data",
    dataset: Annotated[str, typer.Option(help="Dataset name.")] = "default",
    urls: Annotated[
        list[str] | None, typer.Option(help="URL list file(s) (Parquet/CSV with url, caption); repeatable.")
    ] = None,
    shard_size: Annotated[int, typer.Option(help="URLs per shard.")] = 256,
    dvae_preset: Annotated[str, typer.Option(help="dVAE preset.")] = "tiny",
    dalle_preset: Annotated[str, typer.Option(help="Transformer preset.")] = "tiny",
    clip_preset: Annotated[str, typer.Option(help="CLIP preset.")] = "tiny",
    bpe_vocab_size: Annotated[int, typer.Option(help="Caption BPE vocabulary size.")] = 1024,
    eval_source: Annotated[str, typer.Option(help="Evaluation captions: filter or shapes.")] = "filter",
    eval_captions: Annotated[int, typer.Option(help="Captions in the evaluation set.")] = 64,
    eval_n_max: Annotated[int, typer.Option(help="Samples drawn per evaluation caption.")] = 16,
    config: Annotated[
        Path | None,
        typer.Option(help="YAML with sections download, filter, dvae, dalle, clip, eval."),
    ] = None,
    set_: Annotated[
        list[str] | None,
        typer.Option("--set", help="Override a setting: dvae.train.max_steps=500, download.timeout=5"),
    ] = None,
    dask_address: Annotated[
        str | None, typer.Option(help="Dask scheduler (default: $DALLE_DASK_ADDRESS or a local cluster).")
    ] = None,
    workers: Annotated[int | None, typer.Option(help="Local Dask worker processes.")] = None,
    tracking_uri: Annotated[str | None, typer.Option(help="MLflow tracking URI.")] = None,
    experiment: Annotated[str, typer.Option(help="MLflow experiment.")] = "dalle-lightning",
) -> None:
    """Every stage, each incremental: ingest → dVAE → tokenize → BPE → transformer → CLIP → evaluate."""
    from dalle_lightning.config_overrides import load_sections
    from flows.pipeline import pipeline_overrides, run_pipeline

    summary = run_pipeline(
        root,
        dask_address=dask_address,
        n_workers=workers,
        dataset=dataset,
        urls=urls,
        shard_size=shard_size,
        dvae_preset=dvae_preset,
        dalle_preset=dalle_preset,
        clip_preset=clip_preset,
        bpe_vocab_size=bpe_vocab_size,
        eval_source=eval_source,
        eval_captions=eval_captions,
        eval_n_max=eval_n_max,
        tracking_uri=tracking_uri,
        experiment=experiment,
        **pipeline_overrides(load_sections(config, set_ or [])),
    )
    from rich.console import Console

    from flows.demo import print_demo_summary

    print_demo_summary(summary, Console())
    typer.echo(f"pipeline done in {summary['elapsed_s']:.1f}s; MLflow run {summary['mlflow_run_id']}")


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
    """synth shapes → serve over loopback → the whole pipeline with the tiny presets (embedded defaults)."""
    from flows.demo import run_demo

    run_demo(out, n=n, size=size, port=port, workers=workers)


@app.command()
def generate(
    caption: Annotated[
        str, typer.Argument(help='What to draw, in words: "a red circle above a blue square".')
    ],
    dalle: Annotated[
        str,
        typer.Option(help="DALL-E checkpoint path or MLflow URI (models:/dalle@champion, models:/dalle/1)."),
    ] = "models:/dalle/latest",
    clip: Annotated[
        str, typer.Option(help="CLIP checkpoint path or MLflow URI that reranks the samples.")
    ] = "models:/clip/latest",
    dvae: Annotated[
        str | None,
        typer.Option(
            help="dVAE path or MLflow URI [default: the registered dVAE the DALL-E was trained on]."
        ),
    ] = None,
    bpe: Annotated[
        str | None,
        typer.Option(
            help="The DALL-E's caption BPE (tokenizer.json) [default: the one its training logged]."
        ),
    ] = None,
    n: Annotated[int, typer.Option(help="Samples to draw (the paper reranks 512).", min=1)] = 64,
    top: Annotated[int, typer.Option(help="Best samples to keep in the grid.", min=1)] = 8,
    out: Annotated[Path, typer.Option(help="Grid PNG: the best samples with their CLIP scores.")] = Path(
        "grid.png"
    ),
    seed: Annotated[int, typer.Option(help="Seed of the sampling noise.", min=0)] = 0,
    temperature: Annotated[float, typer.Option(help="Divides the logits; 0 is greedy.")] = 1.0,
    top_k: Annotated[int | None, typer.Option(help="Sample among the k most likely codes only.")] = None,
    top_p: Annotated[float | None, typer.Option(help="Sample from the top-p nucleus only.")] = None,
    cond_scale: Annotated[float, typer.Option(help="Classifier-free guidance scale (1: none).")] = 1.0,
    batch_size: Annotated[int, typer.Option(help="Sequences sampled at once.", min=1)] = 16,
    device: Annotated[str, typer.Option(help="cpu, cuda, cuda:1… or auto.")] = "auto",
    tracking_uri: Annotated[str | None, typer.Option(help="MLflow tracking URI (for models:/ URIs).")] = None,
) -> None:
    """Draw N images for CAPTION, rerank them with CLIP and write the best as a grid with their scores."""
    import mlflow
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from dalle_lightning.generation.sampling import SamplingConfig
    from flows import tracking
    from flows.generate import generate_grid, load_models

    if top > n:
        raise typer.BadParameter(f"--top {top} is more than --n {n} samples")
    try:
        sampling = SamplingConfig(
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            cond_scale=cond_scale,
            batch_size=batch_size,
            seed=seed,
        )
    except ValueError as err:
        raise typer.BadParameter(str(err)) from err
    mlflow.set_tracking_uri(tracking.resolve_tracking_uri(tracking_uri))
    models = load_models(dalle, clip, dvae, bpe, device)
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns) as progress:
        bar = progress.add_task(f"sampling {n} images (codes)", total=n * models.dalle.config.image_len)
        ranked, path = generate_grid(
            models,
            caption,
            out,
            n=n,
            top=top,
            sampling=sampling,
            progress=lambda done, total: progress.update(bar, completed=done, total=total),
        )
        progress.update(bar, completed=progress.tasks[bar].total)
    typer.echo(f"wrote {path}: the best {top} of {n} samples for {caption!r}")
    typer.echo(f"{'rank':>4}  {'score':>7}  sample")
    for rank, (score, index) in enumerate(zip(ranked.scores[:top], ranked.order[:top], strict=True), 1):
        typer.echo(f"{rank:>4}  {score:7.4f}  {index}")


@app.command()
def evaluate(
    dalle: Annotated[
        str,
        typer.Option(help="DALL-E checkpoint path or MLflow URI (models:/dalle@champion, models:/dalle/1)."),
    ] = "models:/dalle/latest",
    clip: Annotated[
        str, typer.Option(help="CLIP checkpoint path or MLflow URI (reranks, scores, FID features).")
    ] = "models:/clip/latest",
    dvae: Annotated[
        str | None,
        typer.Option(
            help="dVAE path or MLflow URI [default: the registered dVAE the DALL-E was trained on]."
        ),
    ] = None,
    bpe: Annotated[
        str | None,
        typer.Option(
            help="The DALL-E's caption BPE (tokenizer.json) [default: the one its training logged]."
        ),
    ] = None,
    captions: Annotated[
        str,
        typer.Option(
            help="Caption set: shapes (generator, fixed seed) or filter (fixed sample of a dataset)."
        ),
    ] = "shapes",
    count: Annotated[int, typer.Option(help="Captions in the set.", min=1)] = 64,
    n_max: Annotated[
        int, typer.Option(help="Samples per caption (the curve runs N = 1, 2, 4 … n-max).", min=1)
    ] = 64,
    root: Annotated[str | None, typer.Option(help="Dataset root (for --captions filter).")] = None,
    dataset: Annotated[
        str, typer.Option(help="Dataset name (filter/<name>, for --captions filter).")
    ] = "default",
    set_: Annotated[
        list[str] | None,
        typer.Option(
            "--set",
            help="Override a setting: sampling.temperature=0.9, eval.accuracy_ns=[1,4,16], captions.seed=7",
        ),
    ] = None,
    out: Annotated[Path | None, typer.Option(help="Also keep the grids and per-caption scores here.")] = None,
    device: Annotated[str, typer.Option(help="cpu, cuda, cuda:1… or auto.")] = "auto",
    tracking_uri: Annotated[str | None, typer.Option(help="MLflow tracking URI.")] = None,
    experiment: Annotated[str, typer.Option(help="MLflow experiment.")] = "dalle-lightning",
) -> None:
    """Evaluate a DALL-E on a fixed caption set (flow `evaluate`): CLIP-score curve, FID, shapes accuracy."""
    import dataclasses

    from rich.console import Console
    from rich.table import Table

    from dalle_lightning.config_overrides import build, load_sections
    from dalle_lightning.evaluation.eval_sets import EvalSetConfig
    from dalle_lightning.evaluation.evaluate import EvalConfig
    from dalle_lightning.generation.sampling import SamplingConfig
    from flows.evaluate import run_evaluate

    sections = load_sections(None, set_ or [])
    unknown = set(sections) - {"eval", "sampling", "captions"}
    if unknown:
        raise typer.BadParameter(
            f"unknown config section(s) {sorted(unknown)}; expected eval, sampling, captions"
        )
    try:
        caption_set = build(
            EvalSetConfig,
            {"source": captions, "count": count, "dataset": dataset, **sections.get("captions", {})},
            "captions",
        )
        config = build(EvalConfig, {"n_max": n_max, **sections.get("eval", {})}, "eval")
        config = dataclasses.replace(
            config, sampling=build(SamplingConfig, sections.get("sampling", {}), "sampling")
        )
    except ValueError as err:
        raise typer.BadParameter(str(err)) from err
    if caption_set.source == "filter" and root is None:
        raise typer.BadParameter("--captions filter needs --root (the dataset root to sample)")
    result = run_evaluate(
        dalle=dalle,
        clip=clip,
        dvae=dvae,
        bpe=bpe,
        root=root,
        captions=caption_set,
        config=config,
        out_dir=str(out) if out is not None else None,
        device=device,
        tracking_uri=tracking_uri,
        experiment=experiment,
    )
    metrics = result["metrics"]
    table = Table(title=f"evaluation on caption set {result['eval_set_fingerprint']}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_column("± stderr", justify="right")
    for name in sorted(k for k in metrics if not k.endswith("_stderr")):
        stderr = metrics.get(f"{name}_stderr")
        table.add_row(name, f"{metrics[name]:.4f}", "" if stderr is None else f"{stderr:.4f}")
    Console().print(table)
    typer.echo(f"MLflow run {result['mlflow_run_id']}; grids at {result['artifact_uri']}")


@app.command()
def compare(
    metric: Annotated[
        str, typer.Option(help="Metric to sort by: clip_score_n64, fid, shapes_accuracy_heldout_n16…")
    ],
    experiment: Annotated[str, typer.Option(help="MLflow experiment.")] = "dalle-lightning",
    top: Annotated[int, typer.Option(help="Runs to show.", min=1)] = 20,
    ascending: Annotated[
        bool | None,
        typer.Option(
            "--ascending/--descending",
            help="Sort order [default: ascending for fid*/loss*, else descending].",
        ),
    ] = None,
    columns: Annotated[
        list[str] | None, typer.Option("--column", help="Another metric to show (repeat for more).")
    ] = None,
    tracking_uri: Annotated[str | None, typer.Option(help="MLflow tracking URI.")] = None,
) -> None:
    """List the runs of an MLflow experiment that logged METRIC, best first, as a table."""
    from flows.evaluate import compare_runs, print_comparison

    try:
        rows = compare_runs(experiment, metric, top=top, ascending=ascending, tracking_uri=tracking_uri)
    except ValueError as err:
        raise typer.BadParameter(str(err)) from err
    if not rows:
        typer.echo(f"no run of experiment {experiment!r} logged {metric!r}")
        return
    print_comparison(rows, metric, columns)


@app.command()
def serve(
    flow: Annotated[
        list[str] | None,
        typer.Option(help="Serve only this flow (ingest) or deployment (ingest/nightly); repeatable."),
    ] = None,
    schedules: Annotated[
        bool, typer.Option(help="Keep the cron schedules of prefect.yaml (--no-schedules: trigger by hand).")
    ] = True,
    root: Annotated[
        str | None, typer.Option(help="Dataset root for every flow that takes one (default: prefect.yaml's).")
    ] = None,
    config: Annotated[
        Path | None, typer.Option(help="The deployments file (default ./prefect.yaml, else the checkout's).")
    ] = None,
    limit: Annotated[int | None, typer.Option(help="At most this many runs at once.")] = None,
) -> None:
    """Serve the flows of prefect.yaml as deployments from this process (PREFECT_API_URL: a server); Ctrl-C stops."""
    from flows.serve import serve as serve_flows

    try:
        serve_flows(config, flows=flow, schedules=schedules, root=root, limit=limit)
    except (ValueError, FileNotFoundError) as err:
        raise typer.BadParameter(str(err)) from err


def main() -> None:  # pragma: no cover - console entry
    app()


if __name__ == "__main__":
    sys.exit(main())
