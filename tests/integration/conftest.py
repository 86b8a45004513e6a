"""Real services for the integration tests, each a subprocess bound to 127.0.0.1 with its own folders.

:class:`Services` starts and stops them: every process in its own process
group (killed as a group at the end, also when a test fails), its output in
``<base>/logs/<name>.log`` (shown when a service does not come up).
PostgreSQL runs as the ``postgres`` user when the test runs as root (the
server refuses root), on a data folder of its own.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
# the settings of this test session that must not leak into the services (each gets its own)
_SESSION_KEYS = ("PREFECT_API_URL", "PREFECT_HOME", "MLFLOW_TRACKING_URI", "DALLE_DASK_ADDRESS")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def base_env(**extra: str) -> dict[str, str]:
    """This environment less the session's Prefect/MLflow/Dask settings, one torch thread, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if k not in _SESSION_KEYS}
    env.update(
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        NO_ALBUMENTATIONS_UPDATE="1",
        OMP_NUM_THREADS="1",
        MKL_NUM_THREADS="1",
        PYTHONUNBUFFERED="1",
    )
    env.update(extra)
    return env


class Services:
    """Subprocesses started for a test and everything needed to stop them."""

    def __init__(self, base: Path) -> None:
        self.base = base
        (base / "logs").mkdir(parents=True, exist_ok=True)
        self.processes: dict[str, subprocess.Popen] = {}
        self._cleanups: list = []

    def start(self, name: str, argv: list[str], env: dict[str, str], cwd: Path | None = None) -> None:
        log = open(self.base / "logs" / f"{name}.log", "wb")  # noqa: SIM115 - closed with the process
        self._cleanups.append(log.close)
        self.processes[name] = subprocess.Popen(
            argv, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=cwd, start_new_session=True
        )

    repo = REPO
    bin = BIN
    free_port = staticmethod(free_port)
    env = staticmethod(base_env)

    def start_postgres(self) -> str | None:
        return start_postgres(self)

    def on_stop(self, cleanup) -> None:
        self._cleanups.append(cleanup)

    def log(self, name: str, chars: int = 4000) -> str:
        path = self.base / "logs" / f"{name}.log"
        return path.read_text(errors="replace")[-chars:] if path.exists() else "(no log)"

    def check_running(self, name: str) -> None:
        code = self.processes[name].poll()
        if code is not None:
            raise RuntimeError(f"{name} exited with {code}:\n{self.log(name)}")

    def wait_http(self, name: str, url: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.check_running(name)
            try:
                with urllib.request.urlopen(url, timeout=5) as response:
                    if response.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.5)
        raise TimeoutError(f"{name} not healthy at {url} after {timeout:.0f}s:\n{self.log(name)}")

    def wait_port(self, name: str, port: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.check_running(name)
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    return
            time.sleep(0.3)
        raise TimeoutError(f"{name} not listening on {port} after {timeout:.0f}s:\n{self.log(name)}")

    def stop(self) -> None:
        """SIGTERM every process group (newest first), SIGKILL what is left after 10 s, then the cleanups."""
        for process in reversed(list(self.processes.values())):
            _signal_group(process, signal.SIGTERM)
        deadline = time.monotonic() + 10
        for process in self.processes.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=max(deadline - time.monotonic(), 0.1))
            _signal_group(
                process, signal.SIGKILL
            )  # the group may outlive its leader (Dask nannies, flow runs)
            process.wait()
        for cleanup in reversed(self._cleanups):
            try:
                cleanup()
            except Exception as err:  # a failed cleanup must not hide the test's outcome
                print(f"cleanup failed: {err!r}", file=sys.stderr)


def _signal_group(process: subprocess.Popen, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, sig)


def start_postgres(services: Services) -> str | None:
    """A PostgreSQL server on a free loopback port with a database ``mlflow``; its SQLAlchemy URI, or None if it cannot run."""
    initdb, pg_ctl = shutil.which("initdb"), shutil.which("pg_ctl")
    try:
        import psycopg2
    except ImportError:
        return None
    if not (initdb and pg_ctl):
        return None
    as_user: list[str] = []
    folder = Path(
        tempfile.mkdtemp(prefix="dalle-pg-")
    )  # not under pytest's root-only tmp: postgres must reach it
    services.on_stop(lambda: shutil.rmtree(folder, ignore_errors=True))
    if os.geteuid() == 0:  # the server refuses to run as root
        shutil.chown(folder, "postgres", "postgres")
        as_user = ["runuser", "-u", "postgres", "--"]
    data, port = folder / "data", free_port()
    subprocess.run(
        [*as_user, initdb, "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync"],
        check=True,
        capture_output=True,
    )
    options = f"-h 127.0.0.1 -p {port} -k {folder} -c fsync=off -c full_page_writes=off"
    started = subprocess.run(
        [
            *as_user,
            pg_ctl,
            "-D",
            str(data),
            "-l",
            str(folder / "server.log"),
            "-o",
            options,
            "-w",
            "-t",
            "60",
            "start",
        ],
        capture_output=True,
        text=True,
    )
    services.on_stop(
        lambda: subprocess.run(
            [*as_user, pg_ctl, "-D", str(data), "-m", "immediate", "stop"], capture_output=True, timeout=60
        )
    )
    if started.returncode != 0:
        log = (folder / "server.log").read_text(errors="replace") if (folder / "server.log").exists() else ""
        raise RuntimeError(f"pg_ctl start failed: {started.stderr}\n{log[-3000:]}")
    connection = psycopg2.connect(host="127.0.0.1", port=port, user="postgres", dbname="postgres")
    connection.autocommit = True
    with connection.cursor() as cursor:
        cursor.execute("CREATE DATABASE mlflow")
    connection.close()
    # SQLAlchemy 2.1 reads a bare postgresql:// as psycopg 3; the driver installed is psycopg2
    return f"postgresql+psycopg2://postgres@127.0.0.1:{port}/mlflow"


@pytest.fixture(scope="module")
def services(tmp_path_factory):
    running = Services(tmp_path_factory.mktemp("services"))
    try:
        yield running
    finally:
        running.stop()
