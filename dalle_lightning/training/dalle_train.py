"""Train the DALL-E transformer: :class:`DalleTrainConfig`, presets, :func:`train_dalle`, a process entry point.

A training run reads the ``tokens`` dataset of one dVAE (or tokens in memory),
encodes the captions on the fly with the caption BPE (BPE dropout in
training), trains with Lightning on whatever the config asks for (CPU, one
GPU, DDP over many, FSDP for large models), writes checkpoints that resume
exactly (weights, optimiser, schedule, EMA, data position, random draws),
exports the model with :func:`save_dalle` and, given an MLflow run, logs the
config, the curves and sample grids to it.

The entry point lets a Prefect task start training as its own process, so
that Lightning's launcher can spawn one process per device (it re-runs this
same command for ranks 1…n−1), or so that ``torchrun`` / Slurm can start it
on many nodes::

    python -m dalle_lightning.training.dalle_train --config-json CONFIG.json \\
        --tokens-root ./data --dvae-version VERSION --dataset demo --bpe-path tokenizer.json \\
        --out-dir runs/dalle [--dvae-path dvae.pt] \\
        [--tracking-uri sqlite:///mlruns.db --run-id RUN] [--resume-from CKPT] --result-json OUT.json
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import torch
import typer

from dalle_lightning.config_overrides import build, load_train_preset, train_config_from_yaml
from dalle_lightning.models.transformer import DalleConfig, DalleTransformer

PRESETS = ("tiny", "small", "paper")
PRECISIONS = ("auto", "32-true", "32", "16-mixed", "bf16-mixed", "bf16-true", "64-true")


@dataclass
class DalleTrainConfig:
    """A transformer training run: the model and how to train it (paper, B.2)."""

    model: DalleConfig = field(default_factory=DalleConfig)
    """Sizes, attention masks and loss weights of the transformer."""
    max_steps: int = 430_000
    """Optimiser updates to train for (paper: 430,000)."""
    batch_size: int = 1
    """(caption, image) pairs per batch on each device (paper: 1024 in all)."""
    lr: float = 4.5e-4
    """Peak learning rate of AdamW (paper: 4.5e-4)."""
    warmup_steps: int = 5000
    """Updates over which the learning rate rises linearly to ``lr`` (paper: 5,000)."""
    lr_end: float = 1.4e-5
    """Learning rate at ``lr_steps``, after a cosine decay from ``lr`` (paper: halved five times, ≈ 1.4e-5)."""
    lr_steps: int | None = None
    """Update at which the cosine decay reaches ``lr_end``; ``None``: ``max_steps``."""
    weight_decay: float = 4.5e-2
    """AdamW's decoupled weight decay on the weight matrices (paper: 4.5e-2); not on embeddings, gains, biases."""
    grad_clip: float | None = 4.0
    """Clip the gradient norm to this (paper: 4); ``None``: no clipping."""
    ema_decay: float | None = None
    """Decay of an exponential moving average of the weights, exported instead of them; ``None``: no EMA."""
    caption_dropout: float = 0.0
    """Probability of training a sample with the null caption (all pads), for classifier-free guidance."""
    bpe_dropout: float = 0.1
    """Probability of skipping each BPE merge when encoding a training caption (paper: 10%)."""
    shuffle_buffer: int = 1000
    """Rows in the buffer that mixes rows of neighbouring shards (0: shard-by-shard order only)."""
    num_workers: int = 1
    """Data-loader worker processes per device (0: load in the training process)."""
    seed: int = 0
    """Seeds the initial weights, the data order, BPE dropout, caption dropout and the model's dropout."""
    precision: str = "auto"
    """Lightning precision: ``auto`` (``bf16-mixed`` on a GPU that has it, else ``32-true``), ``32-true``…"""
    compile: bool = False
    """``torch.compile`` the transformer (in place: checkpoints keep the plain parameter names)."""
    accelerator: str = "auto"
    """Lightning accelerator: ``cpu``, ``gpu``, ``auto``."""
    devices: int | str = "auto"
    """Devices per node (an integer or ``auto``); several run DDP (or FSDP) ranks."""
    num_nodes: int = 1
    """Machines to train on (with a multi-node launcher such as torchrun or Slurm)."""
    strategy: str = "auto"
    """Lightning strategy: ``auto`` (DDP on several devices), ``ddp``, ``fsdp`` (blocks sharded; large models)."""
    log_every_n_steps: int = 50
    """Steps between logged metric values."""
    sample_every_n_steps: int = 1000
    """Steps between sample grids (images drawn for fixed captions)."""
    sample_count: int = 4
    """Captions in a sample grid when ``sample_captions`` is empty: the first rows of the first shard."""
    sample_captions: list[str] = field(default_factory=list)
    """Fixed captions to draw sample grids for; empty: ``sample_count`` captions from the data."""
    checkpoint_every_n_steps: int = 1000
    """Steps between checkpoints (a final one is always written)."""

    def __post_init__(self) -> None:
        if not isinstance(self.model, DalleConfig):
            raise ValueError(f"model must be a DalleConfig, got {type(self.model).__name__}")
        for name in (
            "max_steps",
            "batch_size",
            "log_every_n_steps",
            "sample_every_n_steps",
            "sample_count",
            "checkpoint_every_n_steps",
            "num_nodes",
        ):
            _check_int(name, getattr(self, name), 1)
        for name in ("warmup_steps", "seed", "num_workers", "shuffle_buffer"):
            _check_int(name, getattr(self, name), 0)
        if self.lr_steps is not None:
            _check_int("lr_steps", self.lr_steps, 0)
        for name in ("lr", "lr_end"):
            _check_number(name, getattr(self, name))
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)!r}")
        _check_number("weight_decay", self.weight_decay)
        if not self.weight_decay >= 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay!r}")
        if self.grad_clip is not None:
            _check_number("grad_clip", self.grad_clip)
            if not self.grad_clip > 0:
                raise ValueError(f"grad_clip must be > 0 or null, got {self.grad_clip!r}")
        if self.ema_decay is not None and not 0.0 < self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in (0, 1) or null, got {self.ema_decay!r}")
        for name in ("caption_dropout", "bpe_dropout"):
            _check_number(name, getattr(self, name))
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if isinstance(self.devices, str) and self.devices != "auto" and not self.devices.isdigit():
            raise ValueError(f"devices must be a positive integer or 'auto', got {self.devices!r}")
        if not isinstance(self.compile, bool):
            raise ValueError(f"compile must be true or false, got {self.compile!r}")
        if not all(isinstance(c, str) for c in self.sample_captions):
            raise ValueError(f"sample_captions must be a list of strings, got {self.sample_captions!r}")
        if self.lr_decay_steps < self.warmup_steps:
            raise ValueError(
                f"lr_steps (or max_steps) = {self.lr_decay_steps} must be >= warmup_steps = {self.warmup_steps}"
            )
        if self.strategy.startswith("fsdp") and self.ema_decay is not None:
            raise ValueError(
                "ema_decay is not supported with strategy 'fsdp' (the EMA copy would not be sharded)"
            )

    @property
    def lr_decay_steps(self) -> int:
        """``lr_steps``, or ``max_steps`` when it is ``None``."""
        return self.max_steps if self.lr_steps is None else self.lr_steps

    def to_dict(self) -> dict[str, Any]:
        """Plain values (JSON- and YAML-safe); :meth:`from_dict` reads them back."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> DalleTrainConfig:
        """The config from :meth:`to_dict`'s layout; ``ValueError`` naming any unknown field."""
        return build(cls, dict(values))

    def flat_params(self) -> dict[str, Any]:
        """``model.<field>`` and ``train.<field>`` → value: what a tracking server records as params."""
        values = self.to_dict()
        model = values.pop("model")
        return {**{f"model.{k}": v for k, v in model.items()}, **{f"train.{k}": v for k, v in values.items()}}


