"""infra/slurm/train_dalle.sbatch run end to end with a stand-in ``srun`` (one task, CPU): trains, logs, registers.

Slurm itself is not here; the stand-in runs the command ``srun`` was given
once, which is what Slurm does per task. What is checked is everything the
batch script and ``dalle_job.py`` do around it, and that they agree with the
``train_dalle`` flow: the flow, given the same settings, finds the job's
model and skips training.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

# about 1.5 minutes on the loaded 2-core machine; test_infra_files.py checks the same commands by parsing them
pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(400)]

REPO = Path(__file__).resolve().parents[2]
SBATCH = REPO / "infra" / "slurm" / "train_dalle.sbatch"

# a transformer that trains in seconds on the 8×8 codes of a micro dVAE (as in the train_dalle flow test)
MICRO = {
    "model": {"text_len": 16, "n_layer": 2, "n_head": 2, "n_embd": 32, "conv_kernel": 3},
    "train": {
        "max_steps": 4,
        "batch_size": 4,
        "warmup_steps": 1,
        "lr_steps": 4,
        "num_workers": 0,
        "shuffle_buffer": 0,
        "log_every_n_steps": 1,
        "sample_every_n_steps": 2,
        "sample_count": 2,
        "checkpoint_every_n_steps": 2,
    },
}

FAKE_SRUN = """#!/bin/sh
# stand-in for Slurm's srun: drop srun's options, run the command once (one task)
while [ "${1#-}" != "$1" ]; do shift; done
echo "srun: $*" >> "$SRUN_LOG"
exec "$@"
"""


def _filtered_dataset_writer():
    spec = importlib.util.spec_from_file_location(
        "flows_test_fixtures", REPO / "tests" / "flows" / "conftest.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module._filtered_dataset


def _micro_dvae(path: Path) -> str:
    from dalle_lightning.models.dvae import DiscreteVAE, DVAEConfig, save_dvae

    torch.manual_seed(0)
    config = DVAEConfig(image_size=32, n_hid=16, n_blk_per_group=1, group_count=3, vocab_size=64)
    return str(save_dvae(DiscreteVAE(config), path))


def _submit(env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(SBATCH)], env=env, cwd=REPO, capture_output=True, text=True, timeout=360
    )


def test_sbatch_trains_logs_and_registers_like_the_flow(tmp_path, prefect_harness):
    import mlflow

    from dalle_lightning.stages.bpe import BPEConfig
    from flows.tokenize_images import tokenize
    from flows.train_bpe import train_bpe
    from flows.train_dalle import train_dalle

    root = tmp_path / "root"
    _filtered_dataset_writer()(root, "t", shards=2, per_shard=6)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    train_bpe(str(root), dataset="t", config=BPEConfig(vocab_size=300), tracking_uri=uri)
    dvae_path = _micro_dvae(tmp_path / "dvae.pt")
    tokens = tokenize(str(root), dataset="t", dvae=dvae_path, tracking_uri=uri)

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text(FAKE_SRUN)
    (bin_dir / "srun").chmod(0o755)
    settings = " ".join(f"{section}.{k}={v}" for section, values in MICRO.items() for k, v in values.items())
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("SLURM_")},
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        "PYTHON": sys.executable,
        "DALLE_INFRA": str(REPO / "infra"),
        "DALLE_ROOT": str(root),
        "DALLE_DATASET": "t",
        "DALLE_PRESET": "tiny",
        "DALLE_DVAE": dvae_path,
        "DALLE_SET": settings,
        "DALLE_ACCELERATOR": "cpu",
        "MLFLOW_TRACKING_URI": uri,
        "SLURM_JOB_NUM_NODES": "1",
        "SLURM_NTASKS_PER_NODE": "1",
        "SRUN_LOG": str(tmp_path / "srun.log"),
        "OMP_NUM_THREADS": "1",
    }
    env.pop("PREFECT_API_URL", None)
    done = _submit(env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (launched,) = (tmp_path / "srun.log").read_text().splitlines()
    assert "-m dalle_lightning.training.dalle_train --config-json" in launched

    client = mlflow.MlflowClient(uri)
    (version,) = client.search_model_versions("name='dalle'")
    assert version.tags["dalle.dvae_version"] == tokens["dvae_version"]
    run = client.get_run(version.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["dalle.launcher"] == "slurm" and run.data.tags["dalle.stage"] == "train_dalle"
    params = run.data.params
    assert (params["train.num_nodes"], params["train.devices"], params["train.max_steps"]) == ("1", "1", "4")
    assert params["model.image_vocab"] == "64" and params["model.grid_size"] == "8"  # fitted to the tokens
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")] == [0, 1, 2, 3]
    assert "bpe" in {a.path for a in client.list_artifacts(run.info.run_id)}
    assert version.source and version.run_id == run.info.run_id

    # re-submitting finds the finished model and trains nothing
    again = _submit(env)
    assert again.returncode == 0 and "already trained" in again.stdout, again.stdout + again.stderr
    assert len((tmp_path / "srun.log").read_text().splitlines()) == 1
    assert len(client.search_model_versions("name='dalle'")) == 1

    # the flow with the same settings lands in the same folder and skips: the job did what the flow does
    overrides = {
        "model": MICRO["model"],
        "train": {**MICRO["train"], "num_nodes": 1, "devices": 1, "accelerator": "cpu"},
    }
    result = train_dalle(str(root), dataset="t", dvae=dvae_path, overrides=overrides, tracking_uri=uri)
    assert result["did_work"] is False and result["mlflow_run_id"] == run.info.run_id
