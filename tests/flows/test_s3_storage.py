"""Object storage: the data stages and MLflow artifacts on ``s3://``, served by a local moto server.

A ``moto`` S3 server on 127.0.0.1 stands in for the object store; the AWS
endpoint and fake credentials go through the environment, as a user would set
them for MinIO or S3 (``AWS_ENDPOINT_URL``: s3fs, boto3 and MLflow's
artifact store all read it). The tests run in file order on one
bucket: ingest with the URL list and the dataset root in the bucket, a re-run
that skips, ``dalle verify``, tokenize, then an MLflow experiment whose
artifacts live in the bucket.
"""

from __future__ import annotations

import io
import json
import logging
import os
from pathlib import Path

import pyarrow.parquet as pq
import pytest

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

BUCKET = "dalle-test"
ROOT = f"s3://{BUCKET}/data"
N_IMAGES = 24
SHARD = 12


@pytest.fixture(scope="module")
def s3(prefect_harness):
    """A moto S3 server on loopback, the environment pointing s3fs, boto3 and MLflow at it, one bucket."""
    pytest.importorskip("s3fs")
    moto_server = pytest.importorskip("moto.server")
    import boto3
    import fsspec

    from flows.runners import dask_cluster_address

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per request otherwise
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    env = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": endpoint,
        # no user configuration or metadata service may leak in
        "AWS_CONFIG_FILE": os.devnull,
        "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
        "AWS_EC2_METADATA_DISABLED": "true",
    }
    with pytest.MonkeyPatch.context() as mp:
        for key, value in env.items():
            mp.setenv(key, value)  # Dask workers started later inherit them
        for key in ("AWS_PROFILE", "MLFLOW_S3_ENDPOINT_URL", "FSSPEC_S3"):
            mp.delenv(key, raising=False)
        fsspec.filesystem("s3").clear_instance_cache()
        client = boto3.client("s3", endpoint_url=endpoint)
        client.create_bucket(Bucket=BUCKET)
        try:
            # one Dask cluster for every flow run of the module (its workers inherit the environment)
            with dask_cluster_address(None, n_workers=1) as address:
                yield {"endpoint": endpoint, "client": client, "dask": address}
        finally:
            fsspec.filesystem("s3").clear_instance_cache()
            server.stop()


def _keys(client, prefix: str) -> dict[str, str]:
    """key -> ETag of every object under ``prefix``, listed by boto3 (not through the code under test)."""
    keys: dict[str, str] = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix):
        keys.update({o["Key"]: o["ETag"] for o in page.get("Contents", [])})
    return keys


def _read(client, key: str):
    return pq.read_table(io.BytesIO(client.get_object(Bucket=BUCKET, Key=key)["Body"].read()))


@pytest.fixture(scope="module")
def ingested(s3, tmp_path_factory):
    """Shapes served over loopback, the URL list uploaded to the bucket, ``ingest`` run with an s3 root."""
    from dalle_lightning.serving.image_server import ImageServer, write_url_list
    from dalle_lightning.stages.download import DownloadConfig
    from dalle_lightning.synth.shapes_dataset import ShapesConfig, write_shapes_dataset
    from flows.ingest import run_ingest

    folder = tmp_path_factory.mktemp("served")
    table = write_shapes_dataset(str(folder), ShapesConfig(n=N_IMAGES, size=64, seed=5))
    urls = f"s3://{BUCKET}/lists/urls.parquet"
    tracking_uri = f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlruns.db'}"

    def ingest():
        return run_ingest(
            ROOT,
            dask_address=s3["dask"],
            name="s",
            urls=[urls],
            shard_size=SHARD,
            download=DownloadConfig(timeout=5, thread_count=4),
            tracking_uri=tracking_uri,
        )

    with ImageServer(folder) as server, pytest.MonkeyPatch.context() as mp:
        mp.setenv("DALLE_MLFLOW_ARTIFACTS", f"s3://{BUCKET}/mlflow")  # for the experiment ingest creates
        write_url_list(server, table.column("file").to_pylist(), table.column("caption").to_pylist(), urls)
        first = ingest()
        objects = _keys(s3["client"], "data/")
        again = ingest()
    return {"first": first, "again": again, "objects": objects, "tracking_uri": tracking_uri}


