"""Logging and resolving trained models in MLflow's registry.

A trained model is logged as an MLflow pyfunc model whose artifact is the
exported checkpoint file (loaded with ``torch.load(weights_only=True)``) and
registered under a fixed name (``dvae``, ``dalle``, ``clip``), tagged with the
fingerprints of the data (and upstream models) it was trained on. A model can
then be named by path or by registry URI (``models:/dvae/3``, ``models:/dvae@production``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import mlflow.pyfunc


class CheckpointModel(mlflow.pyfunc.PythonModel):
    """A pyfunc wrapper around an exported checkpoint; ``predict`` is left to the model's own loaders."""

    def load_context(self, context: Any) -> None:
        self.checkpoint = context.artifacts["checkpoint"]

    def predict(self, context: Any, model_input: list[str], params: dict | None = None) -> Any:
        raise NotImplementedError("load the checkpoint with the project's loader (e.g. load_dvae) instead")


def log_and_register(
    checkpoint: str, *, name: str, tags: dict[str, str], register: bool = True
) -> tuple[str, str | None]:
    """Log ``checkpoint`` as model ``name`` in the active run and register it; returns (model URI, version)."""
    info = mlflow.pyfunc.log_model(
        name=name,
        python_model=CheckpointModel(),
        artifacts={"checkpoint": checkpoint},
        pip_requirements=[],
    )
    if not register:
        return info.model_uri, None
    version = mlflow.register_model(info.model_uri, name, tags=tags)
    client = mlflow.MlflowClient()
    for key, value in tags.items():
        client.set_model_version_tag(name, version.version, key, value)
    return info.model_uri, version.version


def resolve_checkpoint(model: str) -> str:
    """A local checkpoint path for ``model``: a file path, or an MLflow ``models:/``/``runs:/`` URI."""
    if model.startswith(("models:/", "runs:/")):
        local = mlflow.artifacts.download_artifacts(artifact_uri=model)
        found = sorted(Path(local).rglob("*.pt"))
        if not found:
            raise ValueError(f"model {model!r} has no .pt checkpoint among its artifacts ({local})")
        return str(found[0])
    if not os.path.exists(model):
        raise FileNotFoundError(f"model checkpoint not found: {model!r} (give a path or a models:/ URI)")
    return model


def promote(
    name: str,
    version: str,
    *,
    metric: str,
    value: float,
    eval_set_fingerprint: str,
    aliases: list[str],
    lower_is_better: bool | None = None,
) -> list[str]:
    """Point each of ``aliases`` (e.g. ``candidate``, ``production``) at ``version`` if it beats the current one.

    The evaluation is recorded on the version as tags ``dalle.eval.<metric>`` and
    ``dalle.eval_set_fingerprint``. An alias moves when it is unset, when its
    version was scored on another caption set (not comparable: logged), or
    when ``value`` is better than its version's (higher, or lower for metrics
    named like ``fid``/``loss``). Returns the aliases that now point at ``version``.
    """
    import logging

    from flows.evaluate import LOWER_IS_BETTER

    log = logging.getLogger(__name__)
    if lower_is_better is None:
        lower_is_better = metric.startswith(LOWER_IS_BETTER)
    client = mlflow.MlflowClient()
    client.set_model_version_tag(name, version, f"dalle.eval.{metric}", repr(value))
    client.set_model_version_tag(name, version, "dalle.eval_set_fingerprint", eval_set_fingerprint)
    moved = []
    for alias in aliases:
        try:
            current = client.get_model_version_by_alias(name, alias)
        except mlflow.exceptions.MlflowException:
            current = None
        if current is not None and current.version != str(version):
            same_set = current.tags.get("dalle.eval_set_fingerprint") == eval_set_fingerprint
            best = current.tags.get(f"dalle.eval.{metric}")
            if same_set and best is not None:
                better = value < float(best) if lower_is_better else value > float(best)
                if not better:
                    log.info(
                        "%s@%s stays on v%s (%s %s vs %s)", name, alias, current.version, metric, best, value
                    )
                    continue
            else:
                log.warning(
                    "%s@%s (v%s) was not scored on %s by %s: moving it to v%s",
                    name, alias, current.version, eval_set_fingerprint, metric, version,
                )  # fmt: skip
        client.set_registered_model_alias(name, alias, str(version))
        moved.append(alias)
    return moved
