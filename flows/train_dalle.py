"""Flow ``train_dalle``: train the transformer on the ``tokens`` of one dVAE with the caption BPE, in its own process.

Training runs as ``python -m dalle_lightning.training.dalle_train`` so that
Lightning's launcher can start DDP (or FSDP) processes on a multi-GPU machine
from a Prefect worker. The flow opens the MLflow run the trainer logs into
(params, text and image loss curves, tokens/s, sample grids), then logs the
exported model as ``dalle`` and registers it, tagged with its lineage: the
dVAE version whose codes it was trained on, the tokens dataset fingerprint
and the BPE fingerprint.

Inputs:

- the tokens: ``dvae`` (a checkpoint path or ``models:/dvae/…`` URI; its
  version names the tokens, and it decodes the sample grids) or just
  ``dvae_version`` (the grids then come from the registered ``dvae`` with that
  version tag if there is one, else show the codes as colours);
- the BPE: ``bpe`` (a ``tokenizer.json``), or the latest finished ``train_bpe``
  record of the dataset.

The model's ``text_vocab`` follows the BPE and its ``grid_size`` and
``image_vocab`` follow the tokens (their schema metadata), unless the
overrides set them. The output folder ``<root>/models/dalle/<run fingerprint>``
is named by hash(config, tokens dataset fingerprint, BPE fingerprint): a
re-run with the same data and settings reuses the finished model, and an
interrupted one resumes from its last checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import fsspec
from prefect import flow, get_run_logger

from dalle_lightning.datasets.fingerprint import fingerprint
from dalle_lightning.datasets.layout import DatasetLayout
from flows import tracking
from flows.lineage import dataset_fingerprint
from flows.runners import subprocess_environment

STAGE_VERSION = 1


def preset_with_overrides(preset: str, overrides: dict[str, dict[str, Any]]) -> Any:
    """The preset's ``DalleTrainConfig`` with ``{"model": {...}, "train": {...}}`` overrides, type-checked."""
    from dalle_lightning.config_overrides import build
    from dalle_lightning.training.dalle_train import DalleTrainConfig, load_preset

    unknown = set(overrides) - {"model", "train"}
    if unknown:
        raise ValueError(f"unknown DALL-E override section(s) {sorted(unknown)}; expected model, train")
    base = dataclasses.asdict(load_preset(preset))
    base["model"].update(overrides.get("model", {}))
    base.update(overrides.get("train", {}))
    return build(DalleTrainConfig, base, "train_dalle")


def fit_to_data(
    config: Any, overrides: dict[str, dict[str, Any]], *, text_vocab: int, grid_size: int, image_vocab: int
) -> tuple[Any, dict[str, int]]:
    """``config`` with the model's vocabularies and grid taken from the data, except where ``overrides`` set them.

    Returns the config and the fields it changed.
    """
    fixed = set(overrides.get("model", {}))
    wanted = {"text_vocab": text_vocab, "grid_size": grid_size, "image_vocab": image_vocab}
    changed = {k: v for k, v in wanted.items() if k not in fixed and getattr(config.model, k) != v}
    return dataclasses.replace(config, model=dataclasses.replace(config.model, **changed)), changed


def latest_bpe(layout: DatasetLayout, dataset: str) -> dict[str, Any]:
    """The newest finished ``train_bpe`` record of ``dataset`` (with its ``tokenizer_path``); ``ValueError`` if none."""
    from flows.train_bpe import RECORD_FILE, read_record

    fs, base = fsspec.core.url_to_fs(layout.join("bpe", dataset))
    records = []
    for path in fs.glob(f"{base}/*/{RECORD_FILE}"):
        folder = layout.join("bpe", dataset, path.rstrip("/").split("/")[-2])
        record = read_record(folder)
        if record is not None:
            records.append(record)
    if not records:
        raise ValueError(f"no finished BPE for {dataset!r} under {layout.root}: run `dalle train-bpe` first")
    return max(records, key=lambda r: r.get("created", 0.0))


