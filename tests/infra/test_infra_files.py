"""infra/ agrees with the code: compose services, ports and commands, the Dockerfile, the Slurm template, dask-jobqueue.

Nothing here starts a container (there is no Docker on the test machine):
each file is parsed and every command in it is parsed by the real command
line it names (Prefect's, MLflow's, Dask's, the project's), so a renamed
flag, a changed default port or a drifted pin fails here.
"""

from __future__ import annotations

import ast
import importlib.util
import re
import shlex
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

pytestmark = pytest.mark.timeout(120)

REPO = Path(__file__).resolve().parents[2]
INFRA = REPO / "infra"
COMPOSE = INFRA / "docker-compose.yml"
DOCKERFILE = INFRA / "Dockerfile"
SBATCH = INFRA / "slurm" / "train_dalle.sbatch"
JOBQUEUE = INFRA / "dask_jobqueue_example.py"
PROJECT_SERVICES = ("prefect-server", "prefect-worker", "mlflow", "dask-scheduler", "dask-worker", "dalle")


# ---------------------------------------------------------------- helpers


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


@pytest.fixture(scope="module")
def services(compose) -> dict[str, Any]:
    return compose["services"]


def _words(value: str | list[str] | None) -> list[str]:
    if value is None:
        return []
    return shlex.split(value) if isinstance(value, str) else [str(v) for v in value]


def argv(service: dict[str, Any]) -> list[str]:
    """The command a service runs: its entrypoint followed by its command."""
    return _words(service.get("entrypoint")) + _words(service.get("command"))


def published(service: dict[str, Any]) -> dict[int, tuple[str, int]]:
    """container port -> (host address, host port) of the ``ports:`` entries."""
    out = {}
    for entry in service.get("ports", []):
        *host, container = str(entry).split(":")
        address = host[0] if len(host) == 2 else "0.0.0.0"
        out[int(container)] = (address, int(host[-1]) if host else int(container))
    return out


def option(args: list[str], name: str) -> str:
    assert name in args, f"{name} not in {args}"
    return args[args.index(name) + 1]


def pins(path: Path) -> dict[str, str]:
    """``name==version`` lines of a constraints file, by lower-case name."""
    out = {}
    for line in path.read_text().splitlines():
        m = re.match(r"^\s*([A-Za-z0-9_.\-]+)(?:\[[^\]]*\])?==([^\s;#]+)", line)
        if m:
            out[m.group(1).lower()] = m.group(2)
    return out


def flows_source() -> str:
    return "\n".join(p.read_text() for p in sorted((REPO / "flows").glob("*.py")))


def env_read_by_flows(name: str) -> bool:
    """The flows read ``name`` from the environment (directly, or through the Prefect/MLflow setting it names)."""
    source = flows_source()
    return bool(re.search(rf"""(environ(\.get)?\(|environ\[|getenv\()\s*["']{name}["']""", source)) or (
        name == "PREFECT_API_URL" and "PREFECT_API_URL" in source and "prefect.settings" in source
    )


def click_params(command: Any, args: list[str]) -> dict[str, Any]:
    """Parse ``args`` with a click command (no callback runs); a bad flag raises ``click.UsageError``."""
    return command.make_context(command.name or "cmd", list(args), resilient_parsing=False).params


# ---------------------------------------------------------------- docker-compose.yml


def test_compose_has_every_service_and_project_services_build_the_project_image(services):
    assert set(services) >= {"postgres", "minio", "minio-buckets", *PROJECT_SERVICES}
    images = {services[name]["image"] for name in PROJECT_SERVICES}
    assert len(images) == 1, f"the project services must share one image, got {images}"
    for name in PROJECT_SERVICES:
        build = services[name]["build"]
        context = (COMPOSE.parent / build["context"]).resolve()
        assert (context / "pyproject.toml").exists(), f"{name}: build context {context} is not the repository"
        assert (context / build["dockerfile"]).resolve() == DOCKERFILE


