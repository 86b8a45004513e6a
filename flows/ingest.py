"""Flow ``ingest``: URL list → ``sources`` shards → ``download`` (img2dataset, one Dask task per shard)
→ ``filter`` (per-shard rules, cross-shard dedup on Dask, per-shard apply).

Every shard task is cached by Prefect on its fingerprint (input content +
stage config + stage version) and guarded by an on-disk manifest, so a re-run
does only the work whose inputs or settings changed — also after the Prefect
database is wiped. No data logic lives here: see ``dalle_lightning.stages``.
"""

from __future__ import annotations

import time
from collections import Counter
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_table_artifact
from prefect.futures import PrefectFuture, as_completed

from dalle_lightning.datasets.fingerprint import fingerprint
from dalle_lightning.datasets.layout import DatasetLayout
from dalle_lightning.datasets.manifest import is_done, read_manifest, run_once
from dalle_lightning.datasets.prune import prune_stale
from dalle_lightning.stages import download as download_stage
from dalle_lightning.stages import filter as filter_stage
from dalle_lightning.stages import sources as sources_stage
from dalle_lightning.stages.download import DownloadConfig
from dalle_lightning.stages.filter import FilterConfig
from flows import tracking

HASHES_DIR = "_hashes"


def _by_fingerprint(context: Any, parameters: dict[str, Any]) -> str:
    """Prefect cache key of a shard task: its fingerprint (already includes stage, config, version)."""
    return parameters["fingerprint"]


_shard_task = {
    "cache_key_fn": _by_fingerprint,
    "persist_result": True,
    "retries": 2,
    "retry_delay_seconds": 1,
}


@task(name="download-shard", task_run_name="download-{shard_id}", **_shard_task)
def download_task(
    root: str, name: str, shard_id: str, config: DownloadConfig, fingerprint: str, input_fingerprint: str
) -> dict[str, Any]:
    layout = DatasetLayout(root)

    def work() -> tuple[dict, dict]:
        result = download_stage.download_shard(
            layout.shard("sources", name, shard_id),
            layout.shard("download", name, shard_id),
            config,
            shard_id=shard_id,
        )
        return {"output": result.written}, result.stats

    manifest, did_work = run_once(
        layout.manifest("download", name, shard_id),
        fingerprint,
        work,
        stage="download",
        dataset=name,
        shard_id=shard_id,
        input_fingerprint=input_fingerprint,
    )
    return {"shard_id": shard_id, "did_work": did_work, "stats": manifest.stats}


@task(name="filter-score-shard", task_run_name="filter-score-{shard_id}", **_shard_task)
def score_task(
    root: str,
    name: str,
    shard_id: str,
    ordinal: int,
    config: FilterConfig,
    fingerprint: str,
    input_fingerprint: str,
) -> dict[str, Any]:
    layout = DatasetLayout(root)
    hashes_path = layout.shard("filter", name, shard_id, HASHES_DIR)

    def work() -> tuple[dict, dict]:
        written, counts = filter_stage.score_shard(
            layout.shard("download", name, shard_id), hashes_path, config, ordinal
        )
        return {"hashes": written}, {"rule_counts": counts}

    manifest, did_work = run_once(
        layout.manifest("filter-score", name, shard_id),
        fingerprint,
        work,
        stage="filter-score",
        dataset=name,
        shard_id=shard_id,
        input_fingerprint=input_fingerprint,
    )
    return {"shard_id": shard_id, "did_work": did_work, "stats": manifest.stats}


@task(name="find-duplicates", **_shard_task)
def dedup_task(hashes_paths: list[str], config: FilterConfig, fingerprint: str) -> dict[str, list[list[str]]]:
    """Cross-shard exact + perceptual dedup as a Dask dataframe step on the flow's cluster."""
    from prefect_dask import get_dask_client

    with get_dask_client():
        duplicates = filter_stage.find_duplicates(hashes_paths, config)
    by_shard: dict[str, list[list[str]]] = {}
    for row in duplicates.to_pylist():
        by_shard.setdefault(row["key"].split("-", 1)[0], []).append(
            [row["key"], row["reject_reason"], row["reject_detail"]]
        )
    return by_shard


