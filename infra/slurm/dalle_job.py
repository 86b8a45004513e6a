"""What the ``train_dalle`` flow does around its training process, as two steps of a Slurm batch job.

``train_dalle.sbatch`` runs the flow's training process
(``python -m dalle_lightning.training.dalle_train``) with ``srun``, one task per
GPU on every node, which the flow itself cannot do from one Prefect worker.
This script does the rest, once, on the batch host:

- ``prepare`` (before ``srun``): the config the flow would write (the preset,
  the ``--set`` overrides, the allocation's nodes and GPUs, the vocabularies
  and grid of the BPE and the tokens), the output folder the flow would use
  (``<root>/models/dalle/<run fingerprint>``), and an MLflow run tagged with the
  flow's lineage; writes ``job.json`` there and the shell assignments of
  ``--job-env`` that the batch script sources. A finished folder is reported as
  done, an interrupted one resumes from its ``last.ckpt``, as in the flow.
- ``register`` (after ``srun``): logs the tokens dataset, the BPE and the
  trained model to that run, registers ``dalle`` with the same lineage tags,
  and writes the flow's ``result.json`` (so ``dalle train-dalle`` with the same
  config and data skips training).

    python infra/slurm/dalle_job.py prepare --root /shared/data --dataset web \\
        --dvae models:/dvae/latest --preset small --num-nodes 2 --devices 4 --job-env job.env
    python infra/slurm/dalle_job.py register --out-dir /shared/data/models/dalle/<fingerprint>
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path
from typing import Annotated, Any

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True)

JOB_FILE = "job.json"


@app.command()
def prepare(
    root: Annotated[str, typer.Option(help="Dataset root on a filesystem every node sees.")],
    job_env: Annotated[Path, typer.Option(help="Where to write the shell assignments for the batch script.")],
    dataset: Annotated[str, typer.Option(help="Dataset name (tokens/<dvae>/<name>).")] = "default",
    dvae: Annotated[str | None, typer.Option(help="dVAE checkpoint path or models:/ URI.")] = None,
    dvae_version: Annotated[str | None, typer.Option(help="Train on tokens/<version>/… instead.")] = None,
    bpe: Annotated[str | None, typer.Option(help="Caption BPE; default: the dataset's latest.")] = None,
    preset: Annotated[str, typer.Option(help="tiny, small or paper.")] = "small",
    set_: Annotated[
        list[str] | None, typer.Option("--set", help="Override a setting: train.max_steps=500")
    ] = None,
    num_nodes: Annotated[int, typer.Option(help="Nodes of the allocation (train.num_nodes).")] = 1,
    devices: Annotated[int, typer.Option(help="GPUs (= srun tasks) per node (train.devices).")] = 1,
    accelerator: Annotated[str, typer.Option(help="Lightning accelerator (train.accelerator).")] = "gpu",
    experiment: Annotated[str, typer.Option(help="MLflow experiment.")] = "dalle-lightning",
) -> None:
    """Write the training config, open the MLflow run and write the job's shell assignments."""
    job = prepare_job(
        root,
        dataset=dataset,
        dvae=dvae,
        dvae_version=dvae_version,
        bpe=bpe,
        preset=preset,
        overrides=list(set_ or []),
        num_nodes=num_nodes,
        devices=devices,
        accelerator=accelerator,
        experiment=experiment,
    )
    job_env.write_text(shell_assignments(job))
    state = "already trained" if job["done"] else f"MLflow run {job['run_id']}"
    typer.echo(f"train_dalle job in {job['out_dir']}: {state}")


@app.command()
def register(
    out_dir: Annotated[Path, typer.Option(help="The folder `prepare` chose (DALLE_OUT_DIR).")],
    register_model: Annotated[bool, typer.Option(help="Register the model as `dalle`.")] = True,
) -> None:
    """Log the trained model to the job's MLflow run, register it and write ``result.json``."""
    result = register_job(out_dir, register_model=register_model)
    typer.echo(f"dalle version {result['registered_version']} from {result['model_path']}")