def test_compose_dependencies_exist_and_wait_for_health(services):
    for name, service in services.items():
        for dependency, spec in (service.get("depends_on") or {}).items():
            assert dependency in services, f"{name} depends on unknown service {dependency}"
            if spec.get("condition") == "service_healthy":
                assert "healthcheck" in services[dependency], f"{name} waits for {dependency}'s health check"
            if spec.get("condition") == "service_completed_successfully":
                assert services[dependency].get("restart") == "no", dependency


def test_compose_publishes_ports_on_loopback_only(services):
    for name, service in services.items():
        for container, (address, _) in published(service).items():
            assert address == "127.0.0.1", f"{name} publishes {container} on {address}"


def test_prefect_server_runs_the_real_cli_on_prefects_default_port_over_postgres(services):
    from prefect.cli.server import server_app
    from prefect.settings import PREFECT_SERVER_API_PORT

    server = services["prefect-server"]
    args = argv(server)
    assert args[:3] == ["prefect", "server", "start"]
    _, bound, _ = server_app.parse_args(args[2:], exit_on_error=False, print_error=False)
    port = PREFECT_SERVER_API_PORT.value()
    assert port == 4200
    assert bound.arguments["host"] == "0.0.0.0" and bound.arguments["port"] == port
    assert published(server)[port][1] == port
    db = server["environment"]["PREFECT_API_DATABASE_CONNECTION_URL"]
    assert db.startswith("postgresql+asyncpg://") and db.endswith(
        f"@postgres:5432/{services['postgres']['environment']['POSTGRES_DB']}"
    )


def test_project_environment_points_at_the_compose_services_with_names_the_code_reads(compose, services):
    env = compose["x-dalle-env"]
    server_port = int(option(argv(services["prefect-server"]), "--port"))
    mlflow_port = int(option(argv(services["mlflow"]), "--port"))
    dask_port = int(option(argv(services["dask-scheduler"]), "--port"))
    assert env["PREFECT_API_URL"] == f"http://prefect-server:{server_port}/api"
    assert env["MLFLOW_TRACKING_URI"] == f"http://mlflow:{mlflow_port}"
    assert env["DALLE_DASK_ADDRESS"] == f"tcp://dask-scheduler:{dask_port}"
    for name in ("PREFECT_API_URL", "MLFLOW_TRACKING_URI", "DALLE_DASK_ADDRESS"):
        assert env_read_by_flows(name), f"nothing in flows/ reads ${name}"
    # every process that runs project code gets these settings
    for name in ("prefect-worker", "dask-worker", "dalle"):
        assert services[name]["environment"].items() >= env.items(), name


def test_prefect_worker_runs_a_process_worker_with_the_real_cli(services):
    from prefect.cli.worker import worker_app

    args = argv(services["prefect-worker"])
    assert args[:3] == ["prefect", "worker", "start"]
    _, bound, _ = worker_app.parse_args(args[2:], exit_on_error=False, print_error=False)
    assert bound.arguments["worker_type"] == "process" and bound.arguments["work_pool_name"]


def test_prefect_worker_polls_the_work_pool_of_prefect_yaml(services):
    prefect_yaml = REPO / "prefect.yaml"
    if not prefect_yaml.exists():
        pytest.skip("no prefect.yaml in the repository yet: nothing names a work pool to compare with")
    pool = option(argv(services["prefect-worker"]), "--pool")
    deployments = yaml.safe_load(prefect_yaml.read_text()).get("deployments") or []
    pools = {(d.get("work_pool") or {}).get("name") for d in deployments} - {None}
    assert pools, "prefect.yaml names no work pool"
    assert pools == {pool}, f"the compose worker polls {pool!r}, prefect.yaml's deployments use {pools}"
    # the environment variables prefect.yaml's steps read ({{ $NAME }}) are set for the worker
    wanted = set(re.findall(r"\{\{\s*\$(\w+)\s*\}\}", prefect_yaml.read_text()))
    missing = wanted - set(services["prefect-worker"].get("environment") or {})
    assert not missing, f"prefect.yaml reads {missing}, which the compose worker does not set"
    # the checkout the runs start in is the image's working directory, where the sources are copied
    project_dir = services["prefect-worker"]["environment"].get("DALLE_PROJECT_DIR")
    copied = {
        p for kind, a in dockerfile_instructions(DOCKERFILE.read_text()) if kind == "COPY" for p in a.split()
    }
    assert "prefect.yaml" in copied, "the image must hold prefect.yaml for `prefect deploy` / `dalle serve`"
    if project_dir is not None:
        workdirs = [a for kind, a in dockerfile_instructions(DOCKERFILE.read_text()) if kind == "WORKDIR"]
        assert workdirs == [project_dir]