@task(name="filter-shard", task_run_name="filter-{shard_id}", **_shard_task)
def apply_task(
    root: str, name: str, shard_id: str, duplicates: list[list[str]], fingerprint: str, input_fingerprint: str
) -> dict[str, Any]:
    import pyarrow as pa

    layout = DatasetLayout(root)

    def work() -> tuple[dict, dict]:
        table = pa.table(
            {
                "key": [d[0] for d in duplicates],
                "reject_reason": [d[1] for d in duplicates],
                "reject_detail": [d[2] for d in duplicates],
            },
            schema=pa.schema(
                [("key", pa.string()), ("reject_reason", pa.string()), ("reject_detail", pa.string())]
            ),
        )
        kept, rejected, counts = filter_stage.apply_filter(
            layout.shard("download", name, shard_id),
            layout.shard("filter", name, shard_id, HASHES_DIR),
            table,
            layout.shard("filter", name, shard_id),
            layout.shard("filter", name, shard_id, "rejects"),
        )
        return {"output": kept, "rejects": rejected}, {"counts": counts}

    manifest, did_work = run_once(
        layout.manifest("filter", name, shard_id),
        fingerprint,
        work,
        stage="filter",
        dataset=name,
        shard_id=shard_id,
        input_fingerprint=input_fingerprint,
    )
    return {"shard_id": shard_id, "did_work": did_work, "stats": manifest.stats}


def _submit(task_fn: Any, manifest_path: str, fingerprint: str, **params: Any) -> PrefectFuture:
    """Submit a shard task; force a re-run (refreshing Prefect's cache) if its output is not on disk."""
    done = is_done(manifest_path, fingerprint) is not None
    runnable = task_fn if done else task_fn.with_options(refresh_cache=True)
    return runnable.submit(fingerprint=fingerprint, **params)


def _collect(stage: str, futures: list[PrefectFuture]) -> tuple[list[dict], Counter]:
    """Wait for a stage's shard tasks, logging progress; returns results and run/cached/skipped counts."""
    logger = get_run_logger()
    results, work = [], Counter()
    started = time.monotonic()
    for i, future in enumerate(as_completed(futures), 1):
        result = future.result()
        state = future.state.name
        kind = "cached" if state == "Cached" else ("executed" if result["did_work"] else "skipped")
        work[kind] += 1
        results.append(result)
        logger.info(
            "%s: %d/%d shards done (%s: %s) %.1fs",
            stage,
            i,
            len(futures),
            result["shard_id"],
            kind,
            time.monotonic() - started,
        )
    return results, work


def _plan_sources(layout: DatasetLayout, name: str, urls: list[str] | None, shard_size: int) -> list[dict]:
    """Write the URL list's shards (or read the existing ones); returns [{shard_id, ordinal, fingerprint, rows}]."""
    if urls:
        table = sources_stage.read_url_list(urls)
        shards = sources_stage.plan_shards(table, shard_size)
        planned = []
        for shard in shards:
            manifest, _ = sources_stage.write_source_shard(layout, name, shard)
            planned.append(
                {
                    "shard_id": shard.shard_id,
                    "ordinal": shard.ordinal,
                    "fingerprint": manifest.fingerprint,
                    "rows": shard.table.num_rows,
                }
            )
        prune_stale(layout, "sources", name, {p["shard_id"] for p in planned})
        return planned
    from dalle_lightning.datasets.layout import shard_id_of
    from dalle_lightning.datasets.parquet_io import list_parts

    planned = []
    for path in list_parts(layout.dataset("sources", name)):
        manifest = read_manifest(layout.manifest("sources", name, shard_id_of(path)))
        if manifest is None:
            raise ValueError(f"source shard {path} has no manifest; re-run ingest with --urls")
        planned.append(
            {
                "shard_id": manifest.shard_id,
                "ordinal": manifest.stats["ordinal"],
                "fingerprint": manifest.fingerprint,
                "rows": manifest.stats["rows"],
            }
        )
    if not planned:
        raise ValueError(f"no source shards under {layout.dataset('sources', name)}; pass urls")
    return sorted(planned, key=lambda p: p["ordinal"])


