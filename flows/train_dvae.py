"""Flow ``train_dvae``: train the discrete VAE on the ``filtered`` images, in its own process.

Training runs as ``python -m dalle_lightning.training.dvae_train`` so that
Lightning's launcher can start DDP processes on a multi-GPU machine from a
Prefect worker. The flow opens the MLflow run the trainer logs into (curves,
reconstruction grids), then logs the exported checkpoint as the model
``dvae`` and registers it, tagged with the dataset fingerprint.

The output folder is named by hash(config, dataset fingerprint), so a re-run
with the same data and settings reuses the finished model.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger

from dalle_lightning.datasets.fingerprint import fingerprint
from dalle_lightning.datasets.layout import DatasetLayout
from flows import tracking
from flows.lineage import dataset_fingerprint
from flows.runners import subprocess_environment


def preset_with_overrides(preset: str, overrides: dict[str, dict[str, Any]]) -> Any:
    """The preset's ``DVAETrainConfig`` with ``{"model": {...}, "train": {...}}`` overrides, type-checked."""
    from dalle_lightning.config_overrides import build
    from dalle_lightning.training.dvae_train import DVAETrainConfig, load_preset

    unknown = set(overrides) - {"model", "train"}
    if unknown:
        raise ValueError(f"unknown dVAE override section(s) {sorted(unknown)}; expected model, train")
    base = dataclasses.asdict(load_preset(preset))
    base["model"].update(overrides.get("model", {}))
    base.update(overrides.get("train", {}))
    return build(DVAETrainConfig, base, "train_dvae")


@flow(name="train_dvae")
def train_dvae(
    root: str,
    dataset: str = "default",
    preset: str = "tiny",
    overrides: dict[str, Any] | None = None,
    tracking_uri: str | None = None,
    experiment: str = tracking.DEFAULT_EXPERIMENT,
    register_model: bool = True,
) -> dict[str, Any]:
    """Train a dVAE from ``preset`` (+ ``overrides``: {"model": {...}, "train": {...}}) on ``filter/<dataset>``."""
    from dalle_lightning.models.dvae import dvae_version

    logger = get_run_logger()
    layout = DatasetLayout(root)
    config = preset_with_overrides(preset, overrides or {})
    data_fp = dataset_fingerprint(layout, "filter", dataset)
    run_fp = fingerprint("train_dvae", config, data_fp)
    out_dir = layout.model_dir("dvae", run_fp)
    result_path = Path(out_dir) / "result.json"
    if result_path.exists():
        result = json.loads(result_path.read_text())
        logger.info("train_dvae: model for this config and data exists (%s); skipping training", out_dir)
        return {**result, "did_work": False}

    uri = tracking.setup(tracking_uri, experiment)
    import mlflow

    with tracking.stage_run(
        "train_dvae", tags={"dalle.fingerprint.input": data_fp, "dalle.preset": preset}
    ) as run:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        config_path = Path(out_dir) / "config.json"
        config_path.write_text(json.dumps(config.to_dict(), indent=1))
        command = [
            sys.executable,
            "-m",
            "dalle_lightning.training.dvae_train",
            "--config-json",
            str(config_path),
            "--data-root",
            root,
            "--dataset",
            dataset,
            "--out-dir",
            out_dir,
            "--tracking-uri",
            uri,
            "--run-id",
            run.info.run_id,
            "--result-json",
            str(Path(out_dir) / "train-result.json"),
        ]
        logger.info("train_dvae: %s", " ".join(command))
        subprocess.run(command, check=True, env=subprocess_environment(PYTHONUNBUFFERED="1"))
        trained = json.loads((Path(out_dir) / "train-result.json").read_text())
        version = dvae_version(trained["model_path"])
        tags = {"dalle.dataset": dataset, "dalle.fingerprint.data": data_fp, "dalle.dvae_version": version}
        mlflow.set_tags(tags)
        model_uri, registered = log_and_register_dvae(trained["model_path"], tags, register_model)
        result = {
            "model_path": trained["model_path"],
            "checkpoint": trained["checkpoint"],
            "dvae_version": version,
            "metrics": trained.get("metrics", {}),
            "model_uri": model_uri,
            "registered_version": registered,
            "mlflow_run_id": run.info.run_id,
            "data_fingerprint": data_fp,
        }
    result_path.write_text(json.dumps(result, indent=1))
    return {**result, "did_work": True}


def log_and_register_dvae(model_path: str, tags: dict[str, str], register: bool) -> tuple[str, str | None]:
    from flows.models_registry import log_and_register

    return log_and_register(model_path, name="dvae", tags=tags, register=register)
