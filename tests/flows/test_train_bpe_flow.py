"""The ``train_bpe`` flow: trains on the filter captions, logs to MLflow, skips a re-run, retrains on change."""

from __future__ import annotations

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]


def test_train_bpe_flow_is_incremental_and_logged(tmp_path, prefect_harness, write_filtered_dataset):
    import mlflow

    from dalle_lightning.datasets.layout import DatasetLayout
    from dalle_lightning.stages.bpe import PAD_ID, BPEConfig, CaptionEncoder, bpe_fingerprint, load_bpe
    from flows.lineage import dataset_fingerprint
    from flows.train_bpe import run_train_bpe

    root = tmp_path / "root"
    write_filtered_dataset(root, "t", shards=2, per_shard=6)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    config = BPEConfig(vocab_size=300, text_len=16)
    result = run_train_bpe(str(root), dataset="t", config=config, tracking_uri=uri)
    assert result["did_work"] and result["stats"]["captions"] == 12
    path = result["tokenizer_path"]
    assert path == f"{root}/bpe/t/{result['run_fingerprint']}/tokenizer.json"
    tokenizer = load_bpe(path)
    assert bpe_fingerprint(tokenizer) == result["bpe_fingerprint"]
    assert tokenizer.get_vocab_size() == result["vocab_size"] <= 300
    ids, length = CaptionEncoder.from_config(tokenizer, config, training=False).encode("a tiny red circle")
    assert 0 < length < 16 and (ids[length:] == PAD_ID).all()

    client = mlflow.MlflowClient(uri)
    run = client.get_run(result["mlflow_run_id"])
    assert run.info.status == "FINISHED" and run.data.tags["dalle.stage"] == "train_bpe"
    data_fp = dataset_fingerprint(DatasetLayout(str(root)), "filter", "t")
    assert run.data.tags["dalle.fingerprint.input"] == data_fp == result["data_fingerprint"]
    assert run.data.tags["dalle.bpe_fingerprint"] == result["bpe_fingerprint"]
    assert run.data.params["bpe.vocab_size"] == "300" and run.data.params["bpe.dropout"] == "0.1"
    assert run.data.metrics["captions"] == 12 and run.data.metrics["vocab_size"] == result["vocab_size"]
    assert [a.path for a in client.list_artifacts(run.info.run_id, "bpe")] == ["bpe/tokenizer.json"]
    artifact = client.download_artifacts(run.info.run_id, "bpe/tokenizer.json", str(tmp_path))
    assert bpe_fingerprint(load_bpe(artifact)) == result["bpe_fingerprint"]
    assert run.inputs.dataset_inputs and run.inputs.dataset_inputs[0].dataset.name == "filter/t"

    # same captions and vocabulary settings (an encoding setting changed): skipped, no new run
    again = run_train_bpe(
        str(root), dataset="t", config=BPEConfig(vocab_size=300, dropout=0.2), tracking_uri=uri
    )
    assert not again["did_work"] and again["tokenizer_path"] == path
    assert again["bpe_fingerprint"] == result["bpe_fingerprint"]
    experiment = client.get_experiment_by_name("dalle-lightning")
    assert len(client.search_runs([experiment.experiment_id])) == 1

    # a damaged tokenizer file is not "done": retrained in place
    (root / "bpe" / "t" / result["run_fingerprint"] / "tokenizer.json").write_text("{}")
    repaired = run_train_bpe(str(root), dataset="t", config=config, tracking_uri=uri)
    assert repaired["did_work"] and repaired["bpe_fingerprint"] == result["bpe_fingerprint"]

    # another vocabulary size: a new folder
    other = run_train_bpe(str(root), dataset="t", config=BPEConfig(vocab_size=280), tracking_uri=uri)
    assert other["did_work"] and other["run_fingerprint"] != result["run_fingerprint"]
    assert len(list((root / "bpe" / "t").iterdir())) == 2

    with pytest.raises(ValueError, match="no filter dataset 'missing'"):
        run_train_bpe(str(root), dataset="missing", config=config, tracking_uri=uri)


def test_cli_train_bpe(tmp_path, prefect_harness, write_filtered_dataset):
    from typer.testing import CliRunner

    from flows.cli import app

    root = tmp_path / "root"
    write_filtered_dataset(root, "c", shards=1, per_shard=4)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    args = [
        "train-bpe",
        "--root",
        str(root),
        "--dataset",
        "c",
        "--tracking-uri",
        uri,
        "--set",
        "bpe.vocab_size=270",
    ]
    first = CliRunner().invoke(app, args)
    assert first.exit_code == 0, first.output
    assert "trained" in first.output and "from 4 captions" in first.output
    second = CliRunner().invoke(app, args)
    assert second.exit_code == 0 and "already trained" in second.output
    bad = CliRunner().invoke(app, [*args[:-2], "--set", "bpe.vocab_sise=270"])
    assert bad.exit_code != 0 and "vocab_sise" in str(bad.exception)
