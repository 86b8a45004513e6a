"""The ``evaluate`` flow: metrics and grids in an MLflow run tied to the model's training run; ``dalle compare``."""

from __future__ import annotations

import pytest
import torch
from typer.testing import CliRunner

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

EXPERIMENT = "evaluate-test"


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models: one thread is as fast, and does not stall when other work holds the other cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _register(paths: dict[str, str], uri: str) -> str:
    """Log and register ``dvae`` and ``dalle`` (with the BPE artifact and lineage tags) as the training flows do."""
    import mlflow

    from dalle_lightning.models.dvae import dvae_version
    from flows import tracking
    from flows.models_registry import log_and_register

    tracking.setup(uri, EXPERIMENT)
    version = dvae_version(paths["dvae"])
    with mlflow.start_run(run_name="train_dvae", tags={"dalle.stage": "train_dvae"}):
        log_and_register(paths["dvae"], name="dvae", tags={"dalle.dvae_version": version})
    tags = {"dalle.stage": "train_dalle", "dalle.dvae_version": version}
    with mlflow.start_run(run_name="train_dalle", tags=tags) as run:
        mlflow.log_artifact(paths["bpe"], artifact_path="bpe")
        log_and_register(paths["dalle"], name="dalle", tags={"dalle.dvae_version": version})
    return run.info.run_id