@flow(name="ingest")
def ingest(
    root: str,
    name: str = "default",
    urls: list[str] | None = None,
    shard_size: int = 256,
    download: DownloadConfig | None = None,
    filter: FilterConfig | None = None,
    tracking_uri: str | None = None,
    experiment: str = tracking.DEFAULT_EXPERIMENT,
) -> dict[str, Any]:
    """Download and filter the URL list ``urls`` into ``<root>/download/<name>`` and ``<root>/filter/<name>``.

    Without ``urls`` the existing ``<root>/sources/<name>`` shards are used.
    Returns the summary: counts per status / reject reason and the work done per stage.
    """
    download = download or DownloadConfig()
    filter = filter or FilterConfig()
    logger = get_run_logger()
    layout = DatasetLayout(root)
    shards = _plan_sources(layout, name, urls, shard_size)
    n_input = sum(s["rows"] for s in shards)
    logger.info("ingest %s: %d URLs in %d shards under %s", name, n_input, len(shards), root)

    # download: one task per shard
    download_fp = {
        s["shard_id"]: fingerprint("download", download_stage.STAGE_VERSION, s["fingerprint"], download)
        for s in shards
    }
    futures = [
        _submit(
            download_task,
            layout.manifest("download", name, s["shard_id"]),
            download_fp[s["shard_id"]],
            root=root,
            name=name,
            shard_id=s["shard_id"],
            config=download,
            input_fingerprint=s["fingerprint"],
        )
        for s in shards
    ]
    download_results, download_work = _collect("download", futures)
    prune_stale(layout, "download", name, set(download_fp))

    # filter: per-shard rules + hashes, one global dedup, per-shard apply
    score_fp = {
        sid: fingerprint("filter-score", filter_stage.STAGE_VERSION, fp, filter)
        for sid, fp in download_fp.items()
    }
    futures = [
        _submit(
            score_task,
            layout.manifest("filter-score", name, s["shard_id"]),
            score_fp[s["shard_id"]],
            root=root,
            name=name,
            shard_id=s["shard_id"],
            ordinal=s["ordinal"],
            config=filter,
            input_fingerprint=download_fp[s["shard_id"]],
        )
        for s in shards
    ]
    _score_results, score_work = _collect("filter-score", futures)
    hashes_paths = [layout.shard("filter", name, s["shard_id"], HASHES_DIR) for s in shards]
    dedup_fp = fingerprint(
        "dedup", filter_stage.STAGE_VERSION, [score_fp[s["shard_id"]] for s in shards], filter
    )
    duplicates = dedup_task.submit(hashes_paths, filter, fingerprint=dedup_fp).result()
    filter_fp = {
        sid: fingerprint("filter", filter_stage.STAGE_VERSION, fp, sorted(duplicates.get(sid, [])))
        for sid, fp in score_fp.items()
    }
    futures = [
        _submit(
            apply_task,
            layout.manifest("filter", name, s["shard_id"]),
            filter_fp[s["shard_id"]],
            root=root,
            name=name,
            shard_id=s["shard_id"],
            duplicates=duplicates.get(s["shard_id"], []),
            input_fingerprint=score_fp[s["shard_id"]],
        )
        for s in shards
    ]
    filter_results, filter_work = _collect("filter", futures)
    prune_stale(layout, "filter", name, set(filter_fp))
    prune_stale(layout, "filter", name, set(filter_fp), "rejects")
    prune_stale(layout, "filter", name, set(filter_fp), HASHES_DIR, manifests=("filter-score", name))

    summary = summarize(n_input, download_results, filter_results)
    summary["work"] = {
        "download": dict(download_work),
        "filter-score": dict(score_work),
        "filter": dict(filter_work),
    }
    summary["fingerprints"] = {
        "sources": fingerprint([s["fingerprint"] for s in shards]),
        "download": fingerprint(sorted(download_fp.values())),
        "filter": fingerprint(sorted(filter_fp.values())),
    }
    _report(layout, name, summary, download, filter, tracking_uri, experiment)
    return summary


def summarize(n_input: int, download_results: list[dict], filter_results: list[dict]) -> dict[str, Any]:
    """Totals over shards, with the accounting invariants checked."""
    status, errors, rejected = Counter(), Counter(), Counter()
    for r in download_results:
        status.update(r["stats"]["status_counts"])
        errors.update(r["stats"].get("error_counts", {}))
    kept = 0
    for r in filter_results:
        counts = dict(r["stats"]["counts"])
        kept += counts.pop("kept", 0)
        rejected.update(counts)
    downloaded = status.get("success", 0)
    failed = sum(status.values()) - downloaded
    if downloaded + failed != n_input:
        raise RuntimeError(
            f"download lost rows: {downloaded} downloaded + {failed} failed != {n_input} input"
        )
    if kept + sum(rejected.values()) != downloaded:
        raise RuntimeError(
            f"filter lost rows: {kept} kept + {sum(rejected.values())} rejected != {downloaded}"
        )
    return {
        "input": n_input,
        "downloaded": downloaded,
        "failed": failed,
        "failed_by_status": {k: v for k, v in status.items() if k != "success"},
        "failed_by_error": dict(errors.most_common(20)),
        "kept": kept,
        "rejected": sum(rejected.values()),
        "rejected_by_reason": dict(rejected),
    }