def _tokens_info(layout: DatasetLayout, dvae_version: str, dataset: str) -> tuple[int, int]:
    """(grid side, codebook size) recorded in the first tokens shard's schema."""
    import pyarrow.parquet as pq

    from dalle_lightning.datasets.parquet_io import list_parts
    from data_schemas.tokens import token_metadata

    folder = layout.join("tokens", dvae_version, dataset)
    parts = list_parts(folder)
    if not parts:
        raise ValueError(f"no tokens in {folder}: run `dalle tokenize` for {dataset!r} with this dVAE first")
    fs, path = fsspec.core.url_to_fs(parts[0])
    with fs.open(path, "rb") as f:
        recorded = token_metadata(pq.read_schema(f))
    if recorded is None:
        raise ValueError(f"{parts[0]} records no grid shape and codebook size: re-run `dalle tokenize`")
    grid_h, grid_w, vocab_size, _ = recorded
    if grid_h != grid_w:
        raise ValueError(f"the tokens have a {grid_h}×{grid_w} grid; the transformer needs a square one")
    return grid_h, vocab_size


def _resolve_dvae(dvae: str | None, dvae_version: str | None) -> tuple[str | None, str]:
    """(dVAE checkpoint path or None, dVAE version) from a path/URI and/or a version."""
    from dalle_lightning.models.dvae import dvae_version as version_of
    from flows.models_registry import resolve_checkpoint

    if dvae is None and dvae_version is None:
        raise ValueError(
            "give dvae (a checkpoint path or models:/ URI) or dvae_version (the tokens to train on)"
        )
    if dvae is None:
        return _registered_dvae(dvae_version), dvae_version
    path = resolve_checkpoint(dvae)
    version = version_of(path)
    if dvae_version is not None and dvae_version != version:
        raise ValueError(f"dvae {dvae!r} has version {version}, not the dvae_version {dvae_version!r} given")
    return path, version


def _registered_dvae(version: str) -> str | None:
    """The checkpoint of the registered ``dvae`` tagged with ``version``, if the registry has one."""
    import mlflow

    from flows.models_registry import resolve_checkpoint

    try:
        versions = mlflow.MlflowClient().search_model_versions("name='dvae'")
    except mlflow.exceptions.MlflowException:
        return None
    for found in versions:
        if found.tags.get("dalle.dvae_version") == version:
            return resolve_checkpoint(f"models:/dvae/{found.version}")
    return None


