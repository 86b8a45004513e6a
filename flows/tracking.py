"""MLflow wiring for flows: an explicit tracking URI, one parent run per flow run, a nested run per stage.

The default store is a local SQLite file (``sqlite:///mlruns.db``): MLflow 3
refuses the old ``./mlruns`` file store, so a URI is always set explicitly.
Set ``MLFLOW_TRACKING_URI`` (or pass ``tracking_uri``) to use a server.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

DEFAULT_TRACKING_URI = "sqlite:///mlruns.db"
DEFAULT_EXPERIMENT = "dalle-lightning"


def resolve_tracking_uri(tracking_uri: str | None = None) -> str:
    """``tracking_uri``, else ``$MLFLOW_TRACKING_URI``, else the local SQLite default."""
    return tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


def _artifact_location(tracking_uri: str) -> str | None:
    """Artifacts beside a local SQLite store (``<db dir>/mlartifacts``); the server decides otherwise."""
    if tracking_uri.startswith("sqlite:///"):
        db = Path(tracking_uri.removeprefix("sqlite:///")).resolve()
        return (db.parent / "mlartifacts").as_uri()
    return None


def setup(tracking_uri: str | None = None, experiment: str = DEFAULT_EXPERIMENT) -> str:
    """Point MLflow at ``tracking_uri`` and select (creating if needed) ``experiment``; returns the URI."""
    import mlflow

    uri = resolve_tracking_uri(tracking_uri)
    if uri.startswith("sqlite:///"):
        Path(uri.removeprefix("sqlite:///")).resolve().parent.mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(uri)
    if mlflow.get_experiment_by_name(experiment) is None:
        mlflow.create_experiment(experiment, artifact_location=_artifact_location(uri))
    mlflow.set_experiment(experiment)
    return uri


def flatten_params(prefix: str, config: Any) -> dict[str, str]:
    """A (nested) dataclass or dict as flat ``prefix.field`` -> string params."""
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        config = dataclasses.asdict(config)
    out: dict[str, str] = {}
    for key, value in config.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, dict):
            out.update(flatten_params(name, value))
        else:
            out[name] = str(value)[:500]
    return out


@contextlib.contextmanager
def stage_run(stage: str, *, nested: bool = True, tags: dict[str, str] | None = None) -> Iterator[Any]:
    """An MLflow run for one stage, nested under the active (flow) run."""
    import mlflow

    with mlflow.start_run(run_name=stage, nested=nested, tags={"dalle.stage": stage, **(tags or {})}) as run:
        yield run


def log_dataset(path: str, *, name: str, digest: str, context: str, rows: int | None = None) -> None:
    """Record a dataset folder the stage read (``context="input"``) or wrote (``"output"``)."""
    import mlflow
    from mlflow.data.http_dataset_source import HTTPDatasetSource
    from mlflow.data.meta_dataset import MetaDataset

    if "://" in path and not path.startswith("file://"):
        source: Any = HTTPDatasetSource(url=path) if path.startswith("http") else _uri_source(path)
    else:
        source = _uri_source(Path(path).resolve().as_uri())
    dataset = MetaDataset(source=source, name=name, digest=digest[:36])
    mlflow.log_input(dataset, context=context, tags={"rows": str(rows)} if rows is not None else None)


def _uri_source(uri: str) -> Any:
    import warnings

    from mlflow.data.dataset_source_registry import resolve_dataset_source

    with warnings.catch_warnings():  # "can be interpreted in multiple ways": any artifact source will do
        warnings.simplefilter("ignore")
        return resolve_dataset_source(uri)