def _report(
    layout: DatasetLayout,
    name: str,
    summary: dict[str, Any],
    download: DownloadConfig,
    filter: FilterConfig,
    tracking_uri: str | None,
    experiment: str,
) -> None:
    """Counts as a Prefect table artifact and as MLflow runs (parent ``ingest``, nested per stage)."""
    rows = [{"count": k, "value": v} for k, v in summary.items() if isinstance(v, int)]
    rows += [{"count": f"failed: {k}", "value": v} for k, v in summary["failed_by_status"].items()]
    rows += [{"count": f"rejected: {k}", "value": v} for k, v in summary["rejected_by_reason"].items()]
    for stage, work in summary["work"].items():
        rows += [{"count": f"{stage} shards {k}", "value": v} for k, v in work.items()]
    create_table_artifact(
        key=f"ingest-counts-{_slug(name)}", table=rows, description=f"ingest {name}: counts"
    )

    import mlflow

    tracking.setup(tracking_uri, experiment)
    fps = summary["fingerprints"]
    with mlflow.start_run(
        run_name=f"ingest-{name}",
        nested=mlflow.active_run() is not None,
        tags={"dalle.flow": "ingest", "dalle.stage": "ingest", "dalle.dataset": name},
    ) as parent:
        tracking.log_params({"root": layout.root, "dataset": name})
        mlflow.log_metrics(
            {"input": summary["input"], "downloaded": summary["downloaded"], "kept": summary["kept"]}
        )
        with tracking.stage_run(
            "download",
            tags={"dalle.fingerprint.input": fps["sources"], "dalle.fingerprint.output": fps["download"]},
        ):
            mlflow.log_params(tracking.flatten_params("download", download))
            mlflow.log_metrics(
                {"input": summary["input"], "downloaded": summary["downloaded"], "failed": summary["failed"]}
            )
            mlflow.log_metrics({f"failed.{_slug(k)}": v for k, v in summary["failed_by_status"].items()})
            mlflow.log_metrics({f"shards.{k}": v for k, v in summary["work"]["download"].items()})
            mlflow.log_dict(summary["failed_by_error"], "failed_by_error.json")
            tracking.log_dataset(
                layout.dataset("sources", name),
                name=f"sources/{name}",
                digest=fps["sources"],
                context="input",
                rows=summary["input"],
            )
            tracking.log_dataset(
                layout.dataset("download", name),
                name=f"download/{name}",
                digest=fps["download"],
                context="output",
                rows=summary["input"],
            )
        with tracking.stage_run(
            "filter",
            tags={"dalle.fingerprint.input": fps["download"], "dalle.fingerprint.output": fps["filter"]},
        ):
            mlflow.log_params(tracking.flatten_params("filter", filter))
            mlflow.log_metrics(
                {
                    "downloaded": summary["downloaded"],
                    "kept": summary["kept"],
                    "rejected": summary["rejected"],
                }
            )
            mlflow.log_metrics({f"rejected.{_slug(k)}": v for k, v in summary["rejected_by_reason"].items()})
            mlflow.log_metrics({f"shards.{k}": v for k, v in summary["work"]["filter"].items()})
            tracking.log_dataset(
                layout.dataset("download", name),
                name=f"download/{name}",
                digest=fps["download"],
                context="input",
                rows=summary["downloaded"],
            )
            tracking.log_dataset(
                layout.dataset("filter", name),
                name=f"filter/{name}",
                digest=fps["filter"],
                context="output",
                rows=summary["kept"],
            )
        mlflow.log_dict(summary, "summary.json")
    summary["mlflow_run_id"] = parent.info.run_id


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in text.lower()).strip("-") or "x"


def run_ingest(
    root: str,
    *,
    dask_address: str | None = None,
    n_workers: int | None = None,
    **params: Any,
) -> dict[str, Any]:
    """Run the ``ingest`` flow on a local Dask cluster or the scheduler at ``dask_address``."""
    from flows.runners import dask_task_runner

    for key in ("download", "filter"):
        if isinstance(params.get(key), dict):
            params[key] = {"download": DownloadConfig, "filter": FilterConfig}[key](**params[key])
    from flows.prefect_api import prefect_api

    with prefect_api():
        runner = dask_task_runner(dask_address, n_workers)
        return ingest.with_options(task_runner=runner)(root=root, **params)