def prepare_job(
    root: str,
    *,
    dataset: str,
    dvae: str | None,
    dvae_version: str | None,
    bpe: str | None,
    preset: str,
    overrides: list[str],
    num_nodes: int,
    devices: int,
    accelerator: str,
    experiment: str,
) -> dict[str, Any]:
    """The job record (also written as ``<out_dir>/job.json``); see the module docstring."""
    import mlflow

    from dalle_lightning.config_overrides import load_sections
    from dalle_lightning.datasets.fingerprint import fingerprint
    from dalle_lightning.datasets.layout import DatasetLayout
    from dalle_lightning.stages.bpe import bpe_fingerprint, load_bpe
    from flows import tracking
    from flows.lineage import dataset_fingerprint
    from flows.tokenize_images import tokens_stage
    from flows.train_dalle import (
        STAGE_VERSION,
        _resolve_dvae,
        _tokens_info,
        fit_to_data,
        latest_bpe,
        preset_with_overrides,
    )

    sections = load_sections(None, overrides)
    sections.setdefault("train", {}).update(num_nodes=num_nodes, devices=devices, accelerator=accelerator)
    if dvae is None and dvae_version is None:
        dvae = "models:/dvae/latest"  # as `dalle train-dalle`
    layout = DatasetLayout(root)
    uri = tracking.setup(None, experiment)
    dvae_path, version = _resolve_dvae(dvae, dvae_version)
    bpe_path = latest_bpe(layout, dataset)["tokenizer_path"] if bpe is None else bpe
    tokenizer = load_bpe(bpe_path)
    bpe_fp = bpe_fingerprint(tokenizer)
    grid, codebook = _tokens_info(layout, version, dataset)
    config, _ = fit_to_data(
        preset_with_overrides(preset, sections),
        sections,
        text_vocab=tokenizer.get_vocab_size(),
        grid_size=grid,
        image_vocab=codebook,
    )
    data_fp = dataset_fingerprint(layout, tokens_stage(version), dataset)
    run_fp = fingerprint("train_dalle", STAGE_VERSION, config, data_fp, bpe_fp)
    out_dir = Path(layout.join("models", "dalle", run_fp))
    out_dir.mkdir(parents=True, exist_ok=True)
    config_path = out_dir / "config.json"
    config_path.write_text(json.dumps(config.to_dict(), indent=1))
    tags = {
        "dalle.dataset": dataset,
        "dalle.dvae_version": version,
        "dalle.fingerprint.data": data_fp,
        "dalle.bpe_fingerprint": bpe_fp,
    }
    done = (out_dir / "result.json").exists()
    last = out_dir / "checkpoints" / "last.ckpt"
    resume = str(last) if last.exists() and not done else None
    run_id = None
    if not done:
        run_tags = {
            **tags,
            "dalle.stage": "train_dalle",
            "dalle.preset": preset,
            "dalle.launcher": "slurm",
            "mlflow.runName": "train_dalle",
            **({"dalle.resumed_from": resume} if resume else {}),
        }
        experiment_id = mlflow.get_experiment_by_name(experiment).experiment_id
        run_id = mlflow.MlflowClient(uri).create_run(experiment_id, tags=run_tags).info.run_id
    job = {
        "done": done,
        "config_json": str(config_path),
        "tokens_root": root,
        "dvae_version": version,
        "dvae_path": dvae_path,
        "dataset": dataset,
        "bpe_path": bpe_path,
        "out_dir": str(out_dir),
        "tracking_uri": uri,
        "run_id": run_id,
        "result_json": str(out_dir / "train-result.json"),
        "resume_from": resume,
        "tags": tags,
        "data_fingerprint": data_fp,
        "bpe_fingerprint": bpe_fp,
        "run_fingerprint": run_fp,
    }
    (out_dir / JOB_FILE).write_text(json.dumps(job, indent=1))
    return job


def shell_assignments(job: dict[str, Any]) -> str:
    """``DALLE_<FIELD>=value`` lines (shell-quoted; ``None`` as empty) for the batch script to source."""
    fields = (
        "config_json",
        "tokens_root",
        "dvae_version",
        "dvae_path",
        "dataset",
        "bpe_path",
        "out_dir",
        "tracking_uri",
        "run_id",
        "result_json",
        "resume_from",
    )
    lines = [f"DALLE_DONE={int(job['done'])}"]
    lines += [f"DALLE_{name.upper()}={shlex.quote(str(job[name] or ''))}" for name in fields]
    return "\n".join(lines) + "\n"


def register_job(out_dir: Path, *, register_model: bool = True) -> dict[str, Any]:
    """Log and register the trained model into the job's run; returns (and writes) the flow's result record."""
    import mlflow

    from dalle_lightning.datasets.layout import DatasetLayout
    from flows import tracking
    from flows.train_dalle import _log_tokenizer, log_and_register_dalle

    job = json.loads((Path(out_dir) / JOB_FILE).read_text())
    if job["done"]:
        return json.loads((Path(out_dir) / "result.json").read_text())
    trained = json.loads(Path(job["result_json"]).read_text())
    mlflow.set_tracking_uri(job["tracking_uri"])
    with mlflow.start_run(run_id=job["run_id"]) as run:
        tracking.log_dataset(
            DatasetLayout(job["tokens_root"]).join("tokens", job["dvae_version"], job["dataset"]),
            name=f"tokens/{job['dvae_version']}/{job['dataset']}",
            digest=job["data_fingerprint"],
            context="input",
        )
        _log_tokenizer(job["bpe_path"])
        model_uri, registered = log_and_register_dalle(trained["model_path"], job["tags"], register_model)
    result = {
        "model_path": trained["model_path"],
        "checkpoint": trained["checkpoint"],
        "steps": trained["steps"],
        "metrics": trained.get("metrics", {}),
        "model_uri": model_uri,
        "registered_version": registered,
        "mlflow_run_id": run.info.run_id,
        "dvae_version": job["dvae_version"],
        "data_fingerprint": job["data_fingerprint"],
        "bpe_fingerprint": job["bpe_fingerprint"],
        "bpe_path": job["bpe_path"],
        "run_fingerprint": job["run_fingerprint"],
    }
    (Path(out_dir) / "result.json").write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    app()