@flow(name="train_dalle")
def train_dalle(
    root: str,
    dataset: str = "default",
    dvae: str | None = None,
    dvae_version: str | None = None,
    bpe: str | None = None,
    preset: str = "tiny",
    overrides: dict[str, Any] | None = None,
    tracking_uri: str | None = None,
    experiment: str = tracking.DEFAULT_EXPERIMENT,
    register_model: bool = True,
) -> dict[str, Any]:
    """Train the transformer from ``preset`` (+ ``overrides``) on ``tokens/<dvae version>/<dataset>``."""
    from dalle_lightning.stages.bpe import bpe_fingerprint, load_bpe
    from flows.tokenize_images import tokens_stage

    logger = get_run_logger()
    layout = DatasetLayout(root)
    overrides = overrides or {}
    uri = tracking.setup(tracking_uri, experiment)
    dvae_path, version = _resolve_dvae(dvae, dvae_version)
    bpe_path = latest_bpe(layout, dataset)["tokenizer_path"] if bpe is None else bpe
    tokenizer = load_bpe(bpe_path)
    bpe_fp = bpe_fingerprint(tokenizer)
    grid, codebook = _tokens_info(layout, version, dataset)
    config, changed = fit_to_data(
        preset_with_overrides(preset, overrides),
        overrides,
        text_vocab=tokenizer.get_vocab_size(),
        grid_size=grid,
        image_vocab=codebook,
    )
    if changed:
        logger.info("train_dalle: model fitted to the BPE and the tokens: %s", changed)
    data_fp = dataset_fingerprint(layout, tokens_stage(version), dataset)
    run_fp = fingerprint("train_dalle", STAGE_VERSION, config, data_fp, bpe_fp)
    out_dir = Path(layout.model_dir("dalle", run_fp))
    result_path = out_dir / "result.json"
    if result_path.exists():
        result = json.loads(result_path.read_text())
        logger.info("train_dalle: model for this config and data exists (%s); skipping training", out_dir)
        return {**result, "did_work": False}

    import mlflow

    tags = {
        "dalle.dataset": dataset,
        "dalle.dvae_version": version,
        "dalle.fingerprint.data": data_fp,
        "dalle.bpe_fingerprint": bpe_fp,
    }
    last = out_dir / "checkpoints" / "last.ckpt"
    resume = last if last.exists() else None
    run_tags = {**tags, "dalle.preset": preset, **({"dalle.resumed_from": str(resume)} if resume else {})}
    with tracking.stage_run("train_dalle", nested=mlflow.active_run() is not None, tags=run_tags) as run:
        out_dir.mkdir(parents=True, exist_ok=True)
        config_path = out_dir / "config.json"
        config_path.write_text(json.dumps(config.to_dict(), indent=1))
        command = [
            sys.executable,
            "-m",
            "dalle_lightning.training.dalle_train",
            "--config-json",
            str(config_path),
            "--tokens-root",
            root,
            "--dvae-version",
            version,
            "--dataset",
            dataset,
            "--bpe-path",
            bpe_path,
            "--out-dir",
            str(out_dir),
            "--tracking-uri",
            uri,
            "--run-id",
            run.info.run_id,
            "--result-json",
            str(out_dir / "train-result.json"),
        ]
        if dvae_path is not None:
            command += ["--dvae-path", dvae_path]
        if resume is not None:
            command += ["--resume-from", str(resume)]
            logger.info("train_dalle: resuming the interrupted run from %s", resume)
        logger.info("train_dalle: %s", " ".join(command))
        subprocess.run(command, check=True, env=subprocess_environment(PYTHONUNBUFFERED="1"))
        trained = json.loads((out_dir / "train-result.json").read_text())
        tracking.log_dataset(
            layout.join("tokens", version, dataset),
            name=f"tokens/{version}/{dataset}",
            digest=data_fp,
            context="input",
        )
        _log_tokenizer(bpe_path)
        model_uri, registered = log_and_register_dalle(trained["model_path"], tags, register_model)
        result = {
            "model_path": trained["model_path"],
            "checkpoint": trained["checkpoint"],
            "steps": trained["steps"],
            "metrics": trained.get("metrics", {}),
            "model_uri": model_uri,
            "registered_version": registered,
            "mlflow_run_id": run.info.run_id,
            "dvae_version": version,
            "data_fingerprint": data_fp,
            "bpe_fingerprint": bpe_fp,
            "bpe_path": bpe_path,
            "run_fingerprint": run_fp,
        }
    result_path.write_text(json.dumps(result, indent=1))
    return {**result, "did_work": True}


def _log_tokenizer(tokenizer_path: str) -> None:
    """The BPE the model reads captions with, as the artifact ``bpe/tokenizer.json``."""
    import tempfile

    import mlflow

    fs, path = fsspec.core.url_to_fs(tokenizer_path)
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(tmp) / "tokenizer.json"
        fs.get(path, str(local))
        mlflow.log_artifact(str(local), artifact_path="bpe")


def log_and_register_dalle(model_path: str, tags: dict[str, str], register: bool) -> tuple[str, str | None]:
    from flows.models_registry import log_and_register

    return log_and_register(model_path, name="dalle", tags=tags, register=register)


def run_train_dalle(root: str, **params: Any) -> dict[str, Any]:
    """Run the ``train_dalle`` flow against one Prefect API for the command (started here if none is set)."""
    from flows.prefect_api import prefect_api

    with prefect_api():
        return train_dalle(root=root, **params)
