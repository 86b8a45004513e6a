"""The ``train_dalle`` flow: trains in its own process, logs curves and sample grids, registers ``dalle`` with lineage."""

from __future__ import annotations

import pytest
import torch

pytestmark = [pytest.mark.integration, pytest.mark.timeout(400)]

# a transformer that trains in seconds on the 8×8 codes of a micro dVAE
MICRO = {
    "model": {"text_len": 16, "n_layer": 2, "n_head": 2, "n_embd": 32, "conv_kernel": 3},
    "train": {
        "max_steps": 4,
        "batch_size": 4,
        "warmup_steps": 1,
        "lr_steps": 4,
        "num_workers": 0,
        "shuffle_buffer": 0,
        "accelerator": "cpu",
        "devices": 1,
        "log_every_n_steps": 1,
        "sample_every_n_steps": 2,
        "sample_count": 2,
        "checkpoint_every_n_steps": 2,
    },
}


def _micro_dvae(path) -> str:
    from dalle_lightning.models.dvae import DiscreteVAE, DVAEConfig, save_dvae

    torch.manual_seed(0)
    config = DVAEConfig(image_size=32, n_hid=16, n_blk_per_group=1, group_count=3, vocab_size=64)
    return str(save_dvae(DiscreteVAE(config), path))


def test_train_dalle_flow_logs_the_run_and_registers_the_model_with_lineage(
    tmp_path, prefect_harness, write_filtered_dataset
):
    import mlflow

    from dalle_lightning.datasets.layout import DatasetLayout
    from dalle_lightning.stages.bpe import BPEConfig
    from dalle_lightning.training.dalle_train import load_dalle
    from flows.lineage import dataset_fingerprint
    from flows.models_registry import resolve_checkpoint
    from flows.tokenize_images import tokenize, tokens_stage
    from flows.train_bpe import train_bpe
    from flows.train_dalle import train_dalle

    root = tmp_path / "root"
    write_filtered_dataset(root, "t", shards=2, per_shard=6)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    bpe = train_bpe(str(root), dataset="t", config=BPEConfig(vocab_size=300), tracking_uri=uri)
    dvae_path = _micro_dvae(tmp_path / "dvae.pt")
    tokens = tokenize(str(root), dataset="t", dvae=dvae_path, tracking_uri=uri)  # thread-pool tasks

    result = train_dalle(str(root), dataset="t", dvae=dvae_path, overrides=MICRO, tracking_uri=uri)
    assert result["did_work"] and str(result["registered_version"]) == "1" and result["steps"] == 4
    assert result["dvae_version"] == tokens["dvae_version"] and result["bpe_path"] == bpe["tokenizer_path"]

    client = mlflow.MlflowClient(uri)
    run = client.get_run(result["mlflow_run_id"])
    assert run.info.status == "FINISHED" and run.data.tags["dalle.stage"] == "train_dalle"
    params = run.data.params
    assert params["train.max_steps"] == "4" and params["model.n_layer"] == "2"
    # the model follows the data: the BPE's vocabulary, the dVAE's grid and codebook
    assert (params["model.text_vocab"], params["model.grid_size"], params["model.image_vocab"]) == (
        str(bpe["vocab_size"]),
        "8",
        "64",
    )
    for name in ("loss", "text_loss", "image_loss"):
        history = client.get_metric_history(run.info.run_id, f"train/{name}")
        assert [m.step for m in history] == [0, 1, 2, 3], name
    assert client.get_metric_history(run.info.run_id, "train/tokens_per_sec")
    artifacts = _artifact_paths(client, run.info.run_id)
    assert sum(p.endswith(".png") and "samples" in p for p in artifacts) == 2, artifacts
    assert "samples/captions.txt" in artifacts and "bpe/tokenizer.json" in artifacts
    assert run.inputs.dataset_inputs[0].dataset.name == f"tokens/{result['dvae_version']}/t"

    data_fp = dataset_fingerprint(DatasetLayout(str(root)), tokens_stage(result["dvae_version"]), "t")
    lineage = {
        "dalle.dvae_version": result["dvae_version"],
        "dalle.fingerprint.data": data_fp,
        "dalle.bpe_fingerprint": bpe["bpe_fingerprint"],
    }
    version = client.get_model_version("dalle", "1")
    assert version.run_id == run.info.run_id
    for key, value in lineage.items():
        assert run.data.tags[key] == value and version.tags[key] == value, key

    # the registered model resolves to a checkpoint that loads
    mlflow.set_tracking_uri(uri)
    model = load_dalle(resolve_checkpoint("models:/dalle/1"))
    assert model.config.grid_size == 8 and model.config.text_len == 16

    # the same data and settings, named by dVAE version and BPE path this time: skipped
    again = train_dalle(
        str(root),
        dataset="t",
        dvae_version=result["dvae_version"],
        bpe=bpe["tokenizer_path"],
        overrides=MICRO,
        tracking_uri=uri,
    )
    assert not again["did_work"] and again["model_path"] == result["model_path"]
    assert len(client.search_model_versions("name='dalle'")) == 1
    experiment = client.get_experiment_by_name("dalle-lightning")
    runs = client.search_runs([experiment.experiment_id], "tags.`dalle.stage` = 'train_dalle'")
    assert len(runs) == 1


def _artifact_paths(client, run_id: str, path: str | None = None) -> list[str]:
    found = []
    for item in client.list_artifacts(run_id, path):
        found.extend(_artifact_paths(client, run_id, item.path) if item.is_dir else [item.path])
    return found
