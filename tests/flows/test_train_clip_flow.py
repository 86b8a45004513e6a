"""The ``train_clip`` flow: trains in its own process, logs params and curves, registers ``clip`` with lineage."""

from __future__ import annotations

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.timeout(400)]

# a CLIP that trains in seconds on the 64 px test images (cropped and resized to 16 px)
MICRO = {
    "model": {
        "image_size": 16,
        "patch_size": 4,
        "vision_width": 32,
        "vision_layers": 1,
        "vision_heads": 2,
        "text_len": 16,
        "text_width": 32,
        "text_layers": 1,
        "text_heads": 2,
        "embed_dim": 16,
    },
    "train": {
        "max_steps": 4,
        "batch_size": 4,
        "warmup_steps": 1,
        "shuffle_buffer": 0,
        "num_workers": 0,
        "accelerator": "cpu",
        "devices": 1,
        "log_every_n_steps": 1,
        "checkpoint_every_n_steps": 2,
    },
}


def test_train_clip_flow_logs_the_run_and_registers_the_model_with_lineage(
    tmp_path, prefect_harness, write_filtered_dataset
):
    import mlflow

    from dalle_lightning.datasets.layout import DatasetLayout
    from dalle_lightning.models.clip import load_clip
    from dalle_lightning.stages.bpe import BPEConfig
    from flows.lineage import dataset_fingerprint
    from flows.models_registry import resolve_checkpoint
    from flows.train_bpe import train_bpe
    from flows.train_clip import train_clip

    root = tmp_path / "root"
    write_filtered_dataset(root, "t", shards=2, per_shard=6)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    bpe = train_bpe(str(root), dataset="t", config=BPEConfig(vocab_size=300), tracking_uri=uri)

    result = train_clip(str(root), dataset="t", overrides=MICRO, tracking_uri=uri)  # the latest BPE
    assert result["did_work"] and str(result["registered_version"]) == "1" and result["steps"] == 4
    assert result["bpe_path"] == bpe["tokenizer_path"]

    client = mlflow.MlflowClient(uri)
    run = client.get_run(result["mlflow_run_id"])
    assert run.info.status == "FINISHED" and run.data.tags["dalle.stage"] == "train_clip"
    params = run.data.params
    assert params["train.max_steps"] == "4" and params["model.vision_layers"] == "1"
    assert params["model.text_vocab"] == str(bpe["vocab_size"])  # the model follows the BPE
    history = client.get_metric_history(run.info.run_id, "train/loss")
    assert [m.step for m in history] == [0, 1, 2, 3]
    for name in ("logit_scale", "accuracy", "lr"):
        assert len(client.get_metric_history(run.info.run_id, f"train/{name}")) == 4, name
    assert "bpe/tokenizer.json" in _artifact_paths(client, run.info.run_id)
    assert run.inputs.dataset_inputs[0].dataset.name == "filter/t"

    data_fp = dataset_fingerprint(DatasetLayout(str(root)), "filter", "t")
    lineage = {"dalle.fingerprint.data": data_fp, "dalle.bpe_fingerprint": bpe["bpe_fingerprint"]}
    version = client.get_model_version("clip", "1")
    assert version.run_id == run.info.run_id
    for key, value in lineage.items():
        assert run.data.tags[key] == value and version.tags[key] == value, key

    # the registered model resolves to a checkpoint that loads, with its BPE inside
    mlflow.set_tracking_uri(uri)
    model, tokenizer = load_clip(resolve_checkpoint("models:/clip/1"))
    assert model.config.image_size == 16 and tokenizer.get_vocab_size() == bpe["vocab_size"]

    # the same data and settings, naming the BPE by path this time: skipped
    again = train_clip(str(root), dataset="t", bpe=bpe["tokenizer_path"], overrides=MICRO, tracking_uri=uri)
    assert not again["did_work"] and again["model_path"] == result["model_path"]
    assert len(client.search_model_versions("name='clip'")) == 1
    experiment = client.get_experiment_by_name("dalle-lightning")
    assert len(client.search_runs([experiment.experiment_id], "tags.`dalle.stage` = 'train_clip'")) == 1


def _artifact_paths(client, run_id: str, path: str | None = None) -> list[str]:
    found = []
    for item in client.list_artifacts(run_id, path):
        found.extend(_artifact_paths(client, run_id, item.path) if item.is_dir else [item.path])
    return found


def test_cli_train_clip_takes_the_flows_settings():
    from typer.testing import CliRunner

    from flows.cli import app

    result = CliRunner().invoke(app, ["train-clip", "--help"])
    assert result.exit_code == 0
    for option in ("--root", "--dataset", "--bpe", "--preset", "--set", "--tracking-uri"):
        assert option in result.output, option