def _check_int(name: str, value: object, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def _check_number(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{name} must be a number, got {value!r}")


def load_preset(name: str) -> DalleTrainConfig:
    """The checked-in preset ``dalle_lightning/presets/dalle/<name>.yaml`` (``tiny``, ``small``, ``paper``).

    The YAML has a ``model:`` section (:class:`DalleConfig` fields) and a
    ``train:`` section (the other :class:`DalleTrainConfig` fields); unknown
    sections or fields are a ``ValueError``.
    """
    return load_train_preset(DalleTrainConfig, "dalle", "DALL-E", name, PRESETS)


def config_from_yaml(text: str, where: str = "YAML") -> DalleTrainConfig:
    """A :class:`DalleTrainConfig` from YAML text with ``model:`` and ``train:`` sections."""
    return train_config_from_yaml(DalleTrainConfig, text, where)


def resolve_precision(precision: str, accelerator: str) -> str:
    """``precision``, with ``auto`` made ``bf16-mixed`` on a CUDA device that supports it, else ``32-true``."""
    if precision != "auto":
        return precision
    on_gpu = accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available()
    return "bf16-mixed" if on_gpu and torch.cuda.is_bf16_supported() else "32-true"


# --- the exported model ---------------------------------------------------------------------------


def save_dalle(model: DalleTransformer, path: str | Path) -> Path:
    """Write ``{"config": asdict(config), "state_dict": …}`` (CPU tensors) with ``torch.save``; return the path.

    The file loads with ``torch.load(weights_only=True)``; :func:`load_dalle` rebuilds the model.
    """
    return _write_dalle(model.config, model.state_dict(), path)


def _write_dalle(config: DalleConfig, state_dict: dict[str, torch.Tensor], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
    tmp = path.with_name(f".tmp-{path.name}")
    torch.save({"config": dataclasses.asdict(config), "state_dict": state}, tmp)
    tmp.replace(path)
    return path


def load_dalle(path: str | Path, map_location: str | torch.device = "cpu") -> DalleTransformer:
    """The :class:`DalleTransformer` saved by :func:`save_dalle` at ``path``, in eval mode.

    ``ValueError`` when the file is not such a checkpoint, or its config and weights do not fit.
    """
    saved = torch.load(path, map_location=map_location, weights_only=True)
    if not isinstance(saved, dict) or "config" not in saved or "state_dict" not in saved:
        raise ValueError(f"{path}: not a DALL-E file (expected a dict with 'config' and 'state_dict')")
    config = build(DalleConfig, dict(saved["config"]), where=f"{path} config")
    model = DalleTransformer(config)
    try:
        model.load_state_dict(saved["state_dict"])
    except RuntimeError as err:
        raise ValueError(f"{path}: the weights do not fit the saved config: {err}") from err
    return model.eval()


# --- training -------------------------------------------------------------------------------------


def train_dalle(
    config: DalleTrainConfig,
    *,
    bpe: Any,
    out_dir: str | Path,
    tokens_root: str | None = None,
    dvae_version: str | None = None,
    dataset: str | None = None,
    shards: Any = None,
    dvae_path: str | Path | None = None,
    tracking_uri: str | None = None,
    run_id: str | None = None,
    resume_from: str | Path | None = None,
    callbacks: list[Any] | None = None,
) -> dict[str, Any]:
    """Train the transformer on ``<tokens_root>/tokens/<dvae_version>/<dataset>`` (or ``shards``) and export it.

    ``bpe`` is the caption BPE: a ``tokenizers`` JSON path (:func:`~dalle_lightning.stages.bpe.load_bpe`)
    or a ``Tokenizer``; training captions are encoded with ``config.bpe_dropout``,
    sample-grid captions without. ``shards`` (a
    :class:`~dalle_lightning.data.token_stream.TokenShards`, e.g. tokens in
    memory) replaces ``tokens_root``/``dvae_version``/``dataset``. ``dvae_path``
    decodes the sample grids to pixels (without it each code is drawn as a
    colour). With ``tracking_uri`` and ``run_id`` the run's params, curves and
    sample grids go to that MLflow run. ``resume_from`` continues from a
    checkpoint of an earlier call with the same config. ``callbacks`` are added
    to the Trainer's.

    Returns ``{"checkpoint": last Lightning checkpoint, "model_path": the
    save_dalle export, "metrics": final logged metrics, "steps": global step}``.
    """
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint

    from dalle_lightning.data.token_stream import TokenStreamDataModule
    from dalle_lightning.stages.bpe import CaptionEncoder, load_bpe
    from dalle_lightning.training.dalle_module import DalleLightningModule, SampleGrid

    if shards is None:
        shards = _token_shards(tokens_root, dvae_version, dataset, config.model)
    if (tracking_uri is None) != (run_id is None):
        raise ValueError("give both tracking_uri and run_id to log to MLflow, or neither")
    model_config = config.model
    if shards.image_seq_len != model_config.image_len:
        raise ValueError(
            f"the tokens hold {shards.image_seq_len} codes per image, the model's grid_size="
            f"{model_config.grid_size} expects {model_config.image_len}"
        )
    tokenizer = load_bpe(str(bpe)) if isinstance(bpe, str | Path) else bpe
    encoder = CaptionEncoder(tokenizer, model_config.text_len, dropout=config.bpe_dropout)
    if encoder.vocab_size > model_config.text_vocab:
        raise ValueError(
            f"the BPE has {encoder.vocab_size} tokens, more than the model's text_vocab="
            f"{model_config.text_vocab}: set model.text_vocab to at least {encoder.vocab_size}"
        )
    if encoder.pad_id != model_config.text_pad_id:
        raise ValueError(
            f"the BPE pads with id {encoder.pad_id}, the model's text_pad_id is {model_config.text_pad_id}"
        )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    L.seed_everything(config.seed, workers=True, verbose=False)
    module = DalleLightningModule(
        model_config,
        lr=config.lr,
        lr_end=config.lr_end,
        warmup_steps=config.warmup_steps,
        lr_steps=config.lr_decay_steps,
        weight_decay=config.weight_decay,
        ema_decay=config.ema_decay,
        caption_dropout=config.caption_dropout,
        seed=config.seed,
        compile=config.compile,
    )
    data = TokenStreamDataModule(
        shards,
        encoder,
        config.batch_size,
        seed=config.seed,
        shuffle_buffer=config.shuffle_buffer,
        num_workers=config.num_workers,
    )
    logger: Any = False
    if tracking_uri is not None:
        from lightning.pytorch.loggers import MLFlowLogger

        logger = MLFlowLogger(tracking_uri=tracking_uri, run_id=run_id)
        logger.log_hyperparams(config.flat_params())
    checkpoints = out / "checkpoints"
    from dalle_lightning.training.progress import StepProgress

    trainer_callbacks = [
        ModelCheckpoint(
            dirpath=checkpoints,
            filename="step-{step:07d}",
            every_n_train_steps=config.checkpoint_every_n_steps,
            save_top_k=1,
            save_last=True,
            auto_insert_metric_name=False,
        ),
        StepProgress("dalle"),
        *(callbacks or []),
    ]
    grid = _sample_grid(config, shards, tokenizer, dvae_path, out / "samples", SampleGrid)
    if grid is not None:
        trainer_callbacks.append(grid)
    trainer = L.Trainer(
        max_steps=config.max_steps,
        accelerator=config.accelerator,
        devices=int(config.devices)
        if isinstance(config.devices, str) and config.devices.isdigit()
        else config.devices,
        num_nodes=config.num_nodes,
        strategy=_strategy(config.strategy),
        precision=resolve_precision(config.precision, config.accelerator),
        gradient_clip_val=config.grad_clip,
        gradient_clip_algorithm="norm",
        logger=logger,
        callbacks=trainer_callbacks,
        log_every_n_steps=config.log_every_n_steps,
        default_root_dir=out,
        enable_progress_bar=False,
        enable_model_summary=False,
        use_distributed_sampler=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
    )
    # the stream is endless (no epochs for Lightning): the data module resumes it at the checkpoint's step
    trainer.fit(module, datamodule=data, ckpt_path=str(resume_from) if resume_from is not None else None)
    last = checkpoints / "last.ckpt"
    trainer.save_checkpoint(last, weights_only=False)
    state = trainer.strategy.lightning_module_state_dict()  # every rank takes part (gathered under FSDP)
    model_path = out / "dalle.pt"
    if trainer.is_global_zero:
        prefix = "ema." if module.ema is not None else "model."
        _write_dalle(
            model_config, {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}, model_path
        )
    return {
        "checkpoint": str(last),
        "model_path": str(model_path),
        "metrics": {k: float(v) for k, v in trainer.callback_metrics.items()},
        "steps": trainer.global_step,
    }


def _strategy(name: str) -> Any:
    """The Lightning strategy: ``fsdp`` shards the transformer block by block; other names go to Lightning."""
    if name != "fsdp":
        return name
    from lightning.pytorch.strategies import FSDPStrategy

    from dalle_lightning.models.transformer import Block

    return FSDPStrategy(auto_wrap_policy={Block}, state_dict_type="full", sharding_strategy="FULL_SHARD")


def _sample_grid(
    config: DalleTrainConfig, shards: Any, tokenizer: Any, dvae_path: str | Path | None, out: Path, cls: type
) -> Any:
    """The :class:`SampleGrid` callback: fixed captions, or the first rows of the first shard with their images.

    ``None`` (no grids) when there are no fixed captions and the first shard is empty.
    """
    from dalle_lightning.stages.bpe import CaptionEncoder

    real = None
    captions = list(config.sample_captions)
    if not captions:
        first, codes = shards.read(0)
        captions = list(first[: config.sample_count])
        if not captions:
            return None
        real = torch.from_numpy(codes[: len(captions)].astype("int64"))
    dvae = None
    if dvae_path is not None:
        from dalle_lightning.models.dvae import load_dvae

        dvae = load_dvae(dvae_path)
        if dvae.config.grid_size != config.model.grid_size:
            raise ValueError(
                f"the dVAE {dvae_path} has a {dvae.config.grid_size}² grid, the model {config.model.grid_size}²"
            )
    encoder = CaptionEncoder(tokenizer, config.model.text_len)
    return cls(out, config.sample_every_n_steps, captions, encoder, real=real, dvae=dvae)


def _token_shards(root: str | None, dvae_version: str | None, dataset: str | None, model: DalleConfig) -> Any:
    """The tokens dataset's shards; ``ValueError`` when its recorded codebook does not fit the model."""
    import fsspec
    import pyarrow.parquet as pq

    from dalle_lightning.data.token_stream import ParquetTokenShards
    from data_schemas.tokens import token_metadata

    if not root or not dvae_version or not dataset:
        raise ValueError("give tokens_root, dvae_version and dataset (the tokens to train on), or shards")
    shards = ParquetTokenShards.from_dataset(root, dvae_version, dataset)
    fs, path = fsspec.core.url_to_fs(shards.paths[0])
    with fs.open(path, "rb") as f:
        recorded = token_metadata(pq.read_schema(f))
    if recorded is not None and recorded[2] > model.image_vocab:
        raise ValueError(
            f"the tokens come from a codebook of {recorded[2]} codes, more than the model's "
            f"image_vocab={model.image_vocab}: set model.image_vocab to at least {recorded[2]}"
        )
    return shards


def main(
    config_json: Annotated[Path, typer.Option(help="DalleTrainConfig.to_dict() as JSON")],
    tokens_root: Annotated[str, typer.Option(help="root of the datasets (holds tokens/<dvae>/<dataset>)")],
    dvae_version: Annotated[str, typer.Option(help="version of the dVAE whose tokens to train on")],
    dataset: Annotated[str, typer.Option(help="name of the tokens dataset")],
    bpe_path: Annotated[str, typer.Option(help="the caption BPE (tokenizers JSON)")],
    out_dir: Annotated[Path, typer.Option(help="checkpoints, samples and dalle.pt go here")],
    result_json: Annotated[Path, typer.Option(help="where rank 0 writes train_dalle's result")],
    dvae_path: Annotated[str | None, typer.Option(help="dVAE to decode sample grids with")] = None,
    tracking_uri: Annotated[str | None, typer.Option(help="MLflow tracking URI")] = None,
    run_id: Annotated[str | None, typer.Option(help="MLflow run to log to")] = None,
    resume_from: Annotated[str | None, typer.Option(help="Lightning checkpoint to resume from")] = None,
) -> None:
    """Train the transformer from a JSON config and write the result as JSON (the Prefect flow's training process)."""
    from lightning.fabric.utilities.rank_zero import _get_rank

    config = DalleTrainConfig.from_dict(json.loads(config_json.read_text()))
    result = train_dalle(
        config,
        bpe=bpe_path,
        tokens_root=tokens_root,
        dvae_version=dvae_version,
        dataset=dataset,
        out_dir=out_dir,
        dvae_path=dvae_path,
        tracking_uri=tracking_uri,
        run_id=run_id,
        resume_from=resume_from,
    )
    if (_get_rank() or 0) == 0:  # the launcher runs one process per device; rank 0 writes the result
        result_json.parent.mkdir(parents=True, exist_ok=True)
        result_json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    typer.run(main)