def test_mlflow_server_on_postgres_and_minio_with_the_real_cli_and_documented_port(services):
    from mlflow.cli import cli

    mlflow = services["mlflow"]
    args = argv(mlflow)
    assert args[:2] == ["mlflow", "server"]
    params = click_params(cli.commands["server"], args[2:])
    demo_ports = set(re.findall(r"mlflow ui [^\n]*--port (\d+)", (REPO / "flows" / "demo.py").read_text()))
    assert demo_ports == {str(params["port"])}, f"flows/demo.py documents MLflow on {demo_ports}"
    assert str(params["port"]) in (INFRA / "README.md").read_text()
    assert published(mlflow)[params["port"]][1] == params["port"]
    # the backend store is the database the init script creates, on the postgres service
    sql = (COMPOSE.parent / "postgres" / "10-create-mlflow-db.sql").read_text()
    (db_name,) = re.findall(r"CREATE DATABASE (\w+)", sql)
    # SQLAlchemy 2.1 reads a bare postgresql:// as psycopg 3; the image installs psycopg2
    assert params["backend_store_uri"].startswith("postgresql+psycopg2://")
    assert params["backend_store_uri"].endswith(f"@postgres:5432/{db_name}")
    mounts = services["postgres"]["volumes"]
    assert any(
        m.startswith("./postgres/10-create-mlflow-db.sql:/docker-entrypoint-initdb.d/") for m in mounts
    )
    # artifacts in a bucket that the one-shot service creates, on the minio service
    bucket = re.match(r"s3://([^/]+)", params["artifacts_destination"]).group(1)
    assert f"local/{bucket}" in " ".join(argv(services["minio-buckets"]))
    minio_port = int(option(argv(services["minio"]), "--address").lstrip(":"))
    assert mlflow["environment"]["MLFLOW_S3_ENDPOINT_URL"] == f"http://minio:{minio_port}"


def test_dask_scheduler_and_workers_use_the_real_cli_and_dasks_default_ports(services):
    from distributed import Scheduler
    from distributed.cli import dask_scheduler, dask_worker

    scheduler = services["dask-scheduler"]
    args = argv(scheduler)
    assert args[:2] == ["dask", "scheduler"]
    params = click_params(dask_scheduler.main, args[2:])
    assert int(params["port"]) == Scheduler.default_port == 8786
    (default_dashboard,) = [p.default for p in dask_scheduler.main.params if p.name == "dashboard_address"]
    assert params["dashboard_address"] == default_dashboard == ":8787"
    assert set(published(scheduler)) == {8786, 8787}
    worker = argv(services["dask-worker"])
    assert worker[:2] == ["dask", "worker"]
    worker_params = click_params(dask_worker.main, worker[2:])
    assert worker_params["scheduler"] == f"tcp://dask-scheduler:{Scheduler.default_port}"
    assert worker_params["nthreads"] == 1  # as flows/runners.py's local cluster


def test_dalle_cli_service_runs_the_console_script(services):
    import tomllib

    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["dalle"] == "flows.cli:app"
    assert argv(services["dalle"])[0] == "dalle"


# ---------------------------------------------------------------- Dockerfile


def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comment lines dropped, as Docker reads them."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        pending = f"{pending} {line}".strip()
        if pending.endswith("\\"):
            pending = pending[:-1].rstrip()
            continue
        keyword, _, rest = pending.partition(" ")
        out.append((keyword.upper(), rest.strip()))
        pending = ""
    assert not pending, "the Dockerfile ends inside a continuation line"
    return out


