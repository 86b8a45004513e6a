"""``prefect.yaml`` and ``dalle serve``: every deployment resolves, its parameters fit its flow, serve mirrors the file."""

from __future__ import annotations

import datetime
from pathlib import Path

import pytest
import yaml

from flows.serve import DeploymentSpec, build_deployments, read_deployments, schedule_of

pytestmark = pytest.mark.timeout(300)

REPO = Path(__file__).resolve().parents[2]
FLOWS = {
    "ingest",
    "train_dvae",
    "tokenize",
    "train_bpe",
    "train_dalle",
    "train_clip",
    "embed",
    "evaluate",
    "pipeline",
}


@pytest.fixture(scope="module")
def document() -> dict:
    return yaml.safe_load((REPO / "prefect.yaml").read_text())


@pytest.fixture(scope="module")
def specs() -> list[DeploymentSpec]:
    return read_deployments(REPO / "prefect.yaml")


@pytest.fixture(scope="module")
def deployments(specs):
    return build_deployments(specs)


def test_prefect_yaml_entrypoints_resolve_and_parameters_fit_the_flows(document, specs, monkeypatch):
    from prefect.flows import load_flow_from_entrypoint

    monkeypatch.chdir(REPO)  # entrypoints are relative to the project folder, as for `prefect deploy`
    assert document["pull"] == [
        {"prefect.deployments.steps.set_working_directory": {"directory": "{{ $DALLE_PROJECT_DIR }}"}}
    ]
    names = set()
    for entry, spec in zip(document["deployments"], specs, strict=True):
        flow = load_flow_from_entrypoint(spec.entrypoint, use_placeholder_flow=False)
        names.add(flow.name)
        assert spec.entrypoint == f"flows/{Path(spec.entrypoint.split(':')[0]).name}:{flow.fn.__name__}"
        validated = flow.validate_parameters(spec.parameters)  # raises on an unknown name or a bad value
        assert set(validated) >= set(spec.parameters)
        assert entry["work_pool"]["name"] == "dalle-process"
        for schedule in spec.schedules:
            schedule_of(schedule)  # a valid cron in a known time zone
    assert names == FLOWS


def test_a_bad_default_parameter_is_refused(specs):
    ingest = next(s for s in specs if s.entrypoint.endswith(":ingest"))
    bad = DeploymentSpec(ingest.name, ingest.entrypoint, {**ingest.parameters, "shard_sise": 10})
    with pytest.raises(Exception, match="shard_sise"):
        build_deployments([bad])


def test_serve_builds_the_deployments_of_prefect_yaml(specs, deployments):
    by_name = {f"{d.flow_name}/{d.name}": d for d in deployments}
    assert {name.split("/")[0] for name in by_name} == FLOWS
    assert len(by_name) == len(specs)
    for spec, deployment in zip(specs, deployments, strict=True):
        path, function = spec.entrypoint.split(":")
        assert (
            deployment.entrypoint == f"{path.removesuffix('.py').replace('/', '.')}.{function}"
        )  # importable from any working directory
        assert deployment.parameters == spec.parameters
        assert deployment.tags == spec.tags
        crons = [(s.schedule.cron, s.schedule.timezone, s.active) for s in deployment.schedules or []]
        assert crons == [(s["cron"], s["timezone"], s["active"]) for s in spec.schedules]
    assert by_name["ingest/nightly"].schedules[0].schedule.cron == "0 2 * * *"
    assert by_name["pipeline/weekly"].schedules
    assert not by_name["train_dvae/on-demand"].schedules


def test_serve_options_pick_flows_drop_schedules_and_set_root(specs, tmp_path):
    picked = build_deployments(
        specs, flows=["ingest", "evaluate/weekly"], schedules=False, root=str(tmp_path)
    )
    assert sorted(f"{d.flow_name}/{d.name}" for d in picked) == ["evaluate/weekly", "ingest/nightly"]
    assert all(not d.schedules for d in picked)
    by_flow = {d.flow_name: d for d in picked}
    assert by_flow["ingest"].parameters["root"] == str(tmp_path)
    assert by_flow["ingest"].parameters["urls"] == ["data/urls"]
    with pytest.raises(ValueError, match="ingst"):
        build_deployments(specs, flows=["ingst"])


def test_schedule_entries():
    assert schedule_of({"interval": 3600}).interval == datetime.timedelta(hours=1)
    assert schedule_of({"cron": "0 3 * * 0", "timezone": "UTC", "active": False}).active is False
    with pytest.raises(ValueError, match="exactly one"):
        schedule_of({"cron": "0 3 * * 0", "interval": 60})


def test_malformed_prefect_yaml_is_named(tmp_path):
    path = tmp_path / "prefect.yaml"
    path.write_text("deployments:\n  - name: x\n")
    with pytest.raises(ValueError, match=r"deployments\[0\].*entrypoint"):
        read_deployments(path)
    path.write_text(
        "deployments:\n  - {name: x, entrypoint: 'flows/ingest.py:ingest', schedules: [{cronn: x}]}\n"
    )
    with pytest.raises(ValueError, match="cronn"):
        read_deployments(path)


def test_dalle_serve_hands_the_deployments_to_prefect_serve(monkeypatch, tmp_path):
    """The command serves against PREFECT_API_URL (no local API started) with the chosen deployments."""
    import prefect
    from prefect.server.api.server import SubprocessASGIServer
    from typer.testing import CliRunner

    from flows.cli import app

    served = {}

    def fake_serve(*deployments, limit=None, **_):
        from prefect.settings import PREFECT_API_URL

        served.update(deployments=deployments, limit=limit, api=PREFECT_API_URL.value())

    def no_local_server(*_, **__):
        raise AssertionError("a local Prefect API was started although PREFECT_API_URL is set")

    monkeypatch.setattr(prefect, "serve", fake_serve)
    monkeypatch.setattr(SubprocessASGIServer, "start", no_local_server)
    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:9/api")
    result = CliRunner().invoke(
        app, ["serve", "--flow", "ingest", "--no-schedules", "--root", str(tmp_path), "--limit", "2"]
    )
    assert result.exit_code == 0, result.output
    assert served["api"] == "http://127.0.0.1:9/api"
    assert served["limit"] == 2
    (deployment,) = served["deployments"]
    assert (deployment.flow_name, deployment.name, deployment.schedules) == ("ingest", "nightly", [])
    assert deployment.parameters["root"] == str(tmp_path)

    result = CliRunner().invoke(app, ["serve", "--flow", "no-such-flow"])
    assert result.exit_code != 0
    assert "no-such-flow" in result.output
