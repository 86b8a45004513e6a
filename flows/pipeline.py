"""Flow ``pipeline``: every stage from a URL list to an evaluated, reranked model, each one incremental.

    ingest (download → filter/dedup) → train_dvae → tokenize → train_bpe → train_dalle → train_clip → evaluate

Each stage is its own flow (a subflow here) and decides for itself whether it
has work: shards by their manifests, models and the BPE by a fingerprint of
their settings and inputs, the evaluation by a fingerprint of the models and
caption set it scores (a record under ``<root>/evaluations/``). A re-run with
nothing changed therefore does no stage work, and changing one stage's
settings re-runs that stage and what depends on it — a new dVAE changes the
tokens and so the transformer and the evaluation, a new CLIP only the
evaluation — and nothing upstream.

MLflow gets a parent run ``pipeline`` (the flow's parameters, a summary of
every stage) with the stages' runs nested under it. The data stages run on
one Dask cluster for the whole pipeline: the scheduler at ``dask_address`` (or
``$DALLE_DASK_ADDRESS``), else a ``LocalCluster`` started here.

The evaluate stage keeps registry aliases (default ``@candidate``) on the
best ``dalle`` model version by ``promote_metric`` on the same caption set
(:func:`flows.models_registry.promote`).
"""

from __future__ import annotations

import json
import time
from typing import Any

from prefect import flow, get_run_logger

from dalle_lightning.datasets.fingerprint import fingerprint
from dalle_lightning.datasets.layout import DatasetLayout
from flows import tracking

STAGES = ("ingest", "train_dvae", "tokenize", "train_bpe", "train_dalle", "train_clip", "evaluate")


@flow(name="pipeline")
def pipeline(
    root: str = "data",
    dataset: str = "default",
    urls: list[str] | None = None,
    shard_size: int = 256,
    download: dict[str, Any] | None = None,
    filter: dict[str, Any] | None = None,
    dvae_preset: str = "tiny",
    dvae_overrides: dict[str, Any] | None = None,
    bpe_vocab_size: int = 1024,
    dalle_preset: str = "tiny",
    dalle_overrides: dict[str, Any] | None = None,
    clip_preset: str = "tiny",
    clip_overrides: dict[str, Any] | None = None,
    eval_source: str = "filter",
    eval_captions: int = 64,
    eval_n_max: int = 16,
    eval_overrides: dict[str, Any] | None = None,
    promote_metric: str = "clip_score_n1",
    promote_aliases: list[str] | None = None,
    dask_address: str | None = None,
    n_workers: int | None = None,
    tracking_uri: str | None = None,
    experiment: str = tracking.DEFAULT_EXPERIMENT,
) -> dict[str, Any]:
    """Run every stage on ``<root>``/``dataset`` (URL lists ``urls``; without them the existing sources).

    ``download``/``filter`` are the fields of :class:`~dalle_lightning.stages.download.DownloadConfig` and
    :class:`~dalle_lightning.stages.filter.FilterConfig` to change; the ``*_overrides`` are
    ``{"model": {...}, "train": {...}}`` on top of each preset; ``eval_overrides`` the fields of
    :class:`~dalle_lightning.evaluation.evaluate.EvalConfig`. ``eval_source`` is ``filter`` (captions of
    the dataset) or ``shapes`` (the synthetic generator's held-out scenes, scored by the exact checker).
    Returns each stage's result under its name, ``did_work`` per stage and the wall time.
    """
    import mlflow

    from dalle_lightning.evaluation.eval_sets import EvalSetConfig
    from dalle_lightning.stages.bpe import BPEConfig
    from dalle_lightning.stages.download import DownloadConfig
    from dalle_lightning.stages.filter import FilterConfig
    from flows.ingest import ingest
    from flows.runners import dask_cluster_address
    from flows.tokenize_images import tokenize
    from flows.train_bpe import train_bpe
    from flows.train_clip import train_clip
    from flows.train_dalle import train_dalle
    from flows.train_dvae import train_dvae

    logger = get_run_logger()
    started = time.monotonic()
    layout = DatasetLayout(root)
    captions = EvalSetConfig(source=eval_source, count=eval_captions, dataset=dataset)
    eval_config = _eval_config(eval_n_max, eval_overrides or {})
    uri = tracking.setup(tracking_uri, experiment)
    common = {"tracking_uri": uri, "experiment": experiment}
    results: dict[str, Any] = {}
    with (
        dask_cluster_address(dask_address, n_workers) as address,
        mlflow.start_run(
            run_name="pipeline", tags={"dalle.flow": "pipeline", "dalle.dataset": dataset}
        ) as run,
    ):
        tracking.log_params(
            _pipeline_params(
                {
                    "root": root,
                    "dataset": dataset,
                    "urls": urls,
                    "shard_size": shard_size,
                    "download": download or {},
                    "filter": filter or {},
                    "dvae_preset": dvae_preset,
                    "dvae_overrides": dvae_overrides or {},
                    "bpe_vocab_size": bpe_vocab_size,
                    "dalle_preset": dalle_preset,
                    "dalle_overrides": dalle_overrides or {},
                    "clip_preset": clip_preset,
                    "clip_overrides": clip_overrides or {},
                    "eval_source": eval_source,
                    "eval_captions": eval_captions,
                    "eval_n_max": eval_n_max,
                    "eval_overrides": eval_overrides or {},
                    "promote_metric": promote_metric,
                    "promote_aliases": promote_aliases or ["candidate"],
                }
            )
        )
        runner = _task_runner(address)
        logger.info("pipeline %s: Dask at %s, MLflow at %s (run %s)", dataset, address, uri, run.info.run_id)

        results["ingest"] = ingest.with_options(task_runner=runner)(
            root=root,
            name=dataset,
            urls=urls,
            shard_size=shard_size,
            download=DownloadConfig(**(download or {})),
            filter=FilterConfig(**(filter or {})),
            **common,
        )
        if results["ingest"]["kept"] == 0:
            raise RuntimeError(
                f"pipeline: no image of {dataset!r} passed download and filter; nothing to train on"
            )
        dvae = results["train_dvae"] = train_dvae(
            root=root, dataset=dataset, preset=dvae_preset, overrides=dvae_overrides or {}, **common
        )
        results["tokenize"] = tokenize.with_options(task_runner=runner)(
            root=root, dataset=dataset, dvae=dvae["model_path"], **common
        )
        bpe = results["train_bpe"] = train_bpe(
            root=root, dataset=dataset, config=BPEConfig(vocab_size=bpe_vocab_size), **common
        )
        dalle = results["train_dalle"] = train_dalle(
            root=root,
            dataset=dataset,
            dvae=dvae["model_path"],
            bpe=bpe["tokenizer_path"],
            preset=dalle_preset,
            overrides=dalle_overrides or {},
            **common,
        )
        clip = results["train_clip"] = train_clip(
            root=root,
            dataset=dataset,
            bpe=bpe["tokenizer_path"],
            preset=clip_preset,
            overrides=clip_overrides or {},
            **common,
        )
        results["evaluate"] = _evaluate_once(
            layout, dvae, bpe, dalle, clip, captions, eval_config, promote_metric, promote_aliases, common
        )
        did_work = {stage: _did_work(stage, results[stage]) for stage in STAGES}
        summary = {
            **results,
            "did_work": did_work,
            "elapsed_s": time.monotonic() - started,
            "mlflow_run_id": run.info.run_id,
            "dask_address": address,
        }
        mlflow.log_metrics(_summary_metrics(summary))
        mlflow.set_tags({f"dalle.did_work.{stage}": str(work).lower() for stage, work in did_work.items()})
        mlflow.log_dict(_jsonable(summary), "pipeline_summary.json")
    done = [stage for stage, work in did_work.items() if work]
    logger.info(
        "pipeline %s: done in %.1fs; stages with work: %s",
        dataset,
        summary["elapsed_s"],
        ", ".join(done) or "none",
    )
    return summary