def test_dockerfile_pins_torch_and_installs_the_project_as_the_makefile_does():
    import tomllib

    steps = dockerfile_instructions(DOCKERFILE.read_text())
    args = dict(a.split("=", 1) for kind, a in steps if kind == "ARG" and "=" in a)
    runs = [a for kind, a in steps if kind == "RUN"]
    constraint_pins = pins(REPO / "constraints.txt")
    assert args["TORCH_VERSION"] == constraint_pins["torch"]
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert f"torch=={constraint_pins['torch']}" in pyproject["project"]["dependencies"]
    torch_runs = [r for r in runs if '"torch==${TORCH_VERSION}"' in r]
    assert len(torch_runs) == 1 and "--index-url ${TORCH_INDEX_URL}" in torch_runs[0]
    assert args["TORCH_INDEX_URL"].endswith("/whl/cpu")
    (install,) = [r for r in runs if "pip install -c constraints.txt ." in r]
    assert "pip uninstall -y dataclasses" in install
    assert runs.index(torch_runs[0]) < runs.index(install), "torch (CPU) must be installed before the project"
    # extra service packages are pinned, and agree with constraints.txt where it pins them too
    for name, arg in (("psycopg2-binary", "PSYCOPG2_VERSION"), ("s3fs", "S3FS_VERSION")):
        assert re.fullmatch(r"\d+(\.\d+)+", args[arg]), arg
        assert f"${{{arg}}}" in install
        if name in constraint_pins:
            assert constraint_pins[name] == args[arg], name

    # base image: python slim at a version the project supports
    (base,) = [a for kind, a in steps if kind == "FROM"]
    assert base == "python:${PYTHON_VERSION}-slim"
    minimum = re.search(r">=\s*(\d+)\.(\d+)", pyproject["project"]["requires-python"]).groups()
    assert tuple(map(int, args["PYTHON_VERSION"].split("."))) >= tuple(map(int, minimum))
    assert ast.literal_eval(dict(steps)["ENTRYPOINT"]) == ["dalle"]


def test_dockerfile_copies_what_the_package_needs_and_the_ignore_file_keeps_it():
    import tomllib

    steps = dockerfile_instructions(DOCKERFILE.read_text())
    copied = {p.rstrip("/") for kind, a in steps if kind == "COPY" for p in a.split()[:-1]}
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    packages = {p.rstrip("*") for p in pyproject["tool"]["setuptools"]["packages"]["find"]["include"]}
    assert packages and packages <= copied
    assert {"pyproject.toml", "constraints.txt", pyproject["project"]["readme"]} <= copied
    ignored = {
        line.strip() for line in (INFRA / "Dockerfile.dockerignore").read_text().splitlines() if line.strip()
    }
    assert not copied & ignored, f"copied but ignored: {copied & ignored}"
    assert {".venv", ".git"} <= ignored


# ---------------------------------------------------------------- Slurm


def sbatch_directives(text: str) -> dict[str, str]:
    """``#SBATCH --name=value`` (or ``--name value``) lines before the first command."""
    out = {}
    for line in text.splitlines():
        if not line.startswith("#SBATCH"):
            continue
        flag = line.removeprefix("#SBATCH").split("#")[0].strip()
        name, _, value = flag.replace(" ", "=", 1).partition("=")
        out[name.lstrip("-")] = value
    return out


def shell_commands(text: str) -> list[list[str]]:
    """The script's commands as words (continuations joined; comment and blank lines dropped)."""
    commands, pending = [], ""
    for raw in text.splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        pending = f"{pending} {line}".strip()
        if pending.endswith("\\"):
            pending = pending[:-1]
            continue
        commands.append(shlex.split(pending, comments=True))
        pending = ""
    return commands


def concrete(words: list[str], arrays: dict[str, list[str]]) -> list[str]:
    """Shell words with each ``"${ARRAY[@]}"`` replaced by what the script appends to it and variables by ``1``.

    ``1`` stands for any value: it parses as a string, a path or an integer.
    """
    out = []
    for word in words:
        m = re.fullmatch(r"\$\{(\w+)\[@\]\}", word)
        if m:
            out += [w if w.startswith("--") else "1" for w in arrays.get(m.group(1), [])]
        else:
            out.append("1" if "$" in word else word)
    return out


def appended_arrays(text: str) -> dict[str, list[str]]:
    """``NAME+=(words…)`` in the script, gathered per array."""
    arrays: dict[str, list[str]] = {}
    for name, body in re.findall(r"(\w+)\+=\(([^)]*)\)", text):
        arrays.setdefault(name, []).extend(shlex.split(body))
    return arrays


