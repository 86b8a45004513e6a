"""Flow ``evaluate``: a trained DALL-E, its dVAE and a CLIP on a fixed caption set, logged to MLflow.

Models are named by path or MLflow URI (:mod:`flows.model_refs`); the dVAE
defaults to the registered one the DALL-E's codes came from, the caption BPE
to the one its training logged. The caption set (:mod:`~dalle_lightning.evaluation.eval_sets`)
is the shapes generator with a fixed seed, or a fixed sample of a ``filter``
dataset under ``root``. The metrics (:mod:`~dalle_lightning.evaluation.evaluate`:
``clip_score_n{N}``, ``fid``, ``shapes_accuracy_{seen,heldout}_n{N}``,
``dvae_ceiling_*``, …) go to one MLflow run tagged with the lineage:

- ``dalle.evaluated_run_id``: the DALL-E's training run (the run is also
  nested under it when it is in the same experiment and no flow run is active;
  inside a pipeline run it is nested under that instead);
- ``dalle.eval_set_fingerprint``: the caption set's content digest, so that
  runs on the same set can be compared (``dalle compare``);
- ``dalle.dvae_version`` of the dVAE that decoded the samples.

The CLIP score is also logged as one metric ``clip_score`` with step N (a
curve in the MLflow UI); grids and ``per_caption.json`` are artifacts under
``evaluation/``.
"""

from __future__ import annotations

import tempfile
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from dalle_lightning.evaluation.eval_sets import EvalSetConfig
from dalle_lightning.evaluation.evaluate import EvalConfig
from flows import tracking


@task(name="load-models", cache_policy=NO_CACHE)
def load_models_task(dalle: str, clip: str, dvae: str | None, bpe: str | None, device: str) -> Any:
    from flows.generate import load_models

    return load_models(dalle, clip, dvae, bpe, device)


@task(name="caption-set", cache_policy=NO_CACHE)
def caption_set(config: EvalSetConfig, image_size: int, root: str | None) -> Any:
    from dalle_lightning.evaluation.eval_sets import build_eval_set

    return build_eval_set(config, image_size, root)


@task(name="evaluate-models", cache_policy=NO_CACHE)
def evaluate_models_task(models: Any, eval_set: Any, config: EvalConfig, out_dir: str) -> Any:
    from dalle_lightning.evaluation.evaluate import evaluate_models

    return evaluate_models(
        models.dalle, models.dvae, models.scorer, models.text_encoder, eval_set, config, out_dir
    )


@flow(name="evaluate")
def evaluate(
    dalle: str = "models:/dalle/latest",
    clip: str = "models:/clip/latest",
    dvae: str | None = None,
    bpe: str | None = None,
    root: str | None = None,
    captions: EvalSetConfig | None = None,
    config: EvalConfig | None = None,
    out_dir: str | None = None,
    device: str = "auto",
    tracking_uri: str | None = None,
    experiment: str = tracking.DEFAULT_EXPERIMENT,
) -> dict[str, Any]:
    """Evaluate ``dalle`` (decoded by ``dvae``, reranked by ``clip``) on ``captions``; log one MLflow run.

    ``root`` is the dataset root a ``filter`` caption set is drawn from.
    Grids go to ``out_dir`` (default: a temporary folder, kept only as MLflow artifacts).
    """
    import mlflow

    from dalle_lightning.models.dvae import dvae_version
    from flows.generate import resolve_device

    logger = get_run_logger()
    captions = captions or EvalSetConfig()
    config = config or EvalConfig()
    tracking.setup(tracking_uri, experiment)
    device = resolve_device(device)
    models = load_models_task(dalle, clip, dvae, bpe, device)
    dalle_ref, dvae_ref = models.refs["dalle"], models.refs["dvae"]
    eval_set = caption_set(captions, models.dvae.config.image_size, root)
    fingerprint = eval_set.fingerprint
    logger.info(
        "evaluate: %s on %d captions (%s), n_max %d", dalle, len(eval_set.captions), fingerprint, config.n_max
    )

    tags = {
        "dalle.stage": "evaluate",
        "dalle.eval_set_fingerprint": fingerprint,
        "dalle.eval_set": captions.source,
        "dalle.evaluated_model": dalle,
        "dalle.dvae_version": dvae_version(dvae_ref.path),
    }
    if dalle_ref.run_id:
        tags["dalle.evaluated_run_id"] = dalle_ref.run_id
    else:
        logger.warning(
            "evaluate: %r is not tied to an MLflow run; the run has no dalle.evaluated_run_id", dalle
        )
    if dalle_ref.version:
        tags["dalle.evaluated_model_version"] = dalle_ref.version
    with _evaluation_run(dalle_ref.run_id, experiment, tags) as run:
        tracking.log_params(
            {
                **tracking.flatten_params("eval", config),
                **tracking.flatten_params("captions", captions),
                "model.dalle": dalle,
                "model.dvae": dvae_ref.ref,
                "model.bpe": models.bpe_path,
                "model.clip": clip,
                "device": device,
            }
        )
        if captions.source == "filter" and root is not None:
            tracking.log_dataset(
                f"{root.rstrip('/')}/filter/{captions.dataset}",
                name=f"filter/{captions.dataset}",
                digest=fingerprint,
                context="evaluation",
                rows=len(eval_set.captions),
            )
        with tempfile.TemporaryDirectory() as tmp:
            folder = out_dir or tmp
            result = evaluate_models_task(models, eval_set, config, folder)
            mlflow.log_metrics(result.metrics)
            for n, estimate in result.curve.items():
                mlflow.log_metric("clip_score", estimate.mean, step=n)
            mlflow.log_artifacts(folder, artifact_path="evaluation")
        run_id = run.info.run_id
    logger.info("evaluate: %s", _headline(result.metrics, config))
    return {
        "mlflow_run_id": run_id,
        "metrics": result.metrics,
        "eval_set_fingerprint": fingerprint,
        "evaluated_run_id": dalle_ref.run_id,
        "files": {k: str(v) for k, v in result.files.items()} if out_dir else {},
        "artifact_uri": f"runs:/{run_id}/evaluation",
    }


