"""``dalle serve``: every deployment of ``prefect.yaml`` served from this process, no work pool or worker needed.

``prefect.yaml`` is the one list of deployments (names, entrypoints, default
parameters, cron schedules): ``prefect deploy --all`` turns it into work-pool
deployments run by ``prefect worker start``, and :func:`build_deployments`
turns the same entries into ``flow.to_deployment(...)`` objects for
``prefect.serve``. Runs started from the UI or by a schedule execute in a
subprocess of the serving process, which re-imports the flow by module path
(``flows.ingest.ingest``), so they work from any working directory.
"""

from __future__ import annotations

import datetime
import importlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

PREFECT_YAML = "prefect.yaml"
_SCHEDULE_KEYS = {"cron", "interval", "rrule", "timezone", "active", "day_or", "anchor_date", "parameters"}


@dataclass(frozen=True)
class DeploymentSpec:
    """One entry of ``prefect.yaml``'s ``deployments:`` list."""

    name: str
    """Deployment name; the full name is ``<flow name>/<name>``."""
    entrypoint: str
    """``flows/<file>.py:<flow function>``, relative to the project folder."""
    parameters: dict[str, Any] = field(default_factory=dict)
    """Default parameters of every run (a run from the UI or ``run_deployment`` may override them)."""
    schedules: list[dict[str, Any]] = field(default_factory=list)
    """``cron`` / ``interval`` (seconds) / ``rrule`` entries with ``timezone`` and ``active``."""
    description: str | None = None
    tags: list[str] = field(default_factory=list)


def find_prefect_yaml(path: str | Path | None = None) -> Path:
    """``path``, else ``./prefect.yaml``, else the one beside the installed ``flows`` package (a checkout)."""
    candidates = (
        [Path(path)]
        if path
        else [Path.cwd() / PREFECT_YAML, Path(__file__).resolve().parents[1] / PREFECT_YAML]
    )
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"no {PREFECT_YAML} found (looked at {', '.join(map(str, candidates))})")


def read_deployments(path: str | Path | None = None) -> list[DeploymentSpec]:
    """The deployments listed in ``prefect.yaml`` (``ValueError`` naming the entry when one is malformed)."""
    source = find_prefect_yaml(path)
    document = yaml.safe_load(source.read_text()) or {}
    entries = document.get("deployments")
    if not isinstance(entries, list) or not entries:
        raise ValueError(f"{source}: expected a non-empty `deployments:` list")
    specs = []
    for i, entry in enumerate(entries):
        where = f"{source}: deployments[{i}]"
        if not isinstance(entry, dict) or not entry.get("name") or not entry.get("entrypoint"):
            raise ValueError(f"{where}: each deployment needs `name` and `entrypoint`, got {entry!r}")
        schedules = entry.get("schedules") or []
        for schedule in schedules:
            unknown = set(schedule) - _SCHEDULE_KEYS
            if unknown:
                raise ValueError(
                    f"{where}: unknown schedule key(s) {sorted(unknown)}; expected {sorted(_SCHEDULE_KEYS)}"
                )
        specs.append(
            DeploymentSpec(
                name=entry["name"],
                entrypoint=entry["entrypoint"],
                parameters=dict(entry.get("parameters") or {}),
                schedules=list(schedules),
                description=entry.get("description"),
                tags=list(entry.get("tags") or []),
            )
        )
    return specs


def load_flow(entrypoint: str) -> Any:
    """The flow object of ``flows/<file>.py:<function>``, imported by module path (``flows.<file>``)."""
    path, sep, attribute = entrypoint.partition(":")
    if not sep or not path.endswith(".py") or not attribute:
        raise ValueError(f"entrypoint must look like 'flows/<file>.py:<flow function>', got {entrypoint!r}")
    module = importlib.import_module(path.removesuffix(".py").replace("/", "."))
    flow = getattr(module, attribute, None)
    if flow is None or not hasattr(flow, "to_deployment"):
        raise ValueError(
            f"entrypoint {entrypoint!r}: {attribute!r} is not a Prefect flow in {module.__name__}"
        )
    return flow


def schedule_of(entry: dict[str, Any]) -> Any:
    """A ``prefect.schedules.Schedule`` from a ``prefect.yaml`` schedule entry (``interval`` in seconds)."""
    from prefect.schedules import Schedule

    kwargs = dict(entry)
    if "interval" in kwargs:
        kwargs["interval"] = datetime.timedelta(seconds=float(kwargs["interval"]))
    if sum(k in kwargs for k in ("cron", "interval", "rrule")) != 1:
        raise ValueError(f"a schedule needs exactly one of cron, interval, rrule; got {entry!r}")
    return Schedule(**kwargs)


def build_deployments(
    specs: Iterable[DeploymentSpec],
    *,
    flows: Iterable[str] | None = None,
    schedules: bool = True,
    root: str | None = None,
) -> list[Any]:
    """``flow.to_deployment(...)`` for each spec, parameters checked against the flow's signature.

    ``flows`` keeps only the named flows (``ingest``) or deployments
    (``ingest/nightly``); ``schedules=False`` drops every schedule (runs are
    then started by hand); ``root`` replaces the ``root`` parameter of every
    flow that has one.
    """
    from prefect.deployments.runner import EntrypointType

    wanted = set(flows or [])
    deployments, seen = [], set()
    for spec in specs:
        flow = load_flow(spec.entrypoint)
        full_name = f"{flow.name}/{spec.name}"
        seen.update({flow.name, full_name})
        if wanted and not wanted & {flow.name, full_name}:
            continue
        parameters = dict(spec.parameters)
        if root is not None and "root" in flow.parameters.properties:
            parameters["root"] = root
        flow.validate_parameters(parameters)  # a bad default fails here, not at 2 a.m.
        deployments.append(
            flow.to_deployment(
                spec.name,
                parameters=parameters,
                schedules=[schedule_of(s) for s in spec.schedules] if schedules else None,
                description=spec.description,
                tags=spec.tags,
                entrypoint_type=EntrypointType.MODULE_PATH,
            )
        )
    unknown = wanted - seen
    if unknown:
        raise ValueError(f"unknown flow or deployment {sorted(unknown)}; prefect.yaml has {sorted(seen)}")
    return deployments


def serve(
    path: str | Path | None = None,
    *,
    flows: Iterable[str] | None = None,
    schedules: bool = True,
    root: str | None = None,
    limit: int | None = None,
) -> None:
    """Serve the deployments of ``prefect.yaml`` until interrupted (against ``PREFECT_API_URL`` when set)."""
    import prefect

    from flows.prefect_api import prefect_api

    deployments = build_deployments(read_deployments(path), flows=flows, schedules=schedules, root=root)
    with prefect_api():
        prefect.serve(*deployments, limit=limit)
