"""Faults survived, with identical output (issue 7, item 2).

- a Dask worker SIGKILLed in the middle of a tokenize task: the stage completes
  and every output shard is byte-identical to an undisturbed run;
- the transformer's training process SIGKILLed after a checkpoint: resuming
  gives the weights of an uninterrupted run;
- a crash between writing a shard and renaming it into place: no partial file
  is visible, no manifest claims the shard, the re-run completes it;
- the Prefect database deleted between two runs: the manifests still skip the
  finished shards;
- a Prefect shard task failing on its first attempt: retried, then it succeeds.
"""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from fault_fixtures import (
    kill_one_dask_worker,
    own_prefect_api,
    reference_tokens,
    sha256_of_parts,
    tiny_dvae,
    tree_listing,
    write_filtered_dataset,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

TOKENIZE_STAGE = "dalle_lightning.stages.tokenize"


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _tokens_folder(root: Path, dvae: str, name: str = "t") -> Path:
    from dalle_lightning.models.dvae import dvae_version

    return root / "tokens" / dvae_version(dvae) / name


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


# --- (a) a Dask worker killed mid-stage -------------------------------------------------------------


def test_dask_worker_killed_mid_tokenize_gives_byte_identical_shards(tmp_path, prefect_harness):
    from dalle_lightning.datasets.verify import verify_tree
    from flows.tokenize_images import run_tokenize

    dvae = tiny_dvae(tmp_path / "dvae.pt")
    write_filtered_dataset(tmp_path / "killed", "t", shards=4, per_shard=6)
    # the undisturbed reference: the stage function on each shard, in this process
    expected = reference_tokens(tmp_path / "killed", "t", dvae, tmp_path / "reference")
    assert len(expected) == 4

    # two worker processes; the first to finish encoding a shard is SIGKILLed just before writing it
    with kill_one_dask_worker(tmp_path / "fault", TOKENIZE_STAGE) as fault:
        killed = run_tokenize(str(tmp_path / "killed"), n_workers=2, dataset="t", dvae=dvae)
    marker = json.loads((fault / "killed").read_text())
    workers = [json.loads(p.read_text()) for p in (fault / "workers").glob("*.json")]
    assert marker["pid"] in {w["pid"] for w in workers}
    assert not _pid_alive(marker["pid"])  # the worker really died
    assert len(workers) >= 3  # two started, the nanny restarted the dead one
    assert all(w["address"].startswith("tcp://127.0.0.1:") for w in workers)  # loopback only

    assert killed["rows"] == 24  # no row lost
    assert sum(killed["work"]["tokenize"].values()) == 4
    assert sha256_of_parts(_tokens_folder(tmp_path / "killed", dvae)) == expected
    assert tree_listing(_tokens_folder(tmp_path / "killed", dvae)) == sorted(expected)  # nothing else left
    report = verify_tree(str(tmp_path / "killed"))
    assert report.ok, report.problems


# --- (b) the training process killed after a checkpoint, then resumed --------------------------------

GRID, VOCAB, DVAE_VERSION = 4, 16, "00000000feedf00d"
CAPTIONS = [
    f"a {size} {colour} {shape}"
    for size in ("small", "large")
    for colour in ("red", "green", "blue", "yellow")
    for shape in ("circle", "square", "triangle", "star")
]
TRAIN = {
    "model": {
        "text_len": 12,
        "text_vocab": 320,
        "image_vocab": VOCAB,
        "grid_size": GRID,
        "n_layer": 2,
        "n_head": 4,
        "n_embd": 64,
        "conv_kernel": 3,
        "dropout": 0.1,
    },
    "max_steps": 40,
    "batch_size": 4,
    "lr": 3e-3,
    "warmup_steps": 2,
    "lr_end": 3e-4,
    "bpe_dropout": 0.1,
    "shuffle_buffer": 8,
    "num_workers": 0,
    "accelerator": "cpu",
    "devices": 1,
    "log_every_n_steps": 5,
    "sample_every_n_steps": 1000,
    "checkpoint_every_n_steps": 4,
}


def _training_inputs(tmp_path: Path) -> tuple[Path, str, Path]:
    """A tokens dataset (32 rows, 4×4 codes), its BPE and the training config as JSON."""
    import numpy as np
    import pyarrow as pa

    import data_schemas.tokens as tokens_schema
    from dalle_lightning.datasets.parquet_io import write_parquet_atomic
    from dalle_lightning.stages.bpe import BPEConfig, save_bpe, train_bpe

    root = tmp_path / "data"
    schema = tokens_schema.tokens_schema(GRID, GRID, VOCAB, DVAE_VERSION)
    codes = np.random.default_rng(0).integers(0, VOCAB, size=(len(CAPTIONS), GRID * GRID))
    table = pa.table(
        {
            "key": [f"k{i:04d}" for i in range(len(CAPTIONS))],
            "caption": CAPTIONS,
            "image_tokens": pa.array(codes.astype(np.uint16).tolist(), schema.field("image_tokens").type),
        },
        schema=schema,
    )
    write_parquet_atomic(
        table, str(root / "tokens" / DVAE_VERSION / "t" / "part-00000.parquet"), tokens_schema, schema
    )
    bpe = save_bpe(
        train_bpe(CAPTIONS, BPEConfig(vocab_size=300, min_frequency=1)), str(tmp_path / "bpe.json")
    )
    config = tmp_path / "train.json"
    config.write_text(json.dumps(TRAIN))
    return root, bpe, config


def _train_command(root: Path, bpe: str, config: Path, out: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "dalle_lightning.training.dalle_train",
        "--config-json",
        str(config),
        "--tokens-root",
        str(root),
        "--dvae-version",
        DVAE_VERSION,
        "--dataset",
        "t",
        "--bpe-path",
        bpe,
        "--out-dir",
        str(out),
        "--result-json",
        str(out / "result.json"),
        *extra,
    ]


def test_training_process_killed_after_a_checkpoint_resumes_to_the_same_weights(tmp_path):
    import signal
    import subprocess
    import time

    from dalle_lightning.training.dalle_train import DalleTrainConfig, load_dalle, train_dalle

    root, bpe, config = _training_inputs(tmp_path)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}

    # the training process, SIGKILLed as soon as its first checkpoint is on disk
    out = tmp_path / "killed"
    process = subprocess.Popen(
        _train_command(root, bpe, config, out), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    deadline = time.monotonic() + 180
    last = out / "checkpoints" / "last.ckpt"  # written after step-*.ckpt, by a rename (complete or absent)
    while not last.exists() and process.poll() is None:
        assert time.monotonic() < deadline, "no checkpoint within 180 s"
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == -signal.SIGKILL, stderr.decode()[-2000:]
    assert not (out / "result.json").exists() and not (out / "dalle.pt").exists()
    at_kill = torch.load(last, map_location="cpu", weights_only=True)
    assert 0 < at_kill["global_step"] < TRAIN["max_steps"]

    # the same entry point, resumed from the last checkpoint (as the train_dalle flow does)
    resumed = subprocess.run(
        _train_command(root, bpe, config, out, "--resume-from", str(last)),
        env=env,
        capture_output=True,
        timeout=300,
    )
    assert resumed.returncode == 0, resumed.stderr.decode()[-3000:]
    result = json.loads((out / "result.json").read_text())
    assert result["steps"] == TRAIN["max_steps"]
    # it continued from the checkpoint: its progress lines (every 4 steps) start after the kill point
    printed = [int(s) for s in re.findall(r"dalle step (\d+)/40", resumed.stderr.decode())]
    assert printed and min(printed) > at_kill["global_step"], (printed, at_kill["global_step"])

    # an uninterrupted run of the same config (in this process, one thread like the child)
    straight = train_dalle(
        DalleTrainConfig.from_dict(TRAIN),
        bpe=bpe,
        tokens_root=str(root),
        dvae_version=DVAE_VERSION,
        dataset="t",
        out_dir=tmp_path / "straight",
    )
    a = torch.load(straight["checkpoint"], map_location="cpu", weights_only=True)["state_dict"]
    b = torch.load(result["checkpoint"], map_location="cpu", weights_only=True)["state_dict"]
    assert set(a) == set(b)
    assert any(not torch.equal(at_kill["state_dict"][k], a[k]) for k in a)  # the resumed half moved them
    for key in a:
        assert torch.allclose(a[key], b[key], rtol=1e-4, atol=1e-6), key
    exported_a, exported_b = load_dalle(straight["model_path"]), load_dalle(result["model_path"])
    for (name, x), (_, y) in zip(
        exported_a.state_dict().items(), exported_b.state_dict().items(), strict=True
    ):
        assert torch.allclose(x, y, rtol=1e-4, atol=1e-6), name


# --- (c) a crash between writing a shard and renaming it into place --------------------------------

_CRASH_BEFORE_RENAME = """
import os, signal, sys
import fsspec.implementations.local as local
import pyarrow as pa
from dalle_lightning.datasets.layout import DatasetLayout
from dalle_lightning.stages.sources import plan_shards, write_source_shard

def die(self, path1, path2, **kwargs):  # the temporary file is complete, the rename never happens
    os.kill(os.getpid(), signal.SIGKILL)

local.LocalFileSystem.mv = die
table = pa.table({"url": [f"http://127.0.0.1/{i}" for i in range(30)], "caption": ["c"] * 30})
write_source_shard(DatasetLayout(sys.argv[1]), "d", plan_shards(table, 30)[0])
"""


def test_a_process_killed_between_write_and_rename_leaves_no_visible_shard(tmp_path):
    import subprocess

    import pyarrow as pa

    from dalle_lightning.datasets.layout import DatasetLayout
    from dalle_lightning.datasets.manifest import is_done, read_manifest
    from dalle_lightning.datasets.parquet_io import list_parts
    from dalle_lightning.datasets.verify import verify_tree
    from dalle_lightning.stages.sources import plan_shards, write_source_shard

    root = tmp_path / "root"
    child = subprocess.run([sys.executable, "-c", _CRASH_BEFORE_RENAME, str(root)], capture_output=True)
    assert child.returncode == -9, child.stderr.decode()[-2000:]

    layout = DatasetLayout(str(root))
    shard = plan_shards(
        pa.table({"url": [f"http://127.0.0.1/{i}" for i in range(30)], "caption": ["c"] * 30}), 30
    )[0]
    folder = root / "sources" / "d"
    leftovers = [p.name for p in folder.iterdir()]
    assert len(leftovers) == 1 and leftovers[0].startswith(".tmp-")  # the complete bytes, hidden
    assert list_parts(str(folder)) == []  # readers see no shard
    assert read_manifest(layout.manifest("sources", "d", shard.shard_id)) is None  # and no manifest claims it
    report = verify_tree(str(root))
    assert report.ok and report.checked == 0, report.problems

    manifest, did_work = write_source_shard(layout, "d", shard)  # the re-run completes it
    assert did_work and manifest.files["output"]["rows"] == 30
    assert is_done(layout.manifest("sources", "d", shard.shard_id), shard.fingerprint) is not None
    assert [Path(p).name for p in list_parts(str(folder))] == [f"part-{shard.shard_id}.parquet"]
    assert pq.read_table(folder / f"part-{shard.shard_id}.parquet").num_rows == 30
    report = verify_tree(str(root))
    assert report.ok and report.checked == 1 and report.rows == 30, report.problems


def test_a_failing_rename_inside_a_flow_exposes_nothing_and_the_rerun_completes(
    tmp_path, prefect_harness, monkeypatch
):
    import fsspec.implementations.local as local

    from dalle_lightning.datasets.manifest import read_manifest
    from dalle_lightning.datasets.parquet_io import list_parts
    from dalle_lightning.datasets.verify import verify_tree
    from flows.tokenize_images import tokenize, tokens_stage

    dvae = tiny_dvae(tmp_path / "dvae.pt")
    root = tmp_path / "root"
    ids = write_filtered_dataset(root, "t", shards=3, per_shard=4)
    expected = reference_tokens(root, "t", dvae, tmp_path / "reference")
    doomed = f"part-{ids[1]}.parquet"
    mv = local.LocalFileSystem.mv

    def failing_mv(self, path1, path2, **kwargs):
        if str(path2).endswith(doomed):
            raise OSError(f"injected: rename of {path2} failed")
        return mv(self, path1, path2, **kwargs)

    monkeypatch.setattr(local.LocalFileSystem, "mv", failing_mv)
    with pytest.raises(Exception, match="injected: rename"):
        tokenize(root=str(root), dataset="t", dvae=dvae)  # 3 attempts (2 retries), all fail
    folder = _tokens_folder(root, dvae)
    version = folder.parent.name
    assert [Path(p).name for p in list_parts(str(folder))] == sorted(set(expected) - {doomed})
    assert tree_listing(folder) == sorted(set(expected) - {doomed})  # no temporary file left either
    assert read_manifest(str(root / "_manifests" / tokens_stage(version) / "t" / f"{ids[1]}.json")) is None
    assert verify_tree(str(root)).ok

    monkeypatch.setattr(local.LocalFileSystem, "mv", mv)
    again = tokenize(root=str(root), dataset="t", dvae=dvae)
    assert again["work"]["tokenize"].get("executed") == 1 and again["rows"] == 12
    assert sha256_of_parts(folder) == expected
    report = verify_tree(str(root))
    assert report.ok, report.problems


# --- (d) the Prefect database deleted between two runs ----------------------------------------------


def test_deleting_the_prefect_database_still_skips_finished_shards(tmp_path):
    from prefect.client.orchestration import get_client

    from flows.tokenize_images import tokenize

    dvae = tiny_dvae(tmp_path / "dvae.pt")
    root = tmp_path / "root"
    write_filtered_dataset(root, "t", shards=3, per_shard=4)
    home = tmp_path / "prefect-home"
    with own_prefect_api(home):
        first = tokenize(root=str(root), dataset="t", dvae=dvae)
    assert first["work"]["tokenize"] == {"executed": 3}
    folder = _tokens_folder(root, dvae)
    before = {p: p.stat().st_mtime_ns for p in sorted(root.rglob("*")) if p.is_file()}
    hashes = sha256_of_parts(folder)

    database = home / "prefect.db"
    assert database.exists()
    for path in home.glob("prefect.db*"):  # the database with its -wal / -shm files
        path.unlink()
    import shutil

    shutil.rmtree(home / "storage", ignore_errors=True)  # and Prefect's cached task results

    with own_prefect_api(home):
        second = tokenize(root=str(root), dataset="t", dvae=dvae)
        with get_client(sync_client=True) as client:
            assert len(client.read_flow_runs()) == 1  # a new, empty database: Prefect remembers nothing
    assert second["work"]["tokenize"] == {"skipped": 3}  # the manifests did
    assert sha256_of_parts(folder) == hashes
    after = {p: p.stat().st_mtime_ns for p in sorted(root.rglob("*")) if p.is_file()}
    assert after == before  # no shard file or manifest rewritten


# --- (e) a Prefect task failing transiently ---------------------------------------------------------


def test_a_transient_task_failure_is_retried_and_succeeds(tmp_path, prefect_harness, monkeypatch):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    import dalle_lightning.stages.tokenize as tokenize_stage
    from flows.tokenize_images import tokenize

    dvae = tiny_dvae(tmp_path / "dvae.pt")
    root = tmp_path / "root"
    ids = write_filtered_dataset(root, "t", shards=3, per_shard=4)
    expected = reference_tokens(root, "t", dvae, tmp_path / "reference")
    flaky = ids[2]
    calls: list[str] = []
    real = tokenize_stage.tokenize_shard

    def flaky_tokenize_shard(filtered_path, *args, **kwargs):
        calls.append(filtered_path)
        if flaky in filtered_path and sum(flaky in c for c in calls) == 1:
            raise ConnectionError(f"injected transient failure reading {filtered_path}")
        return real(filtered_path, *args, **kwargs)

    monkeypatch.setattr(tokenize_stage, "tokenize_shard", flaky_tokenize_shard)
    state = tokenize(root=str(root), dataset="t", dvae=dvae, return_state=True)
    assert state.is_completed()
    summary = state.result()
    assert summary["work"]["tokenize"] == {"executed": 3} and summary["rows"] == 12
    assert sum(flaky in c for c in calls) == 2 and len(calls) == 4
    assert sha256_of_parts(_tokens_folder(root, dvae)) == expected

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[state.state_details.flow_run_id]))
        )
        by_name = {r.name: r for r in runs}
        retried = by_name[f"tokenize-{flaky}"]
        assert retried.run_count == 2 and retried.state.is_completed()
        history = [s.name for s in client.read_task_run_states(retried.id)]
        assert "Retrying" in history and history[-1] == "Completed", history
        for shard_id in ids[:2]:
            assert by_name[f"tokenize-{shard_id}"].run_count == 1
