"""Test-session settings: Prefect and MLflow point at temporary folders, one Prefect API server per session."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

_SESSION_TMP = Path(tempfile.mkdtemp(prefix="dalle-tests-"))
# must be set before anything imports prefect
os.environ["PREFECT_HOME"] = str(_SESSION_TMP / "prefect-home")
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ["PREFECT_LOGGING_TO_API_BATCH_INTERVAL"] = "0.5"
os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{_SESSION_TMP / 'mlruns.db'}"
os.environ["NO_ALBUMENTATIONS_UPDATE"] = "1"
os.environ.pop("PREFECT_API_URL", None)
os.environ.pop("DALLE_DASK_ADDRESS", None)


@pytest.fixture(scope="session")
def session_tmp() -> Path:
    return _SESSION_TMP


@pytest.fixture(scope="session")
def prefect_harness():
    """One temporary Prefect API server (and database) for the whole test session."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=90):
        yield
