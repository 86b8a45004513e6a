"""The ``pipeline`` flow end to end on a few served shapes images, with micro settings.

Three runs on one root: the first does every stage, the second nothing, the
third (a changed CLIP setting) only CLIP and what depends on it. MLflow is
checked through the client: a parent run with a nested run per stage, and the
``@candidate`` alias on the evaluated transformer.
"""

from __future__ import annotations

import os

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]

N_IMAGES = 40
EXPERIMENT = "pipeline-test"
# a few optimisation steps per model: the test is about orchestration, not quality
MICRO = {
    "shard_size": 20,
    "dvae_overrides": {"train": {"max_steps": 4, "decoder_finetune_steps": 0, "recon_every_n_steps": 2}},
    "dalle_overrides": {
        "model": {"n_embd": 32, "n_head": 2},
        "train": {
            "max_steps": 3,
            "warmup_steps": 1,
            "log_every_n_steps": 1,
            "sample_every_n_steps": 100,
            "sample_count": 1,
        },
    },
    "clip_overrides": {"train": {"max_steps": 3, "warmup_steps": 1, "batch_size": 16}},
    "bpe_vocab_size": 300,
    "eval_source": "shapes",
    "eval_captions": 4,
    "eval_n_max": 2,
    "eval_overrides": {"grid_captions": 2, "grid_top": 2},
    "promote_metric": "clip_score_n2",
    "promote_aliases": ["candidate"],
    "experiment": EXPERIMENT,
}


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    from dalle_lightning.serving.image_server import ImageServer, url_list_for_folder
    from dalle_lightning.synth.shapes_dataset import ShapesConfig, write_shapes_dataset

    folder = tmp_path_factory.mktemp("served")
    write_shapes_dataset(str(folder), ShapesConfig(n=N_IMAGES, size=64, seed=5))
    with ImageServer(str(folder)) as server:
        urls = folder / "urls.parquet"
        url_list_for_folder(server, str(urls))
        yield {"urls": str(urls), "root": str(tmp_path_factory.mktemp("root"))}


@pytest.fixture(scope="module")
def runs(served):
    """The three pipeline runs' summaries, in order."""
    from flows.pipeline import run_pipeline

    def run(**changes):
        params = {**MICRO, **changes}
        return run_pipeline(served["root"], n_workers=2, dataset="t", urls=[served["urls"]], **params)

    first = run()
    second = run()
    clip = {"train": {**MICRO["clip_overrides"]["train"], "max_steps": 4}}
    third = run(clip_overrides=clip)
    return first, second, third


def test_first_run_does_every_stage(runs):
    first = runs[0]
    from flows.pipeline import STAGES

    assert first["did_work"] == dict.fromkeys(STAGES, True)
    assert first["ingest"]["kept"] == N_IMAGES
    assert first["tokenize"]["rows"] == N_IMAGES
    assert os.path.exists(first["evaluate"]["files"]["ranked"])


def test_rerun_with_nothing_changed_does_no_stage_work(runs):
    first, second, _ = runs
    assert not any(second["did_work"].values()), second["did_work"]
    assert all("executed" not in work for work in second["ingest"]["work"].values())
    assert second["train_dalle"]["model_path"] == first["train_dalle"]["model_path"]
    assert second["evaluate"]["metrics"] == first["evaluate"]["metrics"]


def test_changing_clip_reruns_clip_and_evaluate_only(runs):
    first, _, third = runs
    assert {stage for stage, work in third["did_work"].items() if work} == {"train_clip", "evaluate"}
    assert third["train_clip"]["model_path"] != first["train_clip"]["model_path"]
    assert third["train_dalle"]["model_path"] == first["train_dalle"]["model_path"]


def test_mlflow_has_a_parent_run_with_a_nested_run_per_stage(runs):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=os.environ["MLFLOW_TRACKING_URI"])
    parent = client.get_run(runs[0]["mlflow_run_id"])
    assert parent.info.run_name == "pipeline" and parent.info.status == "FINISHED"
    assert parent.data.metrics["ingest.kept"] == N_IMAGES
    assert parent.data.metrics["stages_with_work"] == 7
    experiment = client.get_experiment_by_name(EXPERIMENT)
    children = client.search_runs(
        [experiment.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'"
    )
    names = {r.info.run_name for r in children}
    assert names == {
        "ingest-t",
        "train_dvae",
        "tokenize",
        "train_bpe",
        "train_dalle",
        "train_clip",
        "evaluate",
    }
    by_name = {r.info.run_name: r for r in children}
    assert "train/loss" in by_name["train_dalle"].data.metrics
    assert any(k.startswith("clip_score_n") for k in by_name["evaluate"].data.metrics)
    artifacts = {a.path for a in client.list_artifacts(by_name["evaluate"].info.run_id, "evaluation")}
    assert "evaluation/ranked.png" in artifacts
    assert "pipeline_summary.json" in {a.path for a in client.list_artifacts(parent.info.run_id)}
    second = client.get_run(runs[1]["mlflow_run_id"])
    assert second.data.metrics["stages_with_work"] == 0


def test_evaluate_sets_the_candidate_alias(runs):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=os.environ["MLFLOW_TRACKING_URI"])
    candidate = client.get_model_version_by_alias("dalle", "candidate")
    assert candidate.version == runs[0]["train_dalle"]["registered_version"]
    assert candidate.tags["dalle.eval_set_fingerprint"] == runs[0]["evaluate"]["eval_set_fingerprint"]
    assert runs[0]["evaluate"]["promoted"] == ["candidate"]
