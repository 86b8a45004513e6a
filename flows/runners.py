"""Where a flow's tasks run: a Dask ``LocalCluster`` by default, or an existing Dask scheduler.

``DALLE_DASK_ADDRESS`` (or ``--dask-address``) selects an existing scheduler,
e.g. ``tcp://scheduler:8786`` from ``dask scheduler`` / dask-jobqueue /
dask-kubernetes; nothing else in the flows changes.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator

import dask.config
from prefect_dask import DaskTaskRunner  # imports distributed, whose config names the variables

DEFAULT_WORKERS = 2
DASK_SPAWN_VARIABLES = (*dask.config.get("distributed.nanny.pre-spawn-environ", {}), "PYTHONHASHSEED")
"""What a ``LocalCluster``'s nannies write into *this* process's environment when they start their
workers, and leave there: ``distributed.nanny.pre-spawn-environ`` (``OMP_NUM_THREADS=1`` and the
like) and the ``PYTHONHASHSEED`` they add to it."""
_USER_SPAWN_VARIABLES = {name: os.environ.get(name) for name in DASK_SPAWN_VARIABLES}  # before any cluster


def subprocess_environment(**extra: str) -> dict[str, str]:
    """This process's environment for a child such as a training run, without what Dask put in it.

    After a local cluster has started, ``OMP_NUM_THREADS=1`` (and the like) sit in
    ``os.environ``, and a training process started from it would run on one core.
    The values the user had set before are kept.
    """
    env = dict(os.environ)
    for name, value in _USER_SPAWN_VARIABLES.items():
        if value is None:
            env.pop(name, None)
        else:
            env[name] = value
    return {**env, **extra}


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
    return DaskTaskRunner(
        cluster_class="distributed.LocalCluster", cluster_kwargs=_local_cluster_kwargs(n_workers)
    )


def _local_cluster_kwargs(n_workers: int | None) -> dict:
    """A loopback ``LocalCluster`` of ``n_workers`` (default ``$DALLE_DASK_WORKERS`` or 2) single-threaded processes."""
    workers = n_workers or int(os.environ.get("DALLE_DASK_WORKERS", DEFAULT_WORKERS))
    if workers < 1:
        raise ValueError(f"n_workers must be >= 1, got {workers}")
    return {
        "n_workers": workers,
        "threads_per_worker": 1,
        "processes": True,
        "dashboard_address": None,
        "host": "127.0.0.1",
        "silence_logs": logging.WARNING,
    }


@contextlib.contextmanager
def dask_cluster_address(address: str | None = None, n_workers: int | None = None) -> Iterator[str]:
    """The scheduler ``address`` (or ``$DALLE_DASK_ADDRESS``), else that of a ``LocalCluster`` kept for the block.

    A flow of several Dask stages (``pipeline``) starts its cluster once and
    gives each stage a ``DaskTaskRunner(address=…)`` on it.
    """
    quiet_dask_logs()
    address = address or os.environ.get("DALLE_DASK_ADDRESS") or None
    if address:
        yield address
        return
    from distributed import LocalCluster

    with LocalCluster(**_local_cluster_kwargs(n_workers)) as cluster:
        yield cluster.scheduler_address


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
    # "Shuffle … initialized / deactivated" on every dedup step: bookkeeping, not a warning to the user
    logging.getLogger("distributed.shuffle._scheduler_plugin").setLevel(logging.ERROR)