def _pipeline_params(params: dict[str, Any]) -> dict[str, str]:
    """The flow's parameters as flat MLflow params (nested overrides as ``name.section.field``)."""
    flat: dict[str, str] = {}
    for name, value in params.items():
        if isinstance(value, dict):
            flat.update(tracking.flatten_params(name, value))
        else:
            flat[name] = str(value)[:500]
    return flat


def _eval_config(n_max: int, overrides: dict[str, Any]) -> Any:
    from dalle_lightning.config_overrides import build
    from dalle_lightning.evaluation.evaluate import EvalConfig

    accuracy_ns = sorted({1, n_max})
    return build(EvalConfig, {"n_max": n_max, "accuracy_ns": accuracy_ns, **overrides}, "eval")


def _task_runner(address: str) -> Any:
    from prefect_dask import DaskTaskRunner

    return DaskTaskRunner(address=address)


def _evaluate_once(
    layout: DatasetLayout,
    dvae: dict,
    bpe: dict,
    dalle: dict,
    clip: dict,
    captions: Any,
    config: Any,
    promote_metric: str,
    promote_aliases: list[str] | None,
    common: dict[str, Any],
) -> dict[str, Any]:
    """Run the ``evaluate`` flow unless these models were already scored on this caption set with this config."""
    from flows.evaluate import evaluate
    from flows.models_registry import promote

    logger = get_run_logger()
    relative = [_relative(layout, r["model_path"]) for r in (dalle, clip, dvae)]
    eval_fp = fingerprint("evaluate", relative, bpe["bpe_fingerprint"], captions, config)
    folder = layout.join("evaluations", eval_fp)
    record_path = f"{folder}/result.json"
    fs = layout.fs
    if fs.exists(record_path):
        with fs.open(record_path) as f:
            record = json.load(f)
        logger.info("evaluate: these models were scored on this caption set already (%s); skipping", folder)
        return {**record, "did_work": False}
    local = "://" not in layout.root or layout.root.startswith("file://")
    result = evaluate(
        dalle=_model_ref("dalle", dalle),
        clip=_model_ref("clip", clip),
        dvae=dvae["model_path"],
        bpe=bpe["tokenizer_path"],
        root=layout.root,
        captions=captions,
        config=config,
        out_dir=folder if local else None,
        **common,
    )
    metric = result["metrics"].get(promote_metric)
    promoted: list[str] = []
    if dalle.get("registered_version") and metric is not None:
        promoted = promote(
            "dalle",
            dalle["registered_version"],
            metric=promote_metric,
            value=float(metric),
            eval_set_fingerprint=result["eval_set_fingerprint"],
            aliases=promote_aliases or ["candidate"],
        )
    elif metric is None:
        logger.warning("evaluate: metric %r not among the results; no alias changed", promote_metric)
    record = {**result, "fingerprint": eval_fp, "folder": folder, "promoted": promoted}
    fs.makedirs(folder, exist_ok=True)
    with fs.open(record_path, "w") as f:
        json.dump(_jsonable(record), f, indent=1)
    return {**record, "did_work": True}


