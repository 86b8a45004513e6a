"""Flow ``tokenize``: encode every ``filtered`` shard into dVAE codes (``tokens/<dvae version>/<name>``).

One Dask task per shard, cached by Prefect on hash(filter shard fingerprint,
dVAE version, tokenize precision, stage version) and recorded in a manifest:
an unchanged dVAE skips every finished shard, a new one re-tokenizes into its
own folder. The dVAE is named by path or by MLflow registry URI.
"""

from __future__ import annotations

import functools
from typing import Any

from prefect import flow, get_run_logger, task

from dalle_lightning.datasets.layout import DatasetLayout, part_name
from dalle_lightning.datasets.manifest import read_manifest, run_once
from dalle_lightning.datasets.prune import prune_stale
from dalle_lightning.stages import tokenize as tokenize_stage
from dalle_lightning.stages.tokenize import TokenizeConfig
from flows import tracking
from flows.ingest import _by_fingerprint, _collect, _submit


def tokens_stage(dvae_version: str) -> str:
    """Manifest stage name of the tokens made by one dVAE."""
    return f"tokens-{dvae_version}"


def tokens_path(layout: DatasetLayout, dvae_version: str, name: str, shard_id: str) -> str:
    return layout.join("tokens", dvae_version, name, part_name(shard_id))


@functools.lru_cache(maxsize=2)
def _load(model_path: str) -> Any:
    """The dVAE, loaded once per worker process."""
    from dalle_lightning.models.dvae import load_dvae

    return load_dvae(model_path).eval()


@task(
    name="tokenize-shard",
    task_run_name="tokenize-{shard_id}",
    cache_key_fn=_by_fingerprint,
    persist_result=True,
    retries=2,
    retry_delay_seconds=1,
)
def tokenize_task(
    root: str,
    name: str,
    shard_id: str,
    model_path: str,
    dvae_version: str,
    config: TokenizeConfig,
    fingerprint: str,
    input_fingerprint: str,
) -> dict[str, Any]:
    layout = DatasetLayout(root)

    def work() -> tuple[dict, dict]:
        written, stats = tokenize_stage.tokenize_shard(
            layout.shard("filter", name, shard_id),
            tokens_path(layout, dvae_version, name, shard_id),
            _load(model_path),
            dvae_version=dvae_version,
            config=config,
        )
        return {"output": written}, stats

    manifest, did_work = run_once(
        layout.manifest(tokens_stage(dvae_version), name, shard_id),
        fingerprint,
        work,
        stage=tokens_stage(dvae_version),
        dataset=name,
        shard_id=shard_id,
        input_fingerprint=input_fingerprint,
    )
    return {"shard_id": shard_id, "did_work": did_work, "stats": manifest.stats}


def _filter_shards(layout: DatasetLayout, name: str) -> list[tuple[str, str]]:
    """(shard id, fingerprint) of every finished ``filter`` shard of ``name``."""
    from dalle_lightning.datasets.layout import shard_id_of
    from dalle_lightning.datasets.parquet_io import list_parts

    shards = []
    for path in list_parts(layout.dataset("filter", name)):
        shard_id = shard_id_of(path)
        manifest = read_manifest(layout.manifest("filter", name, shard_id))
        if manifest is None:
            raise ValueError(f"filter shard {path} has no manifest; re-run `dalle ingest`")
        shards.append((shard_id, manifest.fingerprint))
    if not shards:
        raise ValueError(f"no filtered shards of {name!r} under {layout.root}; run `dalle ingest` first")
    return shards


@flow(name="tokenize")
def tokenize(
    root: str,
    dataset: str = "default",
    dvae: str = "models:/dvae/latest",
    config: TokenizeConfig | None = None,
    tracking_uri: str | None = None,
    experiment: str = tracking.DEFAULT_EXPERIMENT,
) -> dict[str, Any]:
    """Tokenize ``filter/<dataset>`` with the dVAE ``dvae`` (a checkpoint path or ``models:/…`` URI)."""
    from dalle_lightning.models.dvae import dvae_version
    from flows.models_registry import resolve_checkpoint

    config = config or TokenizeConfig()
    logger = get_run_logger()
    layout = DatasetLayout(root)
    tracking.setup(tracking_uri, experiment)
    model_path = resolve_checkpoint(dvae)
    version = dvae_version(model_path)
    shards = _filter_shards(layout, dataset)
    logger.info("tokenize %s: %d shards with dVAE %s (%s)", dataset, len(shards), version, dvae)
    fps = {sid: tokenize_stage.tokens_fingerprint(fp, version, config) for sid, fp in shards}
    futures = [
        _submit(
            tokenize_task,
            layout.manifest(tokens_stage(version), dataset, sid),
            fps[sid],
            root=root,
            name=dataset,
            shard_id=sid,
            model_path=model_path,
            dvae_version=version,
            config=config,
            input_fingerprint=input_fp,
        )
        for sid, input_fp in shards
    ]
    results, work = _collect("tokenize", futures)
    prune_stale(
        layout, "tokens", f"{version}/{dataset}", set(fps), manifests=(tokens_stage(version), dataset)
    )
    rows = sum(r["stats"]["rows"] for r in results)
    summary = {
        "dvae_version": version,
        "rows": rows,
        "shards": len(shards),
        "work": {"tokenize": dict(work)},
        "path": layout.join("tokens", version, dataset),
    }
    _report(summary, config, dataset, fps)
    return summary


def _report(summary: dict[str, Any], config: TokenizeConfig, dataset: str, fps: dict[str, str]) -> None:
    import mlflow

    from dalle_lightning.datasets.fingerprint import fingerprint

    output_fp = fingerprint(sorted(fps.values()))
    summary["fingerprint"] = output_fp
    tags = {
        "dalle.dvae_version": summary["dvae_version"],
        "dalle.dataset": dataset,
        "dalle.fingerprint.output": output_fp,
    }
    with tracking.stage_run("tokenize", nested=mlflow.active_run() is not None, tags=tags):
        mlflow.log_params(tracking.flatten_params("tokenize", config))
        mlflow.log_metrics({"rows": summary["rows"], "shards": summary["shards"]})
        mlflow.log_metrics({f"shards.{k}": v for k, v in summary["work"]["tokenize"].items()})
        tracking.log_dataset(
            summary["path"],
            name=f"tokens/{summary['dvae_version']}/{dataset}",
            digest=output_fp,
            context="output",
            rows=summary["rows"],
        )


def run_tokenize(
    root: str, *, dask_address: str | None = None, n_workers: int | None = None, **params: Any
) -> dict:
    """Run the ``tokenize`` flow on a local Dask cluster or the scheduler at ``dask_address``."""
    from flows.prefect_api import prefect_api
    from flows.runners import dask_task_runner

    with prefect_api():
        return tokenize.with_options(task_runner=dask_task_runner(dask_address, n_workers))(
            root=root, **params
        )
