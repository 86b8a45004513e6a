"""Safety (issue 7, item 4): servers on loopback, checkpoints loaded as weights only, downloads capped,
no secret in MLflow params, tags, dataset sources or the run logs."""

from __future__ import annotations

import ast
import inspect
import os
import pickle
from pathlib import Path

import psutil
import pytest
import torch

pytestmark = pytest.mark.timeout(120)

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("dalle_lightning", "flows", "data_schemas", "bench")


def _listening(pid: int) -> list[tuple[str, int]]:
    """(address, port) of every TCP socket process ``pid`` listens on."""
    return [
        (c.laddr.ip, c.laddr.port)
        for c in psutil.Process(pid).net_connections(kind="tcp")
        if c.status == psutil.CONN_LISTEN
    ]


# --- servers bind 127.0.0.1 --------------------------------------------------------------------------


def test_image_server_listens_on_loopback_by_default(tmp_path):
    from dalle_lightning.serving.image_server import ImageServer
    from flows.cli import serve_images

    (tmp_path / "a.png").write_bytes(b"")
    with ImageServer(str(tmp_path)) as server:
        port = int(server.base_url.rsplit(":", 1)[1].split("/")[0])
        sockets = [s for s in _listening(os.getpid()) if s[1] == port]
        assert sockets == [("127.0.0.1", port)]
    assert inspect.signature(serve_images).parameters["host"].default == "127.0.0.1"


def test_local_dask_cluster_scheduler_workers_and_http_listen_on_loopback_only():
    from distributed import Client, LocalCluster

    from flows.runners import dask_task_runner

    kwargs = dict(dask_task_runner(n_workers=1).cluster_kwargs)
    assert kwargs["host"] == "127.0.0.1"
    before = set(_listening(os.getpid()))
    with LocalCluster(**kwargs) as cluster, Client(cluster) as client:
        workers = client.scheduler_info()["workers"]
        assert cluster.scheduler_address.startswith("tcp://127.0.0.1:")
        assert workers and all(a.startswith("tcp://127.0.0.1:") for a in workers)
        worker_pids = list(client.run(os.getpid).values())
        opened = set(_listening(os.getpid())) - before  # the scheduler and its HTTP server live here
        for pid in worker_pids:
            opened |= set(_listening(pid))
        assert len(opened) >= 3, opened  # scheduler, its HTTP endpoint, the worker (and its nanny)
        assert {ip for ip, _ in opened} == {"127.0.0.1"}, opened


def test_prefect_api_server_listens_on_loopback(prefect_harness, monkeypatch):
    """The session's API server is the class ``prefect_api`` starts (SubprocessASGIServer)."""
    from urllib.parse import urlparse

    import prefect.server.api.server as prefect_server
    from prefect.settings import PREFECT_API_URL

    import flows.prefect_api

    url = urlparse(PREFECT_API_URL.value())
    assert url.hostname == "127.0.0.1"
    owners = [
        c
        for c in psutil.net_connections(kind="tcp")
        if c.status == psutil.CONN_LISTEN and c.laddr.port == url.port
    ]
    assert owners and {c.laddr.ip for c in owners} == {"127.0.0.1"}
    assert "SubprocessASGIServer()" in inspect.getsource(flows.prefect_api.prefect_api)

    seen: list[list[str]] = []

    class NoProcess(Exception):
        pass

    def capture(args, **kwargs):
        seen.append(list(args))
        raise NoProcess

    monkeypatch.setattr(prefect_server.subprocess, "Popen", capture)
    with pytest.raises(NoProcess):
        prefect_server.SubprocessASGIServer(port=1)._run_uvicorn_command()
    (args,) = seen
    assert args[args.index("--host") + 1] == "127.0.0.1"


# --- checkpoints load as weights only -------------------------------------------------------------


def _calls_to_torch_load(tree: ast.AST) -> list[ast.Call]:
    """Calls of ``torch.load`` / ``torch.serialization.load`` / a ``load`` imported from torch."""
    from_torch = {
        alias.asname or alias.name
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("torch")
        for alias in node.names
        if alias.name == "load"
    }
    calls = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        if (
            isinstance(func, ast.Attribute)
            and func.attr == "load"
            and ast.unparse(func.value)
            in {
                "torch",
                "torch.serialization",
            }
        ) or (isinstance(func, ast.Name) and func.id in from_torch):
            calls.append(node)
    return calls


