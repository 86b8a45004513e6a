"""The ``train_dvae`` flow: trains in its own process, logs curves and grids, registers ``dvae`` with lineage."""

from __future__ import annotations

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.timeout(400)]

# a model that trains in seconds: 16 px images, 8×8 codes out of 16
MICRO = {
    "model": {
        "image_size": 16,
        "n_hid": 8,
        "n_blk_per_group": 1,
        "group_count": 2,
        "vocab_size": 16,
        "n_init": 8,
        "temperature_steps": 6,
        "kl_weight_steps": 4,
    },
    "train": {
        "max_steps": 6,
        "decoder_finetune_steps": 2,
        "batch_size": 4,
        "lr_steps": 6,
        "log_every_n_steps": 1,
        "recon_every_n_steps": 3,
        "recon_images": 2,
        "checkpoint_every_n_steps": 3,
    },
}


def test_train_dvae_flow_logs_the_run_and_registers_the_model(
    tmp_path, prefect_harness, write_filtered_dataset
):
    import mlflow

    from dalle_lightning.models.dvae import dvae_version, load_dvae
    from flows.lineage import dataset_fingerprint
    from flows.models_registry import resolve_checkpoint
    from flows.train_dvae import train_dvae

    root = tmp_path / "root"
    write_filtered_dataset(root, "t", shards=2, per_shard=6)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    result = train_dvae(str(root), dataset="t", preset="tiny", overrides=MICRO, tracking_uri=uri)
    assert result["did_work"] and str(result["registered_version"]) == "1"

    client = mlflow.MlflowClient(uri)
    run = client.get_run(result["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.params["model.vocab_size"] == "16" and run.data.params["train.max_steps"] == "6"
    losses = client.get_metric_history(run.info.run_id, "train/loss")
    assert len(losses) >= 5 and sorted(m.step for m in losses) == [m.step for m in losses]
    for name in ("recon_loss", "kl", "temperature", "kl_weight", "psnr", "codebook_usage", "perplexity"):
        assert client.get_metric_history(run.info.run_id, f"train/{name}"), name
    artifacts = _artifact_paths(client, run.info.run_id)
    assert any(p.endswith(".png") and "reconstructions" in p for p in artifacts), artifacts

    from dalle_lightning.datasets.layout import DatasetLayout

    data_fp = dataset_fingerprint(DatasetLayout(str(root)), "filter", "t")
    assert run.data.tags["dalle.fingerprint.data"] == data_fp
    version = client.get_model_version("dvae", "1")
    assert version.run_id == run.info.run_id
    assert version.tags["dalle.fingerprint.data"] == data_fp
    assert version.tags["dalle.dvae_version"] == result["dvae_version"]

    # the registered model resolves to a checkpoint that loads and is the trained one
    mlflow.set_tracking_uri(uri)
    path = resolve_checkpoint("models:/dvae/1")
    assert dvae_version(path) == result["dvae_version"]
    assert load_dvae(path).config.vocab_size == 16

    again = train_dvae(str(root), dataset="t", preset="tiny", overrides=MICRO, tracking_uri=uri)
    assert not again["did_work"] and again["dvae_version"] == result["dvae_version"]
    assert len(client.search_model_versions("name='dvae'")) == 1


def _artifact_paths(client, run_id: str, path: str | None = None) -> list[str]:
    found = []
    for item in client.list_artifacts(run_id, path):
        found.extend(_artifact_paths(client, run_id, item.path) if item.is_dir else [item.path])
    return found
