"""Run ``dalle ingest`` on a Dask cluster made of Slurm jobs (dask-jobqueue).

The scheduler runs in this process; each Slurm job starts Dask workers that
connect back to it. ``dalle ingest --dask-address`` then sends one download /
filter task per shard to those workers, exactly as it does to a ``LocalCluster``
on a laptop. Needs ``pip install dask-jobqueue`` (not a project dependency) and
the project installed where the jobs run; the dataset root must be visible to
every node (a shared filesystem or ``s3://…``). Set ``PREFECT_API_URL`` to a
Prefect server the nodes can reach: the worker jobs inherit this environment
(Slurm's default ``--export=ALL``) and report their task runs there (without
it, ``dalle`` would start a server on this host's 127.0.0.1, out of the
workers' reach). ``MLFLOW_TRACKING_URI`` likewise.

    python infra/dask_jobqueue_example.py --urls /shared/urls.parquet --root /shared/data --name web \\
        --jobs 4 --queue cpu
"""

from __future__ import annotations

import os
import subprocess
from typing import Annotated

import typer

SCHEDULER_PORT = 8786
"""``dask scheduler``'s default port, as in infra/docker-compose.yml."""
DASHBOARD_ADDRESS = ":8787"


def main(
    urls: Annotated[str, typer.Option(help="URL list file or folder (as for `dalle ingest --urls`).")],
    root: Annotated[str, typer.Option(help="Dataset root every node can reach.")],
    name: Annotated[str, typer.Option(help="Dataset name.")] = "default",
    jobs: Annotated[int, typer.Option(help="Slurm jobs, each running `cores` single-threaded workers.")] = 4,
    cores: Annotated[int, typer.Option(help="Cores per job (= worker processes per job).")] = 8,
    memory: Annotated[str, typer.Option(help="Memory per job.")] = "32GiB",
    walltime: Annotated[str, typer.Option(help="Time limit of each worker job.")] = "04:00:00",
    queue: Annotated[str | None, typer.Option(help="Slurm partition.")] = None,
    account: Annotated[str | None, typer.Option(help="Slurm account.")] = None,
    prologue: Annotated[
        list[str] | None,
        typer.Option(help="Shell lines run before each worker starts, e.g. 'source /opt/venv/bin/activate'."),
    ] = None,
) -> None:
    """Start the workers as Slurm jobs, ingest on them, then release the jobs."""
    if not os.environ.get("PREFECT_API_URL"):
        raise typer.BadParameter("set PREFECT_API_URL to a Prefect server the worker nodes can reach")
    from dask.distributed import Client
    from dask_jobqueue import SLURMCluster

    cluster = SLURMCluster(
        queue=queue,
        account=account,
        cores=cores,
        processes=cores,  # single-threaded workers: img2dataset runs its own threads inside each shard task
        memory=memory,
        walltime=walltime,
        job_script_prologue=list(prologue or []),
        scheduler_options={"port": SCHEDULER_PORT, "dashboard_address": DASHBOARD_ADDRESS},
    )
    try:
        cluster.scale(jobs=jobs)
        with Client(cluster) as client:
            client.wait_for_workers(1, timeout=1800)  # the first job may wait in the queue
        typer.echo(f"Dask scheduler {cluster.scheduler_address}, dashboard {cluster.dashboard_link}")
        command = ["dalle", "ingest", "--urls", urls, "--root", root, "--name", name]
        subprocess.run([*command, "--dask-address", cluster.scheduler_address], check=True)
    finally:
        cluster.close()


if __name__ == "__main__":
    typer.run(main)
