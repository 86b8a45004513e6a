"""MLflow wiring for flows: an explicit tracking URI, one parent run per flow run, a nested run per stage.

The default store is a local SQLite file (``sqlite:///mlruns.db``): MLflow 3
refuses the old ``./mlruns`` file store, so a URI is always set explicitly.
Set ``MLFLOW_TRACKING_URI`` (or pass ``tracking_uri``) to use a server.

No secret goes to MLflow or to the logs: :func:`redact` masks the user-info
of URLs (``postgresql://user:password@host``, ``s3://KEY:SECRET@bucket``,
``https://TOKEN@host``), secret query values (``?token=…``, ``X-Amz-Signature=…``)
and values whose key names a secret (``api_token``, ``password``…).
:func:`flatten_params`, :func:`log_params`, :func:`stage_run`'s tags and
:func:`log_dataset` apply it, and :func:`setup` installs it on every log
record of the process (the training command a flow logs carries its tracking URI).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

DEFAULT_TRACKING_URI = "sqlite:///mlruns.db"
DEFAULT_EXPERIMENT = "dalle-lightning"
REDACTED = "***"

_SECRET_NAME = r"(?:[a-z0-9]*[_-])*(?:token|secret|password|passwd|pwd|api[_-]?key|access[_-]?key|private[_-]?key|credentials?|signature|sig|auth|authorization|session[_-]?token|security[_-]?token)(?:[_-][a-z0-9]*)*"
_SECRET_KEY_RE = re.compile(rf"^{_SECRET_NAME}$", re.IGNORECASE)
_NOT_SECRET = {"user_agent_token"}  # names that match but hold no secret (DownloadConfig's User-Agent token)
# scheme://userinfo@  (userinfo: anything up to the first @ before the host, no / or whitespace)
_USERINFO_RE = re.compile(r"(?P<scheme>\b[a-z][a-z0-9+.-]*://)(?P<userinfo>[^/@\s?#'\"]+)@", re.IGNORECASE)
# ?token=…  &X-Amz-Signature=…  (and the same in a command line: --api-key=…)
_QUERY_RE = re.compile(rf"(?P<sep>[?&;]|\b)(?P<key>{_SECRET_NAME})=(?P<value>[^&#\s'\"]+)", re.IGNORECASE)


def redact(text: str) -> str:
    """``text`` with URL user-info and secret-named query or ``key=value`` values replaced by ``***``."""
    if not isinstance(text, str) or ("@" not in text and "=" not in text):
        return text
    text = _USERINFO_RE.sub(lambda m: f"{m['scheme']}{REDACTED}@", text)
    return _QUERY_RE.sub(lambda m: f"{m['sep']}{m['key']}={REDACTED}", text)


def redact_params(params: dict[str, Any]) -> dict[str, str]:
    """Params (or tags) safe to log: values of secret-named keys masked, every value passed through :func:`redact`."""
    return {str(k): REDACTED if _is_secret_name(str(k)) else redact(str(v)) for k, v in params.items()}


def _is_secret_name(key: str) -> bool:
    name = key.rsplit(".", 1)[-1]
    return name not in _NOT_SECRET and _SECRET_KEY_RE.match(name) is not None


def log_params(params: dict[str, Any]) -> None:
    """``mlflow.log_params`` after :func:`redact_params`."""
    import mlflow

    mlflow.log_params(redact_params(params))


class _RedactingRecordFactory:
    """A log-record factory that masks secrets in a record's message (installed once per process)."""

    def __init__(self, base: Any) -> None:
        self.base = base

    def __call__(self, *args: Any, **kwargs: Any) -> logging.LogRecord:
        record = self.base(*args, **kwargs)
        try:
            message = record.getMessage()
        except Exception:  # a malformed record: leave it to the handler to report
            return record
        safe = redact(message)
        if safe != message:
            record.msg, record.args = safe, ()
        return record


def install_log_redaction() -> None:
    """Mask secrets in every log record made in this process from now on (Prefect run logs included)."""
    factory = logging.getLogRecordFactory()
    if not isinstance(factory, _RedactingRecordFactory):
        logging.setLogRecordFactory(_RedactingRecordFactory(factory))


def resolve_tracking_uri(tracking_uri: str | None = None) -> str:
    """``tracking_uri``, else ``$MLFLOW_TRACKING_URI``, else the local SQLite default."""
    return tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


ARTIFACTS_ENV = "DALLE_MLFLOW_ARTIFACTS"
"""Artifact root (``s3://bucket/mlflow``, a folder) of the experiments :func:`setup` creates."""


def _artifact_location(tracking_uri: str) -> str | None:
    """``$DALLE_MLFLOW_ARTIFACTS`` when set (runs get ``<it>/<run id>/artifacts``); else artifacts beside
    a local SQLite store (``<db dir>/mlartifacts``); else the server decides."""
    if os.environ.get(ARTIFACTS_ENV):
        return os.environ[ARTIFACTS_ENV].rstrip("/")
    if tracking_uri.startswith("sqlite:///"):
        db = Path(tracking_uri.removeprefix("sqlite:///")).resolve()
        return (db.parent / "mlartifacts").as_uri()
    return None


def setup(tracking_uri: str | None = None, experiment: str = DEFAULT_EXPERIMENT) -> str:
    """Point MLflow at ``tracking_uri`` and select (creating if needed) ``experiment``; returns the URI."""
    import mlflow

    install_log_redaction()
    uri = resolve_tracking_uri(tracking_uri)
    if uri.startswith("sqlite:///"):
        Path(uri.removeprefix("sqlite:///")).resolve().parent.mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(uri)
    if mlflow.get_experiment_by_name(experiment) is None:
        mlflow.create_experiment(experiment, artifact_location=_artifact_location(uri))
    mlflow.set_experiment(experiment)
    return uri


def flatten_params(prefix: str, config: Any) -> dict[str, str]:
    """A (nested) dataclass or dict as flat ``prefix.field`` -> string params, secrets masked (:func:`redact_params`)."""
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        config = dataclasses.asdict(config)
    out: dict[str, str] = {}
    for key, value in config.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, dict):
            out.update(flatten_params(name, value))
        else:
            out.update(redact_params({name: value}))
            out[name] = out[name][:500]
    return out


@contextlib.contextmanager
def stage_run(stage: str, *, nested: bool = True, tags: dict[str, str] | None = None) -> Iterator[Any]:
    """An MLflow run for one stage, nested under the active (flow) run."""
    import mlflow

    tags = redact_params({"dalle.stage": stage, **(tags or {})})
    with mlflow.start_run(run_name=stage, nested=nested, tags=tags) as run:
        yield run


def log_dataset(path: str, *, name: str, digest: str, context: str, rows: int | None = None) -> None:
    """Record a dataset folder the stage read (``context="input"``) or wrote (``"output"``)."""
    import mlflow
    from mlflow.data.http_dataset_source import HTTPDatasetSource
    from mlflow.data.meta_dataset import MetaDataset

    path = redact(path)
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
