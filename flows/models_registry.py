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