def flow_training_flags() -> set[str]:
    """The flags the ``train_dalle`` flow passes to its training process (read from its source).

    The command list that names the module, and the lists the flow adds to it with ``command += [...]``.
    """
    tree = ast.parse((REPO / "flows" / "train_dalle.py").read_text())

    def flags(node: ast.List) -> list[str]:
        return [e.value for e in node.elts if isinstance(e, ast.Constant) and isinstance(e.value, str)]

    found: set[str] = set()
    for node in ast.walk(tree):
        is_command = isinstance(node, ast.Assign) and isinstance(node.value, ast.List)
        if is_command and "dalle_lightning.training.dalle_train" in flags(node.value):
            found |= {f for f in flags(node.value) if f.startswith("--")}
        if isinstance(node, ast.AugAssign) and isinstance(node.value, ast.List):
            found |= {f for f in flags(node.value) if f.startswith("--")}
    assert "--config-json" in found, "the flow's training command was not found in flows/train_dalle.py"
    return found


def _dalle_job_app() -> Any:
    spec = importlib.util.spec_from_file_location("dalle_slurm_job", INFRA / "slurm" / "dalle_job.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_sbatch_runs_one_task_per_gpu():
    directives = sbatch_directives(SBATCH.read_text())
    assert directives["ntasks-per-node"] == directives["gpus-per-node"]
    assert int(directives["nodes"]) >= 2  # the template is for several nodes
    assert SBATCH.read_text().startswith("#!/bin/bash\n")


def test_sbatch_launches_the_flows_training_module_with_flags_its_parser_accepts():
    import typer

    text = SBATCH.read_text()
    commands = shell_commands(text)
    (srun,) = [c for c in commands if c and c[0] == "srun"]
    module = option(srun, "-m")
    assert module == "dalle_lightning.training.dalle_train"
    assert importlib.util.find_spec(module) is not None
    args = concrete(srun[srun.index("-m") + 2 :], appended_arrays(text))
    training = importlib.import_module(module)
    app = typer.Typer()
    app.command()(training.main)
    params = click_params(typer.main.get_command(app), args)
    assert params["config_json"] is not None and params["run_id"] == "1"
    # exactly the flags the train_dalle flow passes (required and optional)
    assert {a for a in args if a.startswith("--")} == flow_training_flags()


def test_sbatch_job_steps_parse_and_export_the_settings_the_code_reads():
    import typer

    text = SBATCH.read_text()
    job = _dalle_job_app()
    command = typer.main.get_command(job.app)
    arrays = appended_arrays(text)
    steps = [c for c in shell_commands(text) if len(c) > 1 and c[1].endswith("/slurm/dalle_job.py")]
    assert [c[2] for c in steps] == ["prepare", "register"]
    for step in steps:
        sub = command.commands[step[2]]
        click_params(sub, concrete(step[3:], arrays))
    exported = set(re.findall(r"\bexport (\w+)", text))
    assert {"MLFLOW_TRACKING_URI", "PREFECT_API_URL"} <= exported
    for name in ("MLFLOW_TRACKING_URI", "PREFECT_API_URL"):
        assert env_read_by_flows(name), name
    # every DALLE_* variable the script reads after `source "$JOB_ENV"` is one prepare writes
    written = set(re.findall(r"^(DALLE_\w+)=", job.shell_assignments(_example_job()), flags=re.M))
    sourced = text.split('source "$JOB_ENV"', 1)[1]
    read = set(re.findall(r"\$\{?(DALLE_\w+)", sourced))
    assert read <= written, f"read but never written by prepare: {read - written}"


def _example_job() -> dict[str, Any]:
    fields = ("config_json", "tokens_root", "dvae_version", "dvae_path", "dataset", "bpe_path", "out_dir")
    return {
        "done": False,
        **{f: f"/x/{f}" for f in fields},
        "tracking_uri": "http://mlflow:5000",
        "run_id": "abc",
        "result_json": "/x/r.json",
        "resume_from": None,
    }


def test_job_env_is_shell_quoted():
    job = _dalle_job_app()
    lines = job.shell_assignments({**_example_job(), "out_dir": "/data/it's here"}).splitlines()
    values = dict(line.split("=", 1) for line in lines)
    assert shlex.split(values["DALLE_OUT_DIR"]) == ["/data/it's here"]
    assert values["DALLE_RESUME_FROM"] in ("''", "") and values["DALLE_DONE"] == "0"


# ---------------------------------------------------------------- dask-jobqueue


def test_dask_jobqueue_example_feeds_the_scheduler_address_to_dalle_ingest():
    from distributed import Scheduler

    from flows import cli

    tree = ast.parse(JOBQUEUE.read_text())
    top_imports = {
        alias.name.split(".")[0]
        for node in tree.body
        if isinstance(node, ast.Import | ast.ImportFrom)
        for alias in node.names
    } | {node.module.split(".")[0] for node in tree.body if isinstance(node, ast.ImportFrom) and node.module}
    assert "dask_jobqueue" not in top_imports, "dask-jobqueue is optional: import it inside main()"
    main = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "main")
    inner = [n for n in ast.walk(main) if isinstance(n, ast.ImportFrom) and n.module == "dask_jobqueue"]
    assert inner and inner[0].names[0].name == "SLURMCluster"
    guard = [
        n
        for n in tree.body
        if isinstance(n, ast.If) and "__name__" in ast.unparse(n.test) and "__main__" in ast.unparse(n.test)
    ]
    assert guard, 'no `if __name__ == "__main__":` guard'
    # scheduler on Dask's default port
    constants = {
        t.id: ast.literal_eval(n.value)
        for n in tree.body
        if isinstance(n, ast.Assign)
        for t in n.targets
        if isinstance(t, ast.Name)
    }
    assert constants["SCHEDULER_PORT"] == Scheduler.default_port
    # the dalle command: `dalle ingest … --dask-address cluster.scheduler_address`, flags the CLI accepts
    source = ast.unparse(main)
    assert "'--dask-address', cluster.scheduler_address" in source
    command_list = next(
        n
        for n in ast.walk(main)
        if isinstance(n, ast.List) and n.elts and getattr(n.elts[0], "value", None) == "dalle"
    )
    words = ["x" if not isinstance(e, ast.Constant) else e.value for e in command_list.elts]
    assert words[1] == "ingest"
    import typer

    ingest = typer.main.get_command(cli.app).commands["ingest"]
    params = click_params(ingest, [*words[2:], "--dask-address", "tcp://scheduler:8786"])
    assert params["dask_address"] == "tcp://scheduler:8786"
    assert "SLURMCluster" in source and "scheduler_options" in source


