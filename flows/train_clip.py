"""Flow ``train_clip``: train a CLIP on the ``filter`` images and captions with the caption BPE, in its own process.

Training runs as ``python -m dalle_lightning.training.clip_train`` so that
Lightning's launcher can start DDP processes on a multi-GPU machine from a
Prefect worker. The flow opens the MLflow run the trainer logs into (params,
loss, logit scale, in-batch accuracy), then logs the exported model as
``clip`` and registers it, tagged with its lineage: the ``filter`` dataset
fingerprint and the BPE fingerprint.

The BPE is ``bpe`` (a ``tokenizer.json``) or the latest finished
``train_bpe`` record of the dataset; the model's ``text_vocab`` follows it
unless the overrides set it. The output folder
``<root>/models/clip/<run fingerprint>`` is named by hash(config, filter
dataset fingerprint, BPE fingerprint): a re-run with the same data and
settings reuses the finished model, and an interrupted one resumes from its
last checkpoint.
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

STAGE_VERSION = 1


def preset_with_overrides(preset: str, overrides: dict[str, dict[str, Any]]) -> Any:
    """The preset's ``ClipTrainConfig`` with ``{"model": {...}, "train": {...}}`` overrides, type-checked."""
    from dalle_lightning.config_overrides import build
    from dalle_lightning.training.clip_train import ClipTrainConfig, load_preset

    unknown = set(overrides) - {"model", "train"}
    if unknown:
        raise ValueError(f"unknown CLIP override section(s) {sorted(unknown)}; expected model, train")
    base = dataclasses.asdict(load_preset(preset))
    base["model"].update(overrides.get("model", {}))
    base.update(overrides.get("train", {}))
    return build(ClipTrainConfig, base, "train_clip")


def fit_to_bpe(
    config: Any, overrides: dict[str, dict[str, Any]], *, text_vocab: int
) -> tuple[Any, dict[str, int]]:
    """``config`` with the model's ``text_vocab`` set to the BPE's, unless ``overrides`` set it.

    Returns the config and the fields it changed.
    """
    if "text_vocab" in overrides.get("model", {}) or config.model.text_vocab == text_vocab:
        return config, {}
    changed = {"text_vocab": text_vocab}
    return dataclasses.replace(config, model=dataclasses.replace(config.model, **changed)), changed


@flow(name="train_clip")
def train_clip(
    root: str,
    dataset: str = "default",
    bpe: str | None = None,
    preset: str = "tiny",
    overrides: dict[str, Any] | None = None,
    tracking_uri: str | None = None,
    experiment: str = tracking.DEFAULT_EXPERIMENT,
    register_model: bool = True,
) -> dict[str, Any]:
    """Train a CLIP from ``preset`` (+ ``overrides``: {"model": {...}, "train": {...}}) on ``filter/<dataset>``."""
    from dalle_lightning.stages.bpe import bpe_fingerprint, load_bpe
    from flows.train_bpe import _log_tokenizer as log_tokenizer
    from flows.train_dalle import latest_bpe

    logger = get_run_logger()
    layout = DatasetLayout(root)
    overrides = overrides or {}
    if bpe is None:
        record = latest_bpe(layout, dataset)
        bpe_path, bpe_fp = record["tokenizer_path"], record["bpe_fingerprint"]
    else:
        bpe_path, bpe_fp = bpe, bpe_fingerprint(load_bpe(bpe))
    tokenizer = load_bpe(bpe_path)
    config, changed = fit_to_bpe(
        preset_with_overrides(preset, overrides), overrides, text_vocab=tokenizer.get_vocab_size()
    )
    if changed:
        logger.info("train_clip: model fitted to the BPE: %s", changed)
    data_fp = dataset_fingerprint(layout, "filter", dataset)
    run_fp = fingerprint("train_clip", STAGE_VERSION, config, data_fp, bpe_fp)
    out_dir = Path(layout.model_dir("clip", run_fp))
    result_path = out_dir / "result.json"
    if result_path.exists():
        result = json.loads(result_path.read_text())
        logger.info("train_clip: model for this config, data and BPE exists (%s); skipping training", out_dir)
        return {**result, "did_work": False}

    uri = tracking.setup(tracking_uri, experiment)
    import mlflow

    tags = {"dalle.dataset": dataset, "dalle.fingerprint.data": data_fp, "dalle.bpe_fingerprint": bpe_fp}
    last = out_dir / "checkpoints" / "last.ckpt"
    resume = last if last.exists() else None
    run_tags = {**tags, "dalle.preset": preset, **({"dalle.resumed_from": str(resume)} if resume else {})}
    with tracking.stage_run("train_clip", nested=mlflow.active_run() is not None, tags=run_tags) as run:
        out_dir.mkdir(parents=True, exist_ok=True)
        config_path = out_dir / "config.json"
        config_path.write_text(json.dumps(config.to_dict(), indent=1))
        command = [
            sys.executable,
            "-m",
            "dalle_lightning.training.clip_train",
            "--config-json",
            str(config_path),
            "--data-root",
            root,
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
        if resume is not None:
            command += ["--resume-from", str(resume)]
            logger.info("train_clip: resuming the interrupted run from %s", resume)
        logger.info("train_clip: %s", " ".join(command))
        subprocess.run(command, check=True, env=subprocess_environment(PYTHONUNBUFFERED="1"))
        trained = json.loads((out_dir / "train-result.json").read_text())
        tracking.log_dataset(
            layout.dataset("filter", dataset), name=f"filter/{dataset}", digest=data_fp, context="input"
        )
        log_tokenizer(bpe_path)
        model_uri, registered = log_and_register_clip(trained["model_path"], tags, register_model)
        result = {
            "model_path": trained["model_path"],
            "checkpoint": trained["checkpoint"],
            "steps": trained["steps"],
            "metrics": trained.get("metrics", {}),
            "model_uri": model_uri,
            "registered_version": registered,
            "mlflow_run_id": run.info.run_id,
            "data_fingerprint": data_fp,
            "bpe_fingerprint": bpe_fp,
            "bpe_path": bpe_path,
            "run_fingerprint": run_fp,
        }
    result_path.write_text(json.dumps(result, indent=1))
    return {**result, "did_work": True}


def log_and_register_clip(model_path: str, tags: dict[str, str], register: bool) -> tuple[str, str | None]:
    from flows.models_registry import log_and_register

    return log_and_register(model_path, name="clip", tags=tags, register=register)


def run_train_clip(root: str, **params: Any) -> dict[str, Any]:
    """Run the ``train_clip`` flow against one Prefect API for the command (started here if none is set)."""
    from flows.prefect_api import prefect_api

    with prefect_api():
        return train_clip(root=root, **params)