def _evaluation_run(training_run_id: str | None, experiment: str, tags: dict[str, str]) -> Any:
    """The MLflow run: nested under the active run if any, else under the training run when it shares the experiment."""
    import mlflow

    if mlflow.active_run() is not None:
        return mlflow.start_run(run_name="evaluate", nested=True, tags=tags)
    parent = None
    if training_run_id is not None:
        current = mlflow.get_experiment_by_name(experiment)
        try:
            training = mlflow.MlflowClient().get_run(training_run_id)
        except mlflow.exceptions.MlflowException:
            training = None
        if (
            training is not None
            and current is not None
            and training.info.experiment_id == current.experiment_id
        ):
            parent = training_run_id
    return mlflow.start_run(run_name="evaluate", parent_run_id=parent, tags=tags)


def _headline(metrics: dict[str, float], config: EvalConfig) -> str:
    keys = ["clip_score_n1", f"clip_score_n{config.n_max}", "fid", "fid_n1", "fid_dvae"]
    keys += [
        k
        for k in sorted(metrics)
        if k.startswith(("shapes_accuracy_", "dvae_ceiling_")) and not k.endswith("_stderr")
    ]
    return ", ".join(f"{k} {metrics[k]:.4f}" for k in keys if k in metrics)


def run_evaluate(**params: Any) -> dict[str, Any]:
    """Run the ``evaluate`` flow against one Prefect API for the command (started here if none is set)."""
    from flows.prefect_api import prefect_api

    with prefect_api():
        return evaluate(**params)


# --- comparing runs -------------------------------------------------------------------------------

LOWER_IS_BETTER = ("fid", "loss")
"""Metric name prefixes sorted ascending by default (best first)."""


def compare_runs(
    experiment: str,
    metric: str,
    *,
    top: int = 20,
    ascending: bool | None = None,
    tracking_uri: str | None = None,
) -> list[dict[str, Any]]:
    """The ``top`` runs of ``experiment`` that logged ``metric``, best first.

    ``ascending`` defaults to True for names starting with ``fid`` or
    ``loss`` (lower is better) and False otherwise. Each row: ``run_id``,
    ``run_name``, ``value``, ``stage``, ``model`` (the evaluated model as given), ``evaluated_run_id``,
    ``eval_set_fingerprint``, ``start_time`` (ms) and the run's ``metrics``.
    """
    import mlflow

    if top < 1:
        raise ValueError(f"top must be >= 1, got {top}")
    client = mlflow.MlflowClient(tracking.resolve_tracking_uri(tracking_uri))
    found = client.get_experiment_by_name(experiment)
    if found is None:
        raise ValueError(f"no MLflow experiment named {experiment!r}")
    if ascending is None:
        ascending = metric.startswith(LOWER_IS_BETTER)
    rows = []
    page_token = None
    while True:
        page = client.search_runs([found.experiment_id], max_results=1000, page_token=page_token)
        for run in page:
            if metric in run.data.metrics:
                tags = run.data.tags
                rows.append(
                    {
                        "run_id": run.info.run_id,
                        "run_name": run.info.run_name or "",
                        "value": run.data.metrics[metric],
                        "stage": tags.get("dalle.stage", ""),
                        "model": tags.get("dalle.evaluated_model", ""),
                        "evaluated_run_id": tags.get("dalle.evaluated_run_id", ""),
                        "eval_set_fingerprint": tags.get("dalle.eval_set_fingerprint", ""),
                        "start_time": run.info.start_time,
                        "metrics": dict(run.data.metrics),
                    }
                )
        page_token = page.token
        if not page_token:
            break
    rows.sort(key=lambda r: r["value"], reverse=not ascending)
    return rows[:top]


def print_comparison(
    rows: list[dict[str, Any]], metric: str, columns: list[str] | None = None, console: Any = None
) -> None:
    """A rich table of :func:`compare_runs` rows: rank, run, ``metric``, extra metric ``columns``, lineage."""
    from rich.console import Console
    from rich.table import Table

    if console is None:
        console = Console()
        if not console.is_terminal:  # piped: as wide as the table needs, not 80 columns
            console = Console(width=240)
    table = Table(title=f"runs by {metric}", show_header=True)
    table.add_column("#", justify="right", no_wrap=True)
    table.add_column("run", max_width=16, overflow="ellipsis", no_wrap=True)
    table.add_column("run id", no_wrap=True, min_width=12)
    table.add_column(metric, justify="right", no_wrap=True, min_width=len(metric))
    for column in columns or []:
        table.add_column(column, justify="right", no_wrap=True, min_width=len(column))
    table.add_column("model", no_wrap=True)
    table.add_column("evaluated run", no_wrap=True, min_width=12)
    table.add_column("caption set", no_wrap=True, min_width=16)
    for rank, row in enumerate(rows, 1):
        extra = [_number(row["metrics"].get(c)) for c in columns or []]
        table.add_row(
            str(rank),
            row["run_name"],
            row["run_id"][:12],
            _number(row["value"]),
            *extra,
            row["model"] if len(row["model"]) <= 32 else "…" + row["model"][-31:],
            row["evaluated_run_id"][:12],
            row["eval_set_fingerprint"],
        )
    console.print(table)


def _number(value: float | None) -> str:
    return "" if value is None else f"{value:.4f}"
