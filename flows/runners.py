"""Where a flow's tasks run: a Dask ``LocalCluster`` by default, or an existing Dask scheduler.

``DALLE_DASK_ADDRESS`` (or ``--dask-address``) selects an existing scheduler,
e.g. ``tcp://scheduler:8786`` from ``dask scheduler`` / dask-jobqueue /
dask-kubernetes; nothing else in the flows changes.
"""

from __future__ import annotations

import logging
import os

from prefect_dask import DaskTaskRunner

DEFAULT_WORKERS = 2


def dask_task_runner(address: str | None = None, n_workers: int | None = None) -> DaskTaskRunner:
    """A ``DaskTaskRunner`` on ``address`` (or ``$DALLE_DASK_ADDRESS``), else on a new local cluster.

    The local cluster runs ``n_workers`` single-threaded worker processes
    (default ``$DALLE_DASK_WORKERS`` or 2); img2dataset's downloader runs its
    own threads inside each task, so no worker needs child processes.
    """
    quiet_dask_logs()
    address = address or os.environ.get("DALLE_DASK_ADDRESS") or None
    if address:
        return DaskTaskRunner(address=address)
    workers = n_workers or int(os.environ.get("DALLE_DASK_WORKERS", DEFAULT_WORKERS))
    if workers < 1:
        raise ValueError(f"n_workers must be >= 1, got {workers}")
    return DaskTaskRunner(
        cluster_class="distributed.LocalCluster",
        cluster_kwargs={
            "n_workers": workers,
            "threads_per_worker": 1,
            "processes": True,
            "dashboard_address": None,
            "host": "127.0.0.1",
            "silence_logs": logging.WARNING,
        },
    )


def quiet_dask_logs() -> None:
    """Keep the terminal for progress: Dask's INFO chatter about workers and comms goes to WARNING."""
    import logging

    for name in (
        "distributed",
        "distributed.scheduler",
        "distributed.nanny",
        "distributed.core",
        "distributed.worker",
    ):
        logging.getLogger(name).setLevel(logging.WARNING)
