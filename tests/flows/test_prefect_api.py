"""``prefect_api()``: with ``PREFECT_API_URL`` set it starts nothing and runs report to that API."""

from __future__ import annotations

import asyncio
import os

import pytest
from prefect import flow

pytestmark = pytest.mark.timeout(300)


@flow(name="prefect-api-probe")
def _probe() -> str:
    return "ok"


def test_a_url_set_in_the_environment_is_used_and_no_server_is_started(prefect_harness, monkeypatch):
    """The variable may be set after Prefect read its settings (as here); the runs still go to it."""
    from prefect import get_client
    from prefect.server.api.server import SubprocessASGIServer
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.prefect_api import prefect_api

    url = PREFECT_API_URL.value()  # the session's server stands in for a `prefect server start`
    assert url

    def no_local_server(*_, **__):
        raise AssertionError("prefect_api() started a local server although PREFECT_API_URL is set")

    monkeypatch.setattr(SubprocessASGIServer, "start", no_local_server)
    monkeypatch.setenv("PREFECT_API_URL", url)
    with temporary_settings(restore_defaults={PREFECT_API_URL}):  # as if Prefect had found no URL at import
        assert PREFECT_API_URL.value() is None
        with prefect_api() as used:
            assert used == url
            assert PREFECT_API_URL.value() == url
            state = _probe(return_state=True)
        assert PREFECT_API_URL.value() is None  # settings restored
    assert os.environ["PREFECT_API_URL"] == url  # the user's variable is left as it was

    async def find() -> list:
        async with get_client() as client:
            assert str(client.api_url).startswith(url.rstrip("/"))
            return [run.id for run in await client.read_flow_runs()]

    assert state.is_completed()
    assert state.state_details.flow_run_id in asyncio.run(find())


def test_a_configured_url_is_yielded_unchanged(prefect_harness, monkeypatch):
    from prefect.settings import PREFECT_API_URL

    from flows.prefect_api import prefect_api

    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    url = PREFECT_API_URL.value()
    with prefect_api() as used:
        assert used == url
        assert "PREFECT_API_URL" not in os.environ