def test_every_torch_load_in_the_code_passes_weights_only_true():
    found = 0
    offenders = []
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            tree = ast.parse(path.read_text(), filename=str(path))
            for call in _calls_to_torch_load(tree):
                found += 1
                flag = next((k.value for k in call.keywords if k.arg == "weights_only"), None)
                if not (isinstance(flag, ast.Constant) and flag.value is True):
                    offenders.append(f"{path.relative_to(REPO)}:{call.lineno}: {ast.unparse(call)}")
            source = path.read_text()
            assert "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD" not in source, path
            assert "add_safe_globals" not in source, path
    assert found >= 5  # the loaders of the dVAE, the transformer, CLIP and their version digests
    assert not offenders, offenders


def test_the_checker_finds_an_unsafe_call():
    tree = ast.parse("import torch\nfrom torch import load as L\ntorch.load(p)\nL(p, weights_only=False)\n")
    assert len(_calls_to_torch_load(tree)) == 2


class _Payload:
    """Unpickling it runs code: it creates the file ``marker``."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.fixture
def pickle_bomb(tmp_path) -> tuple[Path, Path]:
    """A checkpoint-shaped file whose unpickling would create ``marker``; shown to work with weights_only=False."""
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"config": {}, "state_dict": {}, "tokenizer": "", "evil": _Payload(str(marker))}, path)
    torch.load(path, weights_only=False)  # the payload is real: a plain load runs it
    assert marker.exists()
    marker.unlink()
    return path, marker


def test_every_model_loader_refuses_a_pickle_payload(pickle_bomb):
    from dalle_lightning.models.clip import load_clip
    from dalle_lightning.models.dvae import dvae_version, load_dvae
    from dalle_lightning.stages.embed import clip_version
    from dalle_lightning.training.dalle_train import load_dalle

    path, marker = pickle_bomb
    for loader in (load_dvae, dvae_version, load_dalle, load_clip, clip_version):
        with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
            loader(path)
        assert not marker.exists(), loader.__name__


def test_resuming_training_from_a_pickle_payload_is_refused(pickle_bomb, tmp_path):
    """Lightning's ``fit(ckpt_path=…)`` path (the flows' resume) loads weights only as well."""
    import numpy as np

    from dalle_lightning.data.token_stream import InMemoryTokenShards
    from dalle_lightning.stages.bpe import BPEConfig, train_bpe
    from dalle_lightning.training.dalle_train import DalleTrainConfig, train_dalle

    path, marker = pickle_bomb
    captions = [f"a {c} circle" for c in ("red", "green", "blue", "yellow")] * 2
    config = DalleTrainConfig.from_dict(
        {
            "model": {"text_len": 8, "text_vocab": 300, "image_vocab": 8, "grid_size": 2, "n_layer": 1,
                      "n_head": 2, "n_embd": 16, "conv_kernel": 1},
            "max_steps": 2, "batch_size": 2, "num_workers": 0, "shuffle_buffer": 0, "accelerator": "cpu",
            "devices": 1, "sample_every_n_steps": 100, "warmup_steps": 1,
        }
    )  # fmt: skip
    shards = InMemoryTokenShards(captions, np.zeros((8, 4), dtype=np.int64), rows_per_shard=8)
    tokenizer = train_bpe(captions, BPEConfig(vocab_size=280, min_frequency=1))
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        train_dalle(config, bpe=tokenizer, shards=shards, out_dir=tmp_path / "run", resume_from=path)
    assert not marker.exists()


# --- downloads: http(s) only, pixel cap ------------------------------------------------------------


def test_download_defaults_fetch_only_http_and_cap_pixels():
    from PIL import Image

    from dalle_lightning.stages import download

    assert tuple(download.URL_SCHEMES) == ("http", "https")
    config = download.DownloadConfig()
    assert config.max_image_area <= Image.MAX_IMAGE_PIXELS  # a decompression bomb fails, by default
    assert config.timeout <= 30
    with pytest.raises(ValueError, match="max_image_area"):
        download.DownloadConfig(max_image_area=0)
    assert config.max_bytes <= 64 * 2**20  # a huge body fails, by default
    with pytest.raises(ValueError, match="max_bytes"):
        download.DownloadConfig(max_bytes=0)


# --- no secret in MLflow or in the logs -------------------------------------------------------------

SECRETS = {
    "password": "hunter2-pg-password",
    "aws_secret": "wJalrXUtnFEMIK7MDENGbPxRfiCYEXAMPLEKEY",
    "url_token": "tok-9f8e7d6c5b4a",
    "api_token": "sk-live-abcdef0123456789",
    "signature": "deadbeefcafe0123",
}


def test_redact_masks_the_secret_parts_only():
    from flows.tracking import redact

    cases = {
        f"postgresql://mlflow:{SECRETS['password']}@db.internal:5432/mlflow": "postgresql://***@db.internal:5432/mlflow",
        f"s3://AKIAEXAMPLE:{SECRETS['aws_secret']}@bucket/data": "s3://***@bucket/data",
        f"https://img.example/a.jpg?size=2&token={SECRETS['url_token']}": "https://img.example/a.jpg?size=2&token=***",
        f"https://b.s3.amazonaws.com/k?X-Amz-Signature={SECRETS['signature']}": "https://b.s3.amazonaws.com/k?X-Amz-Signature=***",
        "sqlite:///tmp/mlruns.db": "sqlite:///tmp/mlruns.db",
        "https://img.example/a.jpg?w=64": "https://img.example/a.jpg?w=64",
        "write to user@example.com": "write to user@example.com",
    }  # fmt: skip
    for text, expected in cases.items():
        assert redact(text) == expected


def _everything_logged(client, experiment_id: str) -> list[str]:
    """Every param key and value, tag key and value, dataset name/source/digest of every run."""
    out = []
    for run in client.search_runs([experiment_id]):
        out += [f"{k}={v}" for k, v in run.data.params.items()]
        out += [f"{k}={v}" for k, v in run.data.tags.items()]
        for entry in run.inputs.dataset_inputs:
            out += [entry.dataset.name, entry.dataset.source, entry.dataset.digest]
            out += [f"{t.key}={t.value}" for t in entry.tags]
    return out


def test_no_secret_reaches_mlflow_params_tags_or_datasets(tmp_path):
    from dataclasses import dataclass, field

    import mlflow
    from mlflow.tracking import MlflowClient

    from flows import tracking

    @dataclass
    class Storage:
        root: str = f"s3://AKIAEXAMPLE:{SECRETS['aws_secret']}@bucket/data"
        api_token: str = SECRETS["api_token"]

    @dataclass
    class Settings:
        tracking_uri: str = f"postgresql://mlflow:{SECRETS['password']}@db.internal/mlflow"
        source_url: str = f"https://img.example/list.parquet?token={SECRETS['url_token']}"
        storage: Storage = field(default_factory=Storage)
        image_size: int = 64

    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    tracking.setup(uri, "safety")
    with tracking.stage_run(
        "ingest", nested=False, tags={"dalle.source": f"https://x/y?X-Amz-Signature={SECRETS['signature']}"}
    ):
        mlflow.log_params(tracking.flatten_params("cfg", Settings()))
        tracking.log_params({"root": Settings().storage.root, "storage.api_token": SECRETS["api_token"]})
        tracking.log_dataset(
            f"https://img.example/data?token={SECRETS['url_token']}",
            name="src",
            digest="d" * 16,
            context="input",
        )
    client = MlflowClient(tracking_uri=uri)
    logged = _everything_logged(client, client.get_experiment_by_name("safety").experiment_id)
    text = "\n".join(logged)
    assert "cfg.image_size=64" in text and "cfg.storage.root=s3://***@bucket/data" in text  # logged, masked
    assert "cfg.storage.api_token=***" in text and "token=***" in text
    leaked = [s for s in SECRETS.values() if s in text]
    assert not leaked, leaked


def test_no_secret_reaches_the_prefect_run_logs(prefect_harness, tmp_path):
    """A flow logs the training command it launches, tracking URI included (train_dvae, train_dalle, train_clip)."""
    from prefect import flow, get_run_logger
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    from flows import tracking
    from flows.prefect_api import _flush_logs

    secret_uri = f"postgresql://mlflow:{SECRETS['password']}@db.internal/mlflow"

    @flow(name="safety-logs")
    def launches_training() -> None:
        tracking.setup(f"sqlite:///{tmp_path / 'mlruns.db'}", "safety-logs")
        get_run_logger().info("train_dvae: %s", " ".join(["python", "-m", "x", "--tracking-uri", secret_uri]))
        get_run_logger().info("listing https://img.example/list.parquet?token=%s", SECRETS["url_token"])

    state = launches_training(return_state=True)
    _flush_logs()
    flow_run_id = state.state_details.flow_run_id
    with get_client(sync_client=True) as client:
        logs = client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))
    messages = "\n".join(log.message for log in logs)
    assert "--tracking-uri postgresql://***@db.internal/mlflow" in messages
    assert "list.parquet?token=***" in messages
    assert SECRETS["password"] not in messages and SECRETS["url_token"] not in messages