def test_readme_points_to_infra_and_names_the_services():
    text = (INFRA / "README.md").read_text()
    for needle in (
        "docker-compose.yml",
        "Dockerfile",
        "train_dalle.sbatch",
        "dask_jobqueue_example.py",
        "PREFECT_API_URL",
        "MLFLOW_TRACKING_URI",
        "DALLE_DASK_ADDRESS",
        ":4200",
        ":5000",
        ":8786",
        ":8787",
    ):
        assert needle in text, needle


def test_readme_running_at_scale_names_the_same_pool_ports_and_files(services):
    readme = (REPO / "README.md").read_text()
    assert "## Running at scale" in readme
    section = readme.split("## Running at scale", 1)[1].split("\n## ", 1)[0]
    pool = option(argv(services["prefect-worker"]), "--pool")
    assert f"--pool {pool}" in section and f"`{pool}`" in section
    for port in (
        option(argv(services["prefect-server"]), "--port"),
        option(argv(services["mlflow"]), "--port"),
        option(argv(services["dask-scheduler"]), "--port"),
    ):
        assert f"port {port}" in section, port
    for path in (
        "infra/docker-compose.yml",
        "infra/slurm/train_dalle.sbatch",
        "infra/dask_jobqueue_example.py",
    ):
        assert path in section and (REPO / path).exists(), path
    for name in ("PREFECT_API_URL", "MLFLOW_TRACKING_URI", "DALLE_DASK_ADDRESS"):
        assert name in section, name


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))
