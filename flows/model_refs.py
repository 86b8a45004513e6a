"""Model references — a checkpoint path or an MLflow URI — resolved to a local file and the run that made it.

``models:/dalle/3``, ``models:/dalle@champion``, ``models:/dalle/latest`` and
``runs:/<run id>/…`` are looked up in MLflow (the tracking URI must be set);
a plain path is used as it is, and the ``result.json`` a training flow writes
beside its exported model (``mlflow_run_id``, ``bpe_path``) ties it to its run.
A DALL-E needs the caption BPE it was trained with (the ``bpe/tokenizer.json``
artifact of its run) and the dVAE whose codes it learned (the registered
``dvae`` whose ``dalle.dvae_version`` tag matches its own).
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flows.models_registry import resolve_checkpoint

BPE_ARTIFACT = "bpe/tokenizer.json"


@dataclass(frozen=True)
class ModelRef:
    """A model as given (``ref``), its local checkpoint, and where MLflow knows it from."""

    ref: str
    path: str
    run_id: str | None = None
    """The MLflow run that logged the model (its training run), when known."""
    version: str | None = None
    """The registry version, for a ``models:/`` reference."""
    tags: dict[str, str] = field(default_factory=dict)
    """The registry version's tags (lineage: ``dalle.dvae_version``, …), else the run's ``dalle.*`` tags."""
    record: dict[str, Any] = field(default_factory=dict)
    """The training flow's ``result.json`` beside a checkpoint given by path (empty when there is none)."""


def is_mlflow_uri(ref: str) -> bool:
    return ref.startswith(("models:/", "runs:/"))


def resolve_model(ref: str) -> ModelRef:
    """The local checkpoint of ``ref`` and its training run (``ValueError`` / ``FileNotFoundError`` if unknown)."""
    import mlflow

    path = resolve_checkpoint(ref)
    if ref.startswith("runs:/"):
        run_id = ref.removeprefix("runs:/").split("/", 1)[0]
        return ModelRef(ref, path, run_id, None, _run_tags(run_id))
    if ref.startswith("models:/"):
        from mlflow.store.artifact.utils.models import get_model_name_and_version

        client = mlflow.MlflowClient()
        found = get_model_name_and_version(client, ref)
        if len(found) == 1:  # models:/m-<id>: a logged model, not a registry version
            run_id = mlflow.get_logged_model(found[0]).source_run_id
            return ModelRef(ref, path, run_id, None, _run_tags(run_id) if run_id else {})
        version = client.get_model_version(*found)
        return ModelRef(ref, path, version.run_id, str(version.version), dict(version.tags))
    record = _record_beside(path)
    run_id = record.get("mlflow_run_id")
    return ModelRef(ref, path, run_id, None, {}, record)


def _record_beside(path: str) -> dict[str, Any]:
    beside = Path(path).with_name("result.json")
    try:
        record = json.loads(beside.read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    return record if isinstance(record, dict) else {}


def _run_tags(run_id: str) -> dict[str, str]:
    import mlflow

    tags = mlflow.MlflowClient().get_run(run_id).data.tags
    return {k: v for k, v in tags.items() if k.startswith("dalle.")}


def dalle_bpe(dalle: ModelRef, bpe: str | None = None) -> str:
    """The caption BPE of a DALL-E: ``bpe`` if given, else the one its training recorded.

    Looks at the ``bpe_path`` of the ``result.json`` beside the checkpoint,
    then at the ``bpe/tokenizer.json`` artifact of its run. ``ValueError`` when
    neither is known: pass ``bpe``.
    """
    if bpe is not None:
        return bpe
    recorded = dalle.record.get("bpe_path")
    if recorded and Path(recorded).is_file():
        return str(recorded)
    if dalle.run_id is not None:
        import mlflow

        try:
            return mlflow.artifacts.download_artifacts(run_id=dalle.run_id, artifact_path=BPE_ARTIFACT)
        except Exception as err:  # MlflowException, OSError: the run or its artifact is not reachable
            raise ValueError(
                f"cannot fetch the BPE ({BPE_ARTIFACT}) of run {dalle.run_id} for {dalle.ref!r}: {err}; "
                "pass the tokenizer.json with --bpe"
            ) from err
    raise ValueError(
        f"no BPE is recorded for {dalle.ref!r} (no result.json beside it and no MLflow run): "
        "pass the tokenizer.json it was trained with (--bpe)"
    )


def dalle_dvae(dalle: ModelRef, dvae: str | None = None) -> ModelRef:
    """The dVAE to decode a DALL-E's codes: ``dvae`` if given, else the registered ``dvae`` of its lineage.

    With ``dvae`` given and a recorded ``dalle.dvae_version`` that differs from
    it, warns (a dVAE with another decoder can still be right, e.g. after a
    decoder-only phase). Without ``dvae``, ``ValueError`` when the registry has
    no ``dvae`` version tagged with the DALL-E's ``dalle.dvae_version``.
    """
    from dalle_lightning.models.dvae import dvae_version

    wanted = dalle.tags.get("dalle.dvae_version") or dalle.record.get("dvae_version")
    if dvae is not None:
        found = resolve_model(dvae)
        have = dvae_version(found.path)
        if wanted and have != wanted:
            warnings.warn(
                f"the DALL-E {dalle.ref!r} was trained on the codes of dVAE {wanted}; {dvae!r} is dVAE {have}",
                stacklevel=2,
            )
        return found
    if not wanted:
        raise ValueError(f"no dVAE is recorded for {dalle.ref!r}: pass one (--dvae PATH or models:/dvae/N)")
    import mlflow

    try:
        versions = mlflow.MlflowClient().search_model_versions("name='dvae'")
    except mlflow.exceptions.MlflowException:
        versions = []
    for version in sorted(versions, key=lambda v: int(v.version), reverse=True):
        if version.tags.get("dalle.dvae_version") == wanted:
            return resolve_model(f"models:/dvae/{version.version}")
    raise ValueError(
        f"the registry has no dvae tagged dalle.dvae_version={wanted} (the DALL-E's): pass one with --dvae"
    )
