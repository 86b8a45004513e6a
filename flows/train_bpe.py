"""Flow ``train_bpe``: the caption BPE of a dataset, trained on the ``filter`` captions.

The captions are read from ``filter/<dataset>`` (the ``caption`` column only):
the BPE then does not depend on the dVAE, and the ``tokens`` of every dVAE
carry the same captions (see :mod:`dalle_lightning.stages.bpe`). Output:

    <root>/bpe/<dataset>/<run fingerprint>/tokenizer.json   the tokenizers JSON (save_bpe / load_bpe)
    <root>/bpe/<dataset>/<run fingerprint>/bpe.json         completion record, written last

The run fingerprint is hash(filter dataset fingerprint, the settings that
shape the vocabulary, stage version): a re-run with the same captions and
settings finds the record (and a tokenizer file that still matches it) and
skips, also after the Prefect database is wiped; new captions or a new
vocabulary size train into a new folder. ``dropout`` and ``text_len`` only
change how captions are encoded, so they do not retrain. The MLflow run logs
the config, caption and vocabulary counts, the tokenizer file as an artifact
(``bpe/tokenizer.json``) and the input dataset, tagged with the filter
dataset fingerprint and the BPE fingerprint.
"""

from __future__ import annotations

import dataclasses
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import fsspec
from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from dalle_lightning.datasets.fingerprint import fingerprint
from dalle_lightning.datasets.layout import DatasetLayout
from dalle_lightning.stages import bpe as bpe_stage
from dalle_lightning.stages.bpe import BPEConfig
from flows import tracking
from flows.lineage import dataset_fingerprint

TOKENIZER_FILE = "tokenizer.json"
RECORD_FILE = "bpe.json"


def bpe_run_fingerprint(data_fingerprint: str, config: BPEConfig) -> str:
    """hash(filter dataset fingerprint, vocabulary settings, stage version): names the output folder."""
    return fingerprint(
        bpe_stage.STAGE, bpe_stage.STAGE_VERSION, data_fingerprint, config.vocabulary_settings()
    )


def bpe_folder(layout: DatasetLayout, dataset: str, run_fingerprint: str) -> str:
    return layout.join("bpe", dataset, run_fingerprint)


def read_record(folder: str) -> dict[str, Any] | None:
    """The completion record of a finished BPE whose tokenizer file still matches it, else None."""
    fs, path = fsspec.core.url_to_fs(f"{folder}/{RECORD_FILE}")
    try:
        with fs.open(path, "r") as f:
            record = json.load(f)
        tokenizer = bpe_stage.load_bpe(f"{folder}/{TOKENIZER_FILE}")
    except (FileNotFoundError, json.JSONDecodeError, ValueError):
        return None
    if bpe_stage.bpe_fingerprint(tokenizer) != record.get("bpe_fingerprint"):
        return None
    return {**record, "tokenizer_path": f"{folder}/{TOKENIZER_FILE}"}


def _write_record(folder: str, record: dict[str, Any]) -> None:
    fs, path = fsspec.core.url_to_fs(f"{folder}/{RECORD_FILE}")
    with fs.open(path, "w") as f:
        json.dump(record, f, indent=1, sort_keys=True)


@task(name="train-bpe", cache_policy=NO_CACHE)
def train_bpe_task(paths: list[str], config: BPEConfig, tokenizer_path: str) -> dict[str, Any]:
    """Train on the captions of ``paths``, save the tokenizer; returns its fingerprint and the stats."""
    start = time.perf_counter()
    tokenizer, stats = bpe_stage.train_bpe_on_shards(paths, config)
    bpe_stage.save_bpe(tokenizer, tokenizer_path)
    stats["seconds"] = time.perf_counter() - start
    return {"bpe_fingerprint": bpe_stage.bpe_fingerprint(tokenizer), "stats": stats}


def _filter_parts(layout: DatasetLayout, dataset: str) -> list[str]:
    from dalle_lightning.datasets.parquet_io import list_parts

    parts = list_parts(layout.dataset("filter", dataset))
    if not parts:
        raise ValueError(f"no filtered shards of {dataset!r} under {layout.root}; run `dalle ingest` first")
    return parts


@flow(name="train_bpe")
def train_bpe(
    root: str,
    dataset: str = "default",
    config: BPEConfig | None = None,
    tracking_uri: str | None = None,
    experiment: str = tracking.DEFAULT_EXPERIMENT,
) -> dict[str, Any]:
    """Train the caption BPE of ``filter/<dataset>`` unless one with the same captions and settings exists."""
    config = config or BPEConfig()
    logger = get_run_logger()
    layout = DatasetLayout(root)
    data_fp = dataset_fingerprint(layout, "filter", dataset)
    run_fp = bpe_run_fingerprint(data_fp, config)
    folder = bpe_folder(layout, dataset, run_fp)
    done = read_record(folder)
    if done is not None:
        logger.info("train_bpe: a BPE for these captions and settings exists (%s); skipping", folder)
        return {**done, "did_work": False}

    parts = _filter_parts(layout, dataset)
    logger.info("train_bpe %s: captions of %d shards, vocab_size %d", dataset, len(parts), config.vocab_size)
    tracking.setup(tracking_uri, experiment)
    import mlflow

    tags = {"dalle.dataset": dataset, "dalle.fingerprint.input": data_fp, "dalle.fingerprint.bpe_run": run_fp}
    with tracking.stage_run("train_bpe", nested=mlflow.active_run() is not None, tags=tags) as run:
        tokenizer_path = f"{folder}/{TOKENIZER_FILE}"
        trained = train_bpe_task(parts, config, tokenizer_path)
        stats = trained["stats"]
        mlflow.set_tag("dalle.bpe_fingerprint", trained["bpe_fingerprint"])
        mlflow.log_params(tracking.flatten_params("bpe", config))
        mlflow.log_metrics({k: float(v) for k, v in stats.items()})
        _log_tokenizer(tokenizer_path)
        tracking.log_dataset(
            layout.dataset("filter", dataset),
            name=f"filter/{dataset}",
            digest=data_fp,
            context="input",
            rows=stats["captions"],
        )
        record = {
            "bpe_fingerprint": trained["bpe_fingerprint"],
            "run_fingerprint": run_fp,
            "data_fingerprint": data_fp,
            "dataset": dataset,
            "config": dataclasses.asdict(config),
            "vocab_size": stats["vocab_size"],
            "stats": stats,
            "mlflow_run_id": run.info.run_id,
            "created": time.time(),
        }
    _write_record(folder, record)
    logger.info("train_bpe: %d captions -> %d tokens in %s", stats["captions"], stats["vocab_size"], folder)
    return {**record, "tokenizer_path": tokenizer_path, "did_work": True}


def _log_tokenizer(tokenizer_path: str) -> None:
    """The tokenizer file as the artifact ``bpe/tokenizer.json`` (copied locally first for remote roots)."""
    import mlflow

    fs, path = fsspec.core.url_to_fs(tokenizer_path)
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(tmp) / TOKENIZER_FILE
        fs.get(path, str(local))
        mlflow.log_artifact(str(local), artifact_path="bpe")


def run_train_bpe(root: str, **params: Any) -> dict[str, Any]:
    """Run the ``train_bpe`` flow against one Prefect API for the command (started here if none is set)."""
    from flows.prefect_api import prefect_api

    with prefect_api():
        return train_bpe(root=root, **params)
