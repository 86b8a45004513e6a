"""flows.runners: the local Dask cluster, and what it leaves in this process's environment."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from flows import runners


@pytest.mark.timeout(120)
def test_training_processes_do_not_inherit_the_thread_limits_a_local_cluster_sets(monkeypatch):
    """A LocalCluster's nannies write OMP_NUM_THREADS=1 (and the like) into this process's environment
    and leave it there; a training process started afterwards would run on one core."""
    for name in runners.DASK_SPAWN_VARIABLES:
        monkeypatch.delenv(name, raising=False)
        monkeypatch.setitem(runners._USER_SPAWN_VARIABLES, name, None)
    with runners.dask_cluster_address(n_workers=1):
        assert os.environ.get("OMP_NUM_THREADS") == "1"  # what Dask did, so the test can fail
    env = runners.subprocess_environment(PYTHONUNBUFFERED="1")
    assert "OMP_NUM_THREADS" not in env and "MKL_NUM_THREADS" not in env and "PYTHONHASHSEED" not in env
    assert env["PYTHONUNBUFFERED"] == "1" and env["PATH"] == os.environ["PATH"]
    code = "import torch; print(torch.get_num_threads())"
    threads = {
        name: int(subprocess.run([sys.executable, "-c", code], env=e, capture_output=True, text=True).stdout)
        for name, e in (("inherited", dict(os.environ)), ("cleaned", env))
    }
    assert threads["inherited"] == 1
    assert threads["cleaned"] > 1 or os.cpu_count() == 1, threads


def test_a_limit_the_user_set_is_kept(monkeypatch):
    monkeypatch.setitem(runners._USER_SPAWN_VARIABLES, "OMP_NUM_THREADS", "3")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert runners.subprocess_environment()["OMP_NUM_THREADS"] == "3"
