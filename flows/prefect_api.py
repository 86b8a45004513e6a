"""One Prefect API for a whole command, with no server to start by hand.

Without ``PREFECT_API_URL`` Prefect starts an ephemeral API server in every
process that reports a run — the flow's and each Dask worker's — so task runs
would land in separate databases and each worker would pay the start-up.
:func:`prefect_api` starts one local server (SQLite under ``PREFECT_HOME``)
before the Dask cluster exists and exports its URL, so the flow and every
worker report to the same place. With ``PREFECT_API_URL`` set (a Prefect
server or Cloud) it does nothing.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator


@contextlib.contextmanager
def prefect_api() -> Iterator[str | None]:
    """Ensure every process of this command talks to one Prefect API; yields its URL."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    # the environment wins over a profile, as in Prefect; read it here too, since Prefect
    # reads it only once, at import, and the variable may have been set after that
    configured = os.environ.get("PREFECT_API_URL") or PREFECT_API_URL.value()
    if configured:
        if PREFECT_API_URL.value() == configured:
            yield configured
        else:
            with temporary_settings(updates={PREFECT_API_URL: configured}):
                yield configured
        return
    from prefect.server.api.server import SubprocessASGIServer

    # the local server has no reason to phone home (and no internet to do it with)
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    server = SubprocessASGIServer()
    server.start(timeout=120)
    os.environ["PREFECT_API_URL"] = server.api_url  # inherited by Dask worker processes started later
    try:
        with temporary_settings(updates={PREFECT_API_URL: server.api_url}):
            yield server.api_url
    finally:
        _flush_logs()
        os.environ.pop("PREFECT_API_URL", None)
        server.stop()


def _flush_logs() -> None:
    """Send the run logs Prefect still holds before the server goes away (else it retries at exit)."""
    try:
        from prefect.events.worker import EventsWorker
        from prefect.logging.handlers import APILogWorker

        APILogWorker.drain_all(timeout=10)
        EventsWorker.drain_all(timeout=10)
    except Exception:  # a failed flush loses log lines in the UI, never the run
        pass