def _model_ref(name: str, result: dict) -> str:
    """``models:/<name>/<version>`` when the run registered the model (keeps the MLflow lineage), else the path."""
    version = result.get("registered_version")
    return f"models:/{name}/{version}" if version else result["model_path"]


def _relative(layout: DatasetLayout, path: str) -> str:
    """``path`` relative to the dataset root, so that a moved root keeps its fingerprints."""
    root = layout.root.rstrip("/") + "/"
    return path[len(root) :] if path.startswith(root) else path


def _did_work(stage: str, result: dict[str, Any]) -> bool:
    """Whether a stage did any work: trained/evaluated, or (data stages) processed a shard."""
    if "did_work" in result:
        return bool(result["did_work"])
    work = result.get("work", {})
    return any(counts.get("executed", 0) for counts in work.values())


def _summary_metrics(summary: dict[str, Any]) -> dict[str, float]:
    """The parent run's metrics: counts, final losses and the evaluation's figures, prefixed by stage."""
    out: dict[str, float] = {"elapsed_s": summary["elapsed_s"]}
    ingest = summary["ingest"]
    for key in ("input", "downloaded", "kept", "rejected", "failed"):
        if isinstance(ingest.get(key), int | float):
            out[f"ingest.{key}"] = ingest[key]
    out["tokenize.rows"] = summary["tokenize"].get("rows", 0)
    for stage in ("train_dvae", "train_dalle", "train_clip", "evaluate"):
        for key, value in summary[stage].get("metrics", {}).items():
            if isinstance(value, int | float) and not isinstance(value, bool):
                out[f"{stage}.{key.replace('/', '.')}"] = float(value)
    out["stages_with_work"] = sum(summary["did_work"].values())
    return out


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


OVERRIDE_SECTIONS = {
    "download": "download",
    "filter": "filter",
    "dvae": "dvae_overrides",
    "dalle": "dalle_overrides",
    "clip": "clip_overrides",
    "eval": "eval_overrides",
}


def pipeline_overrides(sections: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Pipeline keyword arguments from config sections: ``download``/``filter``/``eval`` fields, and
    ``dvae``/``dalle``/``clip`` as ``{"model": {...}, "train": {...}}``. Dotted keys (from
    ``--set dvae.train.max_steps=500``) become nested ones."""
    unknown = sorted(set(sections) - set(OVERRIDE_SECTIONS))
    if unknown:
        raise ValueError(f"unknown pipeline section(s) {unknown}; expected {sorted(OVERRIDE_SECTIONS)}")
    out: dict[str, dict[str, Any]] = {}
    for section, fields in sections.items():
        nested: dict[str, Any] = {}
        for key, value in fields.items():
            *parents, leaf = key.split(".")
            target = nested
            for parent in parents:
                target = target.setdefault(parent, {})
            if isinstance(value, dict) and isinstance(target.get(leaf), dict):
                target[leaf].update(value)
            else:
                target[leaf] = value
        out[OVERRIDE_SECTIONS[section]] = nested
    return out


def run_pipeline(
    root: str, *, dask_address: str | None = None, n_workers: int | None = None, **params: Any
) -> dict[str, Any]:
    """Run the ``pipeline`` flow against one Prefect API for the command (started here if none is set)."""
    from flows.prefect_api import prefect_api

    with prefect_api():
        return pipeline(root=root, dask_address=dask_address, n_workers=n_workers, **params)


if __name__ == "__main__":  # pragma: no cover - `python -m flows.pipeline ROOT [DATASET]`
    import sys

    arguments = sys.argv[1:] + ["data", "default"][len(sys.argv) - 1 :]
    print(json.dumps(_jsonable(run_pipeline(arguments[0], dataset=arguments[1])), indent=1))
