"""The tiny pipeline run through a Prefect deployment on real services, checked through each service's client.

Started here on 127.0.0.1, each a subprocess with its own folders: ``prefect
server start``, ``mlflow server`` on PostgreSQL (SQLite when PostgreSQL cannot
run here) with a local artifact folder, ``dask scheduler`` and two ``dask
worker`` processes, and a ``prefect worker`` on a process work pool. The
``pipeline/weekly`` deployment is created from the checked-in ``prefect.yaml``
with ``prefect deploy`` and triggered with ``run_deployment`` with micro
settings; the worker's environment (``DALLE_DASK_ADDRESS``,
``MLFLOW_TRACKING_URI``, ``DALLE_PROJECT_DIR``) is all that points the run at
the services.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

N_IMAGES = 40
SHARD_SIZE = 20
N_SHARDS = N_IMAGES // SHARD_SIZE
REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
POOL = "dalle-process"
EXPERIMENT = "real-services"
STAGE_RUNS = {"ingest-rs", "train_dvae", "tokenize", "train_bpe", "train_dalle", "train_clip", "evaluate"}
# a few optimisation steps per model: this test is about the services, not quality
MICRO = {
    "dataset": "rs",
    "shard_size": SHARD_SIZE,
    "dvae_overrides": {
        "train": {
            "max_steps": 4,
            "decoder_finetune_steps": 0,
            "recon_every_n_steps": 2,
            "log_every_n_steps": 1,
        }
    },
    "dalle_overrides": {
        "model": {"n_embd": 32, "n_head": 2},
        "train": {
            "max_steps": 3,
            "warmup_steps": 1,
            "sample_every_n_steps": 100,
            "sample_count": 1,
            "log_every_n_steps": 1,
        },
    },
    "clip_overrides": {
        "train": {"max_steps": 3, "warmup_steps": 1, "batch_size": 16, "log_every_n_steps": 1}
    },
    "bpe_vocab_size": 300,
    "eval_source": "shapes",
    "eval_captions": 4,
    "eval_n_max": 2,
    "eval_overrides": {"grid_captions": 2, "grid_top": 2},
    "promote_metric": "clip_score_n2",
    "experiment": EXPERIMENT,
}


@pytest.fixture(scope="module")
def stack(services) -> dict:
    """Every service up; their addresses. PostgreSQL and the servers start side by side."""
    started = time.monotonic()
    base, base_env = services.base, services.env
    prefect_port, mlflow_port, dask_port = services.free_port(), services.free_port(), services.free_port()
    prefect_url = f"http://127.0.0.1:{prefect_port}/api"
    services.start(
        "prefect-server",
        [
            str(BIN / "prefect"),
            "server",
            "start",
            "--host",
            "127.0.0.1",
            "--port",
            str(prefect_port),
            "--no-ui",
        ],
        base_env(PREFECT_HOME=str(base / "prefect-server")),
    )
    services.start(
        "dask-scheduler",
        [str(BIN / "dask"), "scheduler", "--host", "127.0.0.1", "--port", str(dask_port), "--no-dashboard"],
        base_env(),
    )
    backend = services.start_postgres()
    if backend is None:  # PostgreSQL binaries or driver missing: the embedded default
        backend = f"sqlite:///{base / 'mlflow.db'}"
    artifacts = base / "mlartifacts"
    services.start(
        "mlflow-server",
        [
            str(BIN / "mlflow"),
            "server",
            "--backend-store-uri",
            backend,
            "--artifacts-destination",
            str(artifacts),
            "--host",
            "127.0.0.1",
            "--port",
            str(mlflow_port),
            "--workers",
            "1",
        ],
        base_env(),
    )
    dask_address = f"tcp://127.0.0.1:{dask_port}"
    tracking_uri = f"http://127.0.0.1:{mlflow_port}"
    client_env = base_env(
        PREFECT_API_URL=prefect_url,
        PREFECT_HOME=str(base / "prefect-client"),
        MLFLOW_TRACKING_URI=tracking_uri,
    )
    services.wait_port("dask-scheduler", dask_port, timeout=60)
    for i in (1, 2):
        services.start(
            f"dask-worker-{i}",
            [
                str(BIN / "dask"),
                "worker",
                dask_address,
                "--host",
                "127.0.0.1",
                "--nthreads",
                "1",
                "--nworkers",
                "1",
                "--name",
                f"worker-{i}",
                "--no-dashboard",
                "--local-directory",
                str(base / f"dask-{i}"),
            ],
            client_env,
        )
    services.wait_http("prefect-server", f"{prefect_url}/health", timeout=120)
    services.wait_http("mlflow-server", f"{tracking_uri}/health", timeout=120)
    print(
        f"\n[real services] servers up after {time.monotonic() - started:.0f}s (MLflow on {backend.split(':')[0]})"
    )
    return {
        "started": started,
        "prefect_url": prefect_url,
        "tracking_uri": tracking_uri,
        "backend": backend,
        "artifacts": artifacts,
        "dask_address": dask_address,
        "client_env": client_env,
    }


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    from dalle_lightning.serving.image_server import ImageServer, url_list_for_folder
    from dalle_lightning.synth.shapes_dataset import ShapesConfig, write_shapes_dataset

    folder = tmp_path_factory.mktemp("served")
    write_shapes_dataset(str(folder), ShapesConfig(n=N_IMAGES, size=64, seed=11))
    with ImageServer(str(folder)) as server:
        urls = folder / "urls.parquet"
        url_list_for_folder(server, str(urls))
        yield {"urls": str(urls), "root": str(tmp_path_factory.mktemp("root"))}


@pytest.fixture(scope="module")
def prefect_client(stack):
    from prefect import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with (
        temporary_settings(updates={PREFECT_API_URL: stack["prefect_url"]}),
        get_client(sync_client=True) as client,
    ):
        yield client


@pytest.fixture(scope="module")
def pipeline_run(services, stack, served, prefect_client) -> dict:
    """``prefect deploy`` of ``pipeline/weekly``, a process worker, one run with micro settings, to its end."""
    from distributed import Client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.deployments import run_deployment

    with Client(stack["dask_address"], timeout=60) as dask:
        dask.wait_for_workers(2, timeout=120)
    prefect_client.create_work_pool(WorkPoolCreate(name=POOL, type="process"))
    # the deployment comes from the checked-in prefect.yaml; the worker starts meanwhile
    services.start(
        "prefect-deploy",
        [str(BIN / "prefect"), "--no-prompt", "deploy", "--name", "pipeline/weekly"],
        stack["client_env"],
        cwd=REPO,
    )
    services.start(
        "prefect-worker",
        [str(BIN / "prefect"), "worker", "start", "--pool", POOL, "--type", "process", "--limit", "1"],
        {
            **stack["client_env"],
            "DALLE_PROJECT_DIR": str(REPO),
            "DALLE_DASK_ADDRESS": stack["dask_address"],
            "PREFECT_WORKER_QUERY_SECONDS": "1",
        },
        cwd=REPO,
    )
    assert services.processes["prefect-deploy"].wait(timeout=180) == 0, services.log("prefect-deploy")
    deployment = prefect_client.read_deployment_by_name("pipeline/weekly")
    assert [(s.schedule.cron, s.active) for s in deployment.schedules] == [("0 3 * * 0", True)]
    assert deployment.pull_steps[0]["prefect.deployments.steps.set_working_directory"]
    # only the run triggered below may touch anything: no scheduled run of the real weekly job
    prefect_client.pause_deployment(deployment.id)
    print(f"[real services] deployed after {time.monotonic() - stack['started']:.0f}s")
    parameters = {**MICRO, "root": served["root"], "urls": [served["urls"]]}
    started = time.monotonic()
    flow_run = run_deployment("pipeline/weekly", parameters=parameters, timeout=0, client=prefect_client)
    deadline = started + 420
    while time.monotonic() < deadline:
        flow_run = prefect_client.read_flow_run(flow_run.id)
        if flow_run.state and flow_run.state.is_final():
            break
        services.check_running("prefect-worker")
        time.sleep(2)
    seconds = time.monotonic() - started
    print(f"[real services] pipeline run ended after {seconds:.0f}s (state {flow_run.state_name})")
    return {"flow_run": flow_run, "seconds": seconds, "logs": services.log("prefect-worker")}


def test_the_deployment_run_completes(pipeline_run, prefect_client):
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterParentFlowRunId,
        TaskRunFilter,
        TaskRunFilterName,
    )

    flow_run = pipeline_run["flow_run"]
    assert flow_run.state.is_completed(), f"{flow_run.state!r}\n{pipeline_run['logs']}"
    deployment = prefect_client.read_deployment(flow_run.deployment_id)
    assert (deployment.name, deployment.work_pool_name) == ("weekly", POOL)
    assert flow_run.parameters["shard_size"] == SHARD_SIZE
    # the shard tasks ran on the Dask workers and reported to this server too
    downloads = prefect_client.read_task_runs(
        task_run_filter=TaskRunFilter(name=TaskRunFilterName(like_="download-")), limit=200
    )
    assert len(downloads) == N_SHARDS
    assert all(t.state.is_completed() for t in downloads)
    children = prefect_client.read_flow_runs(
        flow_run_filter=FlowRunFilter(parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[flow_run.id]))
    )
    assert children and all(run.state.is_completed() for run in children)


def test_the_dask_scheduler_ran_the_shard_tasks(pipeline_run, stack):
    from distributed import Client

    def counts(dask_scheduler) -> dict:
        return {name: dict(prefix.state_counts) for name, prefix in dask_scheduler.task_prefixes.items()}

    def executed(dask_worker) -> int:
        return dask_worker.state.executed_count

    with Client(stack["dask_address"], timeout=60) as dask:
        by_prefix = dask.run_on_scheduler(counts)
        per_worker = dask.run(executed)
    for task in ("download_task", "score_task", "apply_task", "tokenize_task"):
        assert by_prefix.get(task, {}).get("memory", 0) == N_SHARDS, (task, by_prefix)
    assert sum(per_worker.values()) >= 4 * N_SHARDS, per_worker


def test_mlflow_holds_the_parent_and_nested_runs(pipeline_run, stack):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=stack["tracking_uri"])
    experiment = client.get_experiment_by_name(EXPERIMENT)
    (parent,) = client.search_runs([experiment.experiment_id], "tags.`dalle.flow` = 'pipeline'")
    assert parent.info.status == "FINISHED"
    assert parent.data.metrics["ingest.kept"] == N_IMAGES
    assert parent.data.metrics["stages_with_work"] == len(STAGE_RUNS)
    children = client.search_runs(
        [experiment.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'"
    )
    by_name = {run.info.run_name: run for run in children}
    assert set(by_name) == STAGE_RUNS
    assert all(run.info.status == "FINISHED" for run in children)
    for stage in ("train_dvae", "train_dalle", "train_clip"):
        assert "train/loss" in by_name[stage].data.metrics, (stage, by_name[stage].data.metrics)
    assert any(k.startswith("clip_score_n") for k in by_name["evaluate"].data.metrics)
    assert "pipeline_summary.json" in {a.path for a in client.list_artifacts(parent.info.run_id)}
    evaluation = {a.path for a in client.list_artifacts(by_name["evaluate"].info.run_id, "evaluation")}
    assert "evaluation/ranked.png" in evaluation
    # the server proxied the artifacts into its local folder
    assert list(Path(stack["artifacts"]).rglob("pipeline_summary.json"))
    if stack["backend"].startswith("postgresql+psycopg2://"):
        import psycopg2

        dsn = stack["backend"].replace("+psycopg2", "")
        with psycopg2.connect(dsn) as connection, connection.cursor() as cursor:
            cursor.execute(
                "SELECT count(*) FROM runs WHERE experiment_id = %s", (int(experiment.experiment_id),)
            )
            assert cursor.fetchone()[0] >= 1 + len(STAGE_RUNS)
    else:
        pytest.skip("MLflow ran on SQLite: PostgreSQL could not be started here")


def test_a_dalle_command_reports_to_the_server(pipeline_run, stack, served, prefect_client):
    """``PREFECT_API_URL`` set: the command starts no local API and its flow run appears on the server."""
    result = subprocess.run(
        [
            str(BIN / "dalle"),
            "train-bpe",
            "--root",
            served["root"],
            "--dataset",
            "rs",
            "--set",
            "bpe.vocab_size=300",
        ],
        env=stack["client_env"],
        capture_output=True,
        text=True,
        timeout=180,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    assert "Starting temporary server" not in output
    # runs that ran and are nobody's subflow (the weekly schedule also left future runs, not started)
    top_level = [
        r for r in prefect_client.read_flow_runs(limit=200) if r.start_time and not r.parent_task_run_id
    ]
    names = sorted(prefect_client.read_flow(r.flow_id).name for r in top_level)
    assert names == ["pipeline", "train_bpe"], names