def test_evaluate_logs_metrics_under_the_training_run_and_compare_lists_it(
    tmp_path, prefect_harness, write_filtered_dataset, tiny_generation_models
):
    import mlflow

    from dalle_lightning.evaluation.eval_sets import EvalSetConfig, build_eval_set, shapes_eval_set
    from dalle_lightning.evaluation.evaluate import EvalConfig
    from dalle_lightning.generation.sampling import SamplingConfig
    from dalle_lightning.models.dvae import dvae_version
    from flows.cli import app
    from flows.evaluate import evaluate
    from flows.model_refs import resolve_model

    paths = tiny_generation_models
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    training_run = _register(paths, uri)
    # every form of registry reference leads back to the training run
    mlflow.MlflowClient(uri).set_registered_model_alias("dalle", "champion", "1")
    for ref in ("models:/dalle/1", "models:/dalle@champion", "models:/dalle/latest"):
        found = resolve_model(ref)
        assert (found.run_id, found.version, found.tags["dalle.dvae_version"]) == (
            training_run,
            "1",
            dvae_version(paths["dvae"]),
        ), ref
    captions = EvalSetConfig(count=6, seed=5)
    config = EvalConfig(n_max=4, accuracy_ns=(1, 4), sampling=SamplingConfig(batch_size=12, seed=0))

    # the registered DALL-E: BPE from its run's artifact, dVAE from the registry by its lineage tag
    result = evaluate(
        dalle="models:/dalle/1",
        clip=paths["clip"],
        captions=captions,
        config=config,
        out_dir=str(tmp_path / "out"),
        tracking_uri=uri,
        experiment=EXPERIMENT,
    )
    client = mlflow.MlflowClient(uri)
    run = client.get_run(result["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    tags = run.data.tags
    expected_set = shapes_eval_set(captions, image_size=32).fingerprint
    assert tags["dalle.evaluated_run_id"] == training_run == result["evaluated_run_id"]
    assert tags["dalle.eval_set_fingerprint"] == expected_set == result["eval_set_fingerprint"]
    assert tags["mlflow.parentRunId"] == training_run  # nested under the model's training run
    assert tags["dalle.evaluated_model_version"] == "1" and tags["dalle.stage"] == "evaluate"
    metrics = run.data.metrics
    for name in (
        "clip_score_n1",
        "clip_score_n2",
        "clip_score_n4",
        "fid",
        "fid_n1",
        "fid_dvae",
        "shapes_accuracy_seen_n1",
        "shapes_accuracy_heldout_n4",
        "dvae_ceiling_seen",
        "dvae_ceiling_heldout",
    ):
        assert name in metrics, name
    assert [m.step for m in client.get_metric_history(run.info.run_id, "clip_score")] == [1, 2, 4]
    assert run.data.params["eval.n_max"] == "4" and run.data.params["model.dalle"] == "models:/dalle/1"
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "evaluation")}
    assert {
        "evaluation/ranked.png",
        "evaluation/real_and_dvae.png",
        "evaluation/per_caption.json",
    } <= artifacts
    assert (tmp_path / "out" / "ranked.png").is_file()

    # by path, on a fixed sample of a filter dataset: no run to tie to, the BPE and dVAE given
    root = tmp_path / "root"
    write_filtered_dataset(root, "t", shards=2, per_shard=4)
    runner = CliRunner()
    command = [
        "evaluate",
        *("--dalle", paths["dalle"], "--clip", paths["clip"], "--dvae", paths["dvae"], "--bpe", paths["bpe"]),
        *("--captions", "filter", "--root", str(root), "--dataset", "t", "--count", "5", "--n-max", "4"),
        *("--set", "sampling.batch_size=12", "--set", "eval.accuracy_ns=[1,4]"),
        *("--tracking-uri", uri, "--experiment", EXPERIMENT),
    ]
    cli = runner.invoke(app, command)
    assert cli.exit_code == 0, cli.output
    assert "clip_score_n4" in cli.output and "fid_dvae" in cli.output
    by_path = {"mlflow_run_id": cli.output.split("MLflow run ")[1].split(";")[0]}
    other = client.get_run(by_path["mlflow_run_id"])
    assert "dalle.evaluated_run_id" not in other.data.tags and "mlflow.parentRunId" not in other.data.tags
    assert "fid" in other.data.metrics and "shapes_accuracy_all_n1" not in other.data.metrics
    sample = build_eval_set(EvalSetConfig(source="filter", count=5, dataset="t"), 32, str(root))
    assert other.data.tags["dalle.eval_set_fingerprint"] == sample.fingerprint and len(set(sample.keys)) == 5

    listed = runner.invoke(
        app,
        [
            "compare",
            "--experiment",
            EXPERIMENT,
            "--metric",
            "clip_score_n4",
            "--column",
            "fid",
            "--tracking-uri",
            uri,
        ],
    )
    assert listed.exit_code == 0, listed.output
    assert result["mlflow_run_id"][:12] in listed.output and by_path["mlflow_run_id"][:12] in listed.output
    assert training_run[:12] in listed.output  # the evaluated run column
    assert f"{client.get_run(result['mlflow_run_id']).data.metrics['fid']:.4f}" in listed.output
    nothing = runner.invoke(
        app, ["compare", "--experiment", EXPERIMENT, "--metric", "nope", "--tracking-uri", uri]
    )
    assert nothing.exit_code == 0 and "no run" in nothing.output
    missing = runner.invoke(
        app, ["compare", "--experiment", "absent", "--metric", "fid", "--tracking-uri", uri]
    )
    assert missing.exit_code != 0


def test_compare_sorts_lower_is_better_metrics_ascending():
    import uuid

    import mlflow

    from flows import tracking
    from flows.evaluate import compare_runs

    uri = tracking.resolve_tracking_uri()  # the test session's store: already set up by earlier tests
    experiment = f"sorting-{uuid.uuid4().hex[:8]}"
    tracking.setup(uri, experiment)
    for name, fid, score in (("a", 30.0, 0.2), ("b", 10.0, 0.1), ("c", 20.0, 0.3)):
        with mlflow.start_run(run_name=name):
            mlflow.log_metrics({"fid": fid, "clip_score_n1": score})
    with mlflow.start_run(run_name="no-metric"):
        pass
    assert [r["run_name"] for r in compare_runs(experiment, "fid", tracking_uri=uri)] == ["b", "c", "a"]
    assert [r["run_name"] for r in compare_runs(experiment, "clip_score_n1", tracking_uri=uri)] == [
        "c",
        "a",
        "b",
    ]
    top = compare_runs(experiment, "fid", top=1, ascending=False, tracking_uri=uri)
    assert [r["run_name"] for r in top] == ["a"]