def test_ingest_writes_shards_and_manifests_to_the_bucket(s3, ingested):
    import data_schemas

    summary = ingested["first"]
    assert summary["input"] == N_IMAGES and summary["downloaded"] == N_IMAGES and summary["failed"] == 0
    assert summary["kept"] + summary["rejected"] == N_IMAGES and summary["kept"] >= N_IMAGES - 2
    assert summary["work"]["download"] == {"executed": N_IMAGES // SHARD}

    keys = ingested["objects"]
    assert "lists/urls.parquet" in _keys(s3["client"], "lists/")
    n = N_IMAGES // SHARD
    for stage, folder in (
        ("sources", "data/sources/s/"),
        ("download", "data/download/s/"),
        ("filter", "data/filter/s/"),
    ):
        parts = sorted(k for k in keys if k.startswith(folder) and k.count("/") == 3 and "/part-" in k)
        assert len(parts) == n, (stage, sorted(keys))
        manifests = sorted(k for k in keys if k.startswith(f"data/_manifests/{stage}/s/"))
        assert [m.rsplit("/", 1)[1].removesuffix(".json") for m in manifests] == [
            p.rsplit("part-", 1)[1].removesuffix(".parquet") for p in parts
        ]
        for part in parts:
            table = _read(s3["client"], part)
            name = table.schema.metadata[b"dalle.schema"].decode()
            data_schemas.module_for(name).validate(table, check_metadata=True)
    rows = sum(_read(s3["client"], k).num_rows for k in keys if k.startswith("data/download/s/part-"))
    assert rows == N_IMAGES
    # no temporary object is left behind: every write was one PUT of the finished file
    assert not [k for k in keys if "/.tmp-" in k]
    manifest = json.loads(
        s3["client"]
        .get_object(Bucket=BUCKET, Key=next(k for k in keys if "_manifests/filter/" in k))["Body"]
        .read()
    )
    assert manifest["files"]["output"]["path"].startswith("../../../filter/s/part-")


def test_rerun_skips_and_leaves_the_objects_untouched(s3, ingested):
    for stage, work in ingested["again"]["work"].items():
        assert set(work) == {"cached"}, (stage, work)
    after = _keys(s3["client"], "data/")
    assert after == ingested["objects"]  # same keys, same ETags: nothing rewritten


def test_dalle_verify_passes_on_the_bucket_and_sees_damage(s3, ingested):
    from typer.testing import CliRunner

    from flows.cli import app

    runner = CliRunner()
    ok = runner.invoke(app, ["verify", ROOT, "--json"])
    assert ok.exit_code == 0, ok.output
    report = json.loads(ok.output)
    assert report["checked"] >= 4 * (N_IMAGES // SHARD) and report["rows"] > N_IMAGES

    key = next(k for k in ingested["objects"] if k.startswith("data/download/s/part-"))
    original = s3["client"].get_object(Bucket=BUCKET, Key=key)["Body"].read()
    s3["client"].put_object(Bucket=BUCKET, Key=key, Body=original[:100])
    try:
        bad = runner.invoke(app, ["verify", ROOT, "--json"])
        assert bad.exit_code == 1
        assert {f["kind"] for f in json.loads(bad.output)["findings"]} >= {"truncated"}
    finally:
        s3["client"].put_object(Bucket=BUCKET, Key=key, Body=original)


def test_listings_see_what_other_processes_wrote(s3, ingested):
    """A shard another process puts in the bucket is listed at once, however often the folder was listed."""
    from dalle_lightning.datasets.layout import DatasetLayout
    from dalle_lightning.datasets.parquet_io import list_parts, read_parquet

    layout = DatasetLayout(ROOT)
    before = list_parts(layout.dataset("download", "s"))
    assert len(before) == N_IMAGES // SHARD and all(p.startswith(f"{ROOT}/download/s/part-") for p in before)
    source = before[0].removeprefix(f"s3://{BUCKET}/")
    key = "data/download/s/part-ffffffffffff.parquet"
    s3["client"].copy_object(Bucket=BUCKET, Key=key, CopySource={"Bucket": BUCKET, "Key": source})
    try:
        assert list_parts(layout.dataset("download", "s")) == sorted([*before, f"s3://{BUCKET}/{key}"])
        # and a file rewritten behind this process's back is read as it is now
        s3["client"].put_object(Bucket=BUCKET, Key=key, Body=pq_bytes(read_parquet(before[0]).slice(0, 1)))
        assert read_parquet(f"s3://{BUCKET}/{key}").num_rows == 1
    finally:
        s3["client"].delete_object(Bucket=BUCKET, Key=key)
    assert list_parts(layout.dataset("download", "s")) == before


def pq_bytes(table) -> bytes:
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    return buffer.getvalue()


def test_tokenize_reads_and_writes_the_bucket(s3, ingested, tmp_path):
    import torch

    from dalle_lightning.datasets.verify import verify_tree
    from dalle_lightning.models.dvae import DiscreteVAE, DVAEConfig, dvae_version, save_dvae
    from flows.tokenize_images import run_tokenize

    torch.manual_seed(0)
    model = DiscreteVAE(DVAEConfig(image_size=32, n_hid=8, n_blk_per_group=1, group_count=3, vocab_size=32))
    checkpoint = str(save_dvae(model, tmp_path / "dvae.pt"))
    version = dvae_version(checkpoint)

    def tokenize():
        return run_tokenize(
            ROOT, dask_address=s3["dask"], dataset="s", dvae=checkpoint, tracking_uri=ingested["tracking_uri"]
        )

    summary = tokenize()
    assert summary["rows"] == ingested["first"]["kept"]
    assert summary["work"]["tokenize"] == {"executed": N_IMAGES // SHARD}
    assert summary["path"] == f"{ROOT}/tokens/{version}/s"
    parts = sorted(k for k in _keys(s3["client"], f"data/tokens/{version}/s/") if "/part-" in k)
    assert len(parts) == N_IMAGES // SHARD
    tokens = _read(s3["client"], parts[0])
    assert tokens.column("image_tokens").type.list_size == 64  # 8×8 grid
    assert verify_tree(ROOT).ok

    again = tokenize()
    assert set(again["work"]["tokenize"]) == {"cached"}


def test_mlflow_artifacts_of_the_flow_in_the_bucket(s3, ingested):
    import mlflow
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=ingested["tracking_uri"])
    experiment = client.get_experiment_by_name("dalle-lightning")
    assert experiment.artifact_location == f"s3://{BUCKET}/mlflow"
    parent = client.get_run(ingested["first"]["mlflow_run_id"])
    assert parent.info.artifact_uri == f"s3://{BUCKET}/mlflow/{parent.info.run_id}/artifacts"
    assert "summary.json" in [f.path for f in client.list_artifacts(parent.info.run_id)]
    summary = mlflow.artifacts.load_dict(f"{parent.info.artifact_uri}/summary.json")
    assert summary["kept"] == ingested["first"]["kept"] and summary["work"] == ingested["first"]["work"]
    stored = _keys(s3["client"], f"mlflow/{parent.info.run_id}/")
    assert f"mlflow/{parent.info.run_id}/artifacts/summary.json" in stored
    children = client.search_runs(
        [experiment.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'"
    )
    download = next(r for r in children if r.info.run_name == "download")
    assert "failed_by_error.json" in [f.path for f in client.list_artifacts(download.info.run_id)]
    sources = [json.loads(i.dataset.source)["uri"] for i in download.inputs.dataset_inputs]
    assert sources == [f"{ROOT}/sources/s", f"{ROOT}/download/s"]


def test_mlflow_helpers_with_an_s3_artifact_location(s3, tmp_path, monkeypatch):
    import mlflow
    from mlflow.tracking import MlflowClient

    from flows import tracking

    monkeypatch.setenv(tracking.ARTIFACTS_ENV, f"s3://{BUCKET}/other/")
    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    assert tracking.setup(uri, "s3-artifacts") == uri
    client = MlflowClient(tracking_uri=uri)
    assert client.get_experiment_by_name("s3-artifacts").artifact_location == f"s3://{BUCKET}/other"
    with (
        mlflow.start_run(run_name="parent") as parent,
        tracking.stage_run("download", tags={"dalle.fingerprint.output": "abc"}) as child,
    ):
        tracking.log_params({"root": ROOT})
        mlflow.log_dict({"kept": 7}, "counts/summary.json")

    run = client.get_run(child.info.run_id)
    assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert run.data.params["root"] == ROOT
    local = client.download_artifacts(run.info.run_id, "counts/summary.json", str(tmp_path))
    assert json.loads(Path(local).read_text()) == {"kept": 7}
    assert f"other/{run.info.run_id}/artifacts/counts/summary.json" in _keys(s3["client"], "other/")


# a few optimisation steps per model (as in test_pipeline.py): orchestration and storage, not quality
PIPELINE_MICRO = {
    "shard_size": 20,
    "dvae_overrides": {"train": {"max_steps": 4, "decoder_finetune_steps": 0, "recon_every_n_steps": 2}},
    "dalle_overrides": {
        "model": {"n_embd": 32, "n_head": 2},
        "train": {"max_steps": 3, "warmup_steps": 1, "sample_every_n_steps": 100, "sample_count": 1},
    },
    "clip_overrides": {"train": {"max_steps": 3, "warmup_steps": 1, "batch_size": 16}},
    "bpe_vocab_size": 300,
    "eval_source": "shapes",
    "eval_captions": 4,
    "eval_n_max": 2,
    "eval_overrides": {"grid_captions": 2, "grid_top": 2},
    "promote_metric": "clip_score_n2",
    "experiment": "s3-pipeline",
}


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_pipeline_on_an_s3_root(s3, tmp_path, monkeypatch):
    """Every stage with the root in the bucket (micro settings): the data, BPE and evaluation record in the
    bucket, the models in a local folder; a second run does nothing. The default tests above cover the data
    stages; this one the training stages around them."""
    from dalle_lightning.serving.image_server import ImageServer, url_list_for_folder
    from dalle_lightning.synth.shapes_dataset import ShapesConfig, write_shapes_dataset
    from flows.pipeline import STAGES, run_pipeline

    monkeypatch.setenv("DALLE_MODELS_DIR", str(tmp_path / "models"))
    monkeypatch.setenv("DALLE_MLFLOW_ARTIFACTS", f"s3://{BUCKET}/pipeline-mlflow")
    write_shapes_dataset(str(tmp_path / "served"), ShapesConfig(n=40, size=64, seed=5))
    root = f"s3://{BUCKET}/pipeline"
    params = {**PIPELINE_MICRO, "tracking_uri": f"sqlite:///{tmp_path / 'mlruns.db'}"}
    with ImageServer(str(tmp_path / "served")) as server:
        url_list_for_folder(server, str(tmp_path / "served" / "urls.parquet"))
        urls = [str(tmp_path / "served" / "urls.parquet")]
        first = run_pipeline(root, dask_address=s3["dask"], dataset="t", urls=urls, **params)
        second = run_pipeline(root, dask_address=s3["dask"], dataset="t", urls=urls, **params)
    assert first["did_work"] == dict.fromkeys(STAGES, True)
    assert second["did_work"] == dict.fromkeys(STAGES, False)
    assert first["tokenize"]["rows"] == first["ingest"]["kept"] == 40
    keys = _keys(s3["client"], "pipeline/")
    for folder in ("filter/t/", "tokens/", "bpe/t/", "evaluations/"):
        assert any(k.startswith(f"pipeline/{folder}") for k in keys), folder
    assert first["train_dvae"]["model_path"].startswith(str(tmp_path / "models" / "s3" / BUCKET / "pipeline"))
    assert _keys(s3["client"], "pipeline-mlflow/")  # the runs' artifacts
