"""Flow ``embed``: every ``filtered`` shard as CLIP image and caption embeddings (``embeddings/<clip version>/<name>``).

One Dask task per shard, cached by Prefect on hash(filter shard fingerprint,
CLIP version, stage version) and recorded in a manifest: an unchanged CLIP
skips every finished shard, a new one re-embeds into its own folder. The CLIP
is named by path or by MLflow registry URI. The embeddings feed ``dalle search``
(:mod:`dalle_lightning.search.index`) and CLIP-score filters.
"""

from __future__ import annotations

import functools
import time
from typing import Any

from prefect import flow, get_run_logger, task

from dalle_lightning.datasets.layout import DatasetLayout, part_name
from dalle_lightning.datasets.manifest import run_once
from dalle_lightning.datasets.prune import prune_stale
from dalle_lightning.stages import embed as embed_stage
from dalle_lightning.stages.embed import EmbedConfig
from flows import tracking
from flows.ingest import _by_fingerprint, _collect, _submit
from flows.tokenize_images import _filter_shards


def embeddings_stage(clip_version: str) -> str:
    """Manifest stage name of the embeddings made by one CLIP."""
    return f"embeddings-{clip_version}"


def embeddings_path(layout: DatasetLayout, clip_version: str, name: str, shard_id: str) -> str:
    return layout.join("embeddings", clip_version, name, part_name(shard_id))


@functools.lru_cache(maxsize=2)
def _load(model_path: str) -> tuple[Any, Any]:
    """The CLIP and its tokenizer, loaded once per worker process."""
    from dalle_lightning.models.clip import load_clip

    return load_clip(model_path)


@task(
    name="embed-shard",
    task_run_name="embed-{shard_id}",
    cache_key_fn=_by_fingerprint,
    persist_result=True,
    retries=2,
    retry_delay_seconds=1,
)
def embed_task(
    root: str,
    name: str,
    shard_id: str,
    model_path: str,
    clip_version: str,
    config: EmbedConfig,
    fingerprint: str,
    input_fingerprint: str,
) -> dict[str, Any]:
    layout = DatasetLayout(root)

    def work() -> tuple[dict, dict]:
        start = time.perf_counter()
        model, tokenizer = _load(model_path)
        table = embed_stage.embed_shard(
            layout.shard("filter", name, shard_id), model, tokenizer, config, clip_version=clip_version
        )
        written = embed_stage.write_embeddings(table, embeddings_path(layout, clip_version, name, shard_id))
        seconds = time.perf_counter() - start
        return {"output": written}, {
            "rows": written.rows,
            "seconds": seconds,
            "images_per_s": written.rows / seconds,
        }

    manifest, did_work = run_once(
        layout.manifest(embeddings_stage(clip_version), name, shard_id),
        fingerprint,
        work,
        stage=embeddings_stage(clip_version),
        dataset=name,
        shard_id=shard_id,
        input_fingerprint=input_fingerprint,
    )
    return {"shard_id": shard_id, "did_work": did_work, "stats": manifest.stats}


@flow(name="embed")
def embed(
    root: str,
    dataset: str = "default",
    clip: str = "models:/clip/latest",
    config: EmbedConfig | None = None,
    tracking_uri: str | None = None,
    experiment: str = tracking.DEFAULT_EXPERIMENT,
) -> dict[str, Any]:
    """Embed ``filter/<dataset>`` with the CLIP ``clip`` (a checkpoint path or ``models:/…`` URI)."""
    from flows.models_registry import resolve_checkpoint

    config = config or EmbedConfig()
    logger = get_run_logger()
    layout = DatasetLayout(root)
    tracking.setup(tracking_uri, experiment)
    model_path = resolve_checkpoint(clip)
    version = embed_stage.clip_version(model_path)
    shards = _filter_shards(layout, dataset)
    logger.info("embed %s: %d shards with CLIP %s (%s)", dataset, len(shards), version, clip)
    fps = {sid: embed_stage.embeddings_fingerprint(fp, version, config) for sid, fp in shards}
    futures = [
        _submit(
            embed_task,
            layout.manifest(embeddings_stage(version), dataset, sid),
            fps[sid],
            root=root,
            name=dataset,
            shard_id=sid,
            model_path=model_path,
            clip_version=version,
            config=config,
            input_fingerprint=input_fp,
        )
        for sid, input_fp in shards
    ]
    results, work = _collect("embed", futures)
    prune_stale(
        layout,
        "embeddings",
        f"{version}/{dataset}",
        set(fps),
        manifests=(embeddings_stage(version), dataset),
    )
    summary = {
        "clip_version": version,
        "rows": sum(r["stats"]["rows"] for r in results),
        "shards": len(shards),
        "work": {"embed": dict(work)},
        "path": layout.join("embeddings", version, dataset),
    }
    _report(summary, config, dataset, fps)
    return summary


def _report(summary: dict[str, Any], config: EmbedConfig, dataset: str, fps: dict[str, str]) -> None:
    import mlflow

    from dalle_lightning.datasets.fingerprint import fingerprint

    output_fp = fingerprint(sorted(fps.values()))
    summary["fingerprint"] = output_fp
    tags = {
        "dalle.clip_version": summary["clip_version"],
        "dalle.dataset": dataset,
        "dalle.fingerprint.output": output_fp,
    }
    with tracking.stage_run("embed", nested=mlflow.active_run() is not None, tags=tags):
        mlflow.log_params(tracking.flatten_params("embed", config))
        mlflow.log_metrics({"rows": summary["rows"], "shards": summary["shards"]})
        mlflow.log_metrics({f"shards.{k}": v for k, v in summary["work"]["embed"].items()})
        tracking.log_dataset(
            summary["path"],
            name=f"embeddings/{summary['clip_version']}/{dataset}",
            digest=output_fp,
            context="output",
            rows=summary["rows"],
        )


def run_embed(
    root: str, *, dask_address: str | None = None, n_workers: int | None = None, **params: Any
) -> dict:
    """Run the ``embed`` flow on a local Dask cluster or the scheduler at ``dask_address``."""
    from flows.prefect_api import prefect_api
    from flows.runners import dask_task_runner

    with prefect_api():
        return embed.with_options(task_runner=dask_task_runner(dask_address, n_workers))(root=root, **params)
