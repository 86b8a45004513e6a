"""Train a CLIP: :class:`ClipTrainConfig`, the named presets, :func:`train_clip` and a process entry point.

A training run reads the ``filter`` images and captions (or pairs in memory),
encodes the captions with the caption BPE, trains with Lightning on whatever
the config asks for (CPU, one GPU, DDP over many, with the negatives gathered
over all ranks), writes checkpoints that resume exactly (weights, optimiser,
schedule, data position), exports the model with
:func:`~dalle_lightning.models.clip.save_clip` (the BPE inside) and, given an
MLflow run, logs the config and the curves to it.

The entry point lets a Prefect task start training as its own process, so
that Lightning's launcher can spawn one process per device::

    python -m dalle_lightning.training.clip_train --config-json CONFIG.json \\
        --data-root ./data --dataset demo --bpe-path tokenizer.json --out-dir runs/clip \\
        [--tracking-uri sqlite:///mlruns.db --run-id RUN] [--resume-from CKPT] --result-json OUT.json
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import typer

from dalle_lightning.config_overrides import build, load_train_preset, train_config_from_yaml
from dalle_lightning.models.clip import ClipConfig

PRESETS = ("tiny", "small", "tiny_search")
PRECISIONS = ("32-true", "32", "16-mixed", "bf16-mixed", "bf16-true", "64-true")


@dataclass
class ClipTrainConfig:
    """A CLIP training run: the model and how to train it (Radford et al. 2021, Sec. 2.5 and Table 19)."""

    model: ClipConfig = field(default_factory=ClipConfig)
    """Sizes of the two encoders, the embedding and the temperature."""
    max_steps: int = 100_000
    """Optimiser updates to train for."""
    batch_size: int = 256
    """(image, caption) pairs per batch on each device; under DDP each pair meets the negatives of all
    ranks (paper: 32,768 in all)."""
    lr: float = 5e-4
    """Peak learning rate of AdamW (paper: 5e-4 for ViT-B)."""
    warmup_steps: int = 2000
    """Updates over which the learning rate rises linearly to ``lr`` (paper: 2,000)."""
    lr_end: float = 0.0
    """Learning rate at ``lr_steps``, after a cosine decay from ``lr`` (paper: 0)."""
    lr_steps: int | None = None
    """Update at which the cosine decay reaches ``lr_end``; ``None``: ``max_steps``."""
    weight_decay: float = 0.2
    """AdamW's decoupled weight decay on the weight matrices (paper: 0.2); not on gains, biases, scalars."""
    grad_clip: float | None = None
    """Clip the gradient norm to this; ``None``: no clipping (the paper does not clip)."""
    bpe_dropout: float = 0.0
    """Probability of skipping each BPE merge when encoding a training caption (0: the plain encoding)."""
    object_captions: float = 0.0
    """Probability of training an image with a short caption naming one object of its ``shapes`` caption
    ("a red circle") instead of the whole caption, so that short search queries match
    (:class:`~dalle_lightning.training.clip_captions.ObjectCaptions`); captions it cannot read are kept."""
    object_caption_size_words: float = 0.5
    """Probability that such a short caption keeps the object's size word ("a large red circle"); fewer
    size words leave shape as the cue that tells a batch's captions apart, so shape is learned sooner."""
    shape_negatives: bool = False
    """Score each image also against its caption with one object's shape word swapped (a hard negative,
    NegCLIP; :func:`~dalle_lightning.training.clip_captions.swapped_shape`): without it a small batch
    of ``shapes`` scenes is told apart by colour, size and position, and shape is never learned."""
    crop_min_scale: float = 1.0
    """Random crops take this share of an image's short side or more (1: position only, which keeps every
    object a caption names in the picture)."""
    shuffle_buffer: int = 1000
    """Rows in the buffer that mixes rows of neighbouring shards (0: shard-by-shard order only)."""
    num_workers: int = 1
    """Data-loader worker processes per device (0: load in the training process)."""
    seed: int = 0
    """Seeds the initial weights, the data order, the crops and BPE dropout."""
    precision: str = "32-true"
    """Lightning precision: ``32-true``, ``bf16-mixed``, ``16-mixed``…"""
    accelerator: str = "auto"
    """Lightning accelerator: ``cpu``, ``gpu``, ``auto``."""
    devices: int | str = "auto"
    """Devices per node (an integer or ``auto``); several run DDP ranks."""
    num_nodes: int = 1
    """Machines to train on (with a multi-node launcher such as torchrun or Slurm)."""
    strategy: str = "auto"
    """Lightning strategy: ``auto`` (DDP on several devices), ``ddp``…"""
    log_every_n_steps: int = 50
    """Steps between logged metric values."""
    checkpoint_every_n_steps: int = 1000
    """Steps between checkpoints (a final one is always written)."""

    def __post_init__(self) -> None:
        if not isinstance(self.model, ClipConfig):
            raise ValueError(f"model must be a ClipConfig, got {type(self.model).__name__}")
        for name in ("max_steps", "batch_size", "log_every_n_steps", "checkpoint_every_n_steps", "num_nodes"):
            _check_int(name, getattr(self, name), 1)
        for name in ("warmup_steps", "seed", "num_workers", "shuffle_buffer"):
            _check_int(name, getattr(self, name), 0)
        if self.lr_steps is not None:
            _check_int("lr_steps", self.lr_steps, 0)
        for name in (
            "lr",
            "lr_end",
            "weight_decay",
            "bpe_dropout",
            "object_captions",
            "object_caption_size_words",
            "crop_min_scale",
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ValueError(f"{name} must be a number, got {value!r}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr!r}")
        if not 0 <= self.lr_end <= self.lr:
            raise ValueError(f"lr_end must be in [0, lr={self.lr}], got {self.lr_end!r}")
        if not self.weight_decay >= 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay!r}")
        if self.grad_clip is not None and (
            isinstance(self.grad_clip, bool)
            or not isinstance(self.grad_clip, int | float)
            or self.grad_clip <= 0
        ):
            raise ValueError(f"grad_clip must be a number > 0 or null, got {self.grad_clip!r}")
        if not 0.0 <= self.bpe_dropout < 1.0:
            raise ValueError(f"bpe_dropout must be in [0, 1), got {self.bpe_dropout!r}")
        if not isinstance(self.shape_negatives, bool):
            raise ValueError(f"shape_negatives must be true or false, got {self.shape_negatives!r}")
        for name in ("object_captions", "object_caption_size_words"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)!r}")
        if not 0.0 < self.crop_min_scale <= 1.0:
            raise ValueError(f"crop_min_scale must be in (0, 1], got {self.crop_min_scale!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if isinstance(self.devices, str) and self.devices != "auto" and not self.devices.isdigit():
            raise ValueError(f"devices must be a positive integer or 'auto', got {self.devices!r}")

    @property
    def lr_decay_steps(self) -> int:
        """``lr_steps``, or ``max_steps`` when it is ``None``."""
        return self.max_steps if self.lr_steps is None else self.lr_steps

    def to_dict(self) -> dict[str, Any]:
        """Plain values (JSON- and YAML-safe); :meth:`from_dict` reads them back."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> ClipTrainConfig:
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


def load_preset(name: str) -> ClipTrainConfig:
    """The checked-in preset ``dalle_lightning/presets/clip/<name>.yaml`` (``tiny``, ``small``, ``tiny_search``).

    The YAML has a ``model:`` section (:class:`ClipConfig` fields) and a
    ``train:`` section (the other :class:`ClipTrainConfig` fields); unknown
    sections or fields are a ``ValueError``.
    """
    return load_train_preset(ClipTrainConfig, "clip", "CLIP", name, PRESETS)


def config_from_yaml(text: str, where: str = "YAML") -> ClipTrainConfig:
    """A :class:`ClipTrainConfig` from YAML text with ``model:`` and ``train:`` sections."""
    return train_config_from_yaml(ClipTrainConfig, text, where)


def train_clip(
    config: ClipTrainConfig,
    *,
    bpe: Any,
    out_dir: str | Path,
    data_root: str | None = None,
    dataset: str | None = None,
    shards: Any = None,
    tracking_uri: str | None = None,
    run_id: str | None = None,
    resume_from: str | Path | None = None,
    callbacks: list[Any] | None = None,
) -> dict[str, Any]:
    """Train a CLIP on ``<data_root>/filter/<dataset>`` (or on ``shards``) and export it.

    ``bpe`` is the caption BPE: a ``tokenizers`` JSON path
    (:func:`~dalle_lightning.stages.bpe.load_bpe`) or a ``Tokenizer``; it must
    fit in ``config.model.text_vocab``. ``shards`` (a
    :class:`~dalle_lightning.data.pair_stream.PairShards`, e.g. pairs in
    memory) replaces ``data_root``/``dataset``. With ``tracking_uri`` and
    ``run_id`` the run's params and curves go to that MLflow run.
    ``resume_from`` continues from a checkpoint of an earlier call with the
    same config. ``callbacks`` are added to the Trainer's.

    Returns ``{"checkpoint": last Lightning checkpoint, "model_path": the
    save_clip export, "metrics": final logged metrics, "steps": global step}``.
    """
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint

    from dalle_lightning.data.pair_stream import PairStreamDataModule
    from dalle_lightning.models.clip import save_clip
    from dalle_lightning.stages.bpe import CaptionEncoder, load_bpe
    from dalle_lightning.training.clip_captions import ObjectCaptions, swapped_shape
    from dalle_lightning.training.clip_module import ClipLightningModule

    if shards is None:
        shards = _pair_shards(data_root, dataset)
    if (tracking_uri is None) != (run_id is None):
        raise ValueError("give both tracking_uri and run_id to log to MLflow, or neither")
    model_config = config.model
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
    module = ClipLightningModule(
        model_config,
        lr=config.lr,
        lr_end=config.lr_end,
        warmup_steps=config.warmup_steps,
        lr_steps=config.lr_decay_steps,
        weight_decay=config.weight_decay,
    )
    data = PairStreamDataModule(
        shards,
        encoder,
        model_config.image_size,
        config.batch_size,
        seed=config.seed,
        min_scale=config.crop_min_scale,
        shuffle_buffer=config.shuffle_buffer,
        num_workers=config.num_workers,
        caption_transform=ObjectCaptions(config.object_captions, config.object_caption_size_words)
        if config.object_captions > 0
        else None,
        negative_caption=swapped_shape if config.shape_negatives else None,
    )
    logger: Any = False
    if tracking_uri is not None:
        from lightning.pytorch.loggers import MLFlowLogger

        logger = MLFlowLogger(tracking_uri=tracking_uri, run_id=run_id)
        logger.log_hyperparams(config.flat_params())
    checkpoints = out / "checkpoints"
    trainer = L.Trainer(
        max_steps=config.max_steps,
        accelerator=config.accelerator,
        devices=int(config.devices)
        if isinstance(config.devices, str) and config.devices.isdigit()
        else config.devices,
        num_nodes=config.num_nodes,
        strategy=config.strategy,
        precision=config.precision,
        gradient_clip_val=config.grad_clip,
        gradient_clip_algorithm="norm",
        logger=logger,
        callbacks=[
            ModelCheckpoint(
                dirpath=checkpoints,
                filename="step-{step:07d}",
                every_n_train_steps=config.checkpoint_every_n_steps,
                save_top_k=1,
                save_last=True,
                auto_insert_metric_name=False,
            ),
            *(callbacks or []),
        ],
        log_every_n_steps=config.log_every_n_steps,
        default_root_dir=out,
        enable_progress_bar=False,
        enable_model_summary=False,
        use_distributed_sampler=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
    )
    with warnings.catch_warnings():  # the stream resumes mid-"epoch" by itself (PairStreamDataModule)
        warnings.filterwarnings(
            "ignore", message=".*resuming from a checkpoint that ended before the epoch.*"
        )
        trainer.fit(module, datamodule=data, ckpt_path=str(resume_from) if resume_from is not None else None)
    last = checkpoints / "last.ckpt"
    trainer.save_checkpoint(last, weights_only=False)  # everything a resume needs
    model_path = out / "clip.pt"
    if trainer.is_global_zero:
        save_clip(module.model, model_path, tokenizer)
    return {
        "checkpoint": str(last),
        "model_path": str(model_path),
        "metrics": {k: float(v) for k, v in trainer.callback_metrics.items()},
        "steps": trainer.global_step,
    }


def _pair_shards(data_root: str | None, dataset: str | None) -> Any:
    from dalle_lightning.data.pair_stream import ParquetPairShards

    if not data_root or not dataset:
        raise ValueError("give data_root and dataset (the filtered dataset to train on), or shards")
    return ParquetPairShards.from_dataset(data_root, dataset)


def main(
    config_json: Annotated[Path, typer.Option(help="ClipTrainConfig.to_dict() as JSON")],
    data_root: Annotated[str, typer.Option(help="root of the datasets")],
    dataset: Annotated[str, typer.Option(help="name of the filtered dataset to train on")],
    bpe_path: Annotated[str, typer.Option(help="the caption BPE (tokenizers JSON)")],
    out_dir: Annotated[Path, typer.Option(help="checkpoints and clip.pt go here")],
    result_json: Annotated[Path, typer.Option(help="where rank 0 writes train_clip's result")],
    tracking_uri: Annotated[str | None, typer.Option(help="MLflow tracking URI")] = None,
    run_id: Annotated[str | None, typer.Option(help="MLflow run to log to")] = None,
    resume_from: Annotated[str | None, typer.Option(help="Lightning checkpoint to resume from")] = None,
) -> None:
    """Train a CLIP from a JSON config and write the result as JSON (the Prefect flow's training process)."""
    from lightning.fabric.utilities.rank_zero import _get_rank

    config = ClipTrainConfig.from_dict(json.loads(config_json.read_text()))
    result = train_clip(
        config,
        bpe=bpe_path,
        data_root=data_root,
        dataset=dataset,
        out_dir=out_dir,
        tracking_uri=tracking_uri,
        run_id=run_id,
        resume_from=resume_from,
    )
    if (_get_rank() or 0) == 0:  # the launcher runs one process per device; rank 0 writes the result
        result_json.parent.mkdir(parents=True, exist_ok=True)
        result_json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    typer.run(main)
