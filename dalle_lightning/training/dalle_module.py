"""The DALL-E transformer as a LightningModule: loss, steps, optimiser and schedule (Ramesh et al. 2021, B.2).

Everything model-side lives in :mod:`dalle_lightning.models.transformer`; this
module only wires it to Lightning:

* AdamW with β = (0.9, 0.96), ε = 1e-8 (B.2) and decoupled weight decay on the
  weight matrices of the linear layers only (attention, MLP and the two heads);
  embeddings, the start token, LayerNorm gains and every bias are not decayed
  (as minGPT / nanoGPT do);
* the learning rate warms up linearly over ``warmup_steps``, then
  follows a cosine from ``lr`` down to ``lr_end`` at ``lr_steps`` and holds it
  (the paper warms up over 5,000 updates, then halves on plateaus; a cosine
  needs no watching). Gradient-norm clipping is the Trainer's
  ``gradient_clip_val`` (paper: 4);
* caption dropout for classifier-free guidance: with probability
  ``caption_dropout`` a sample's caption becomes all pad tokens (the null
  caption that :func:`~dalle_lightning.generation.sampling.sample_image_tokens`
  feeds for the unconditional pass). BPE dropout is the training encoder's,
  in the data stream;
* an optional exponential moving average of the parameters (``ema_decay``),
  a submodule so that it is checkpointed and restored with the rest;
* the random draws of step ``s`` on rank ``r`` (caption dropout, and the
  model's dropout through torch's default generator) come from seeds made of
  (seed, r, s), so a run resumed from a checkpoint draws what an uninterrupted
  one would have.

Logged every step (Lightning thins them to ``log_every_n_steps``): the loss,
the text and image losses (means over all ranks), the learning rate, the
share of captions dropped, and the throughput in tokens/s and model TFLOP/s
(all ranks; from the end of one step to the end of the next optimiser step, so waiting for data
counts and the sample grids and checkpoints do not).
:class:`SampleGrid` draws images for fixed captions every N steps.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from torch import nn

from dalle_lightning.generation.sampling import SamplingConfig, decode_to_images, sample_image_tokens
from dalle_lightning.image_grid import image_grid
from dalle_lightning.models.dvae import DiscreteVAE
from dalle_lightning.models.schedules import cosine_schedule
from dalle_lightning.models.transformer import DalleConfig, DalleTransformer

BETAS = (0.9, 0.96)
"""AdamW's β₁, β₂ (paper, B.2)."""
EPS = 1e-8
"""AdamW's ε (paper, B.2)."""
_CAPTION_TAG = 0xCA9  # keeps the caption-dropout draws apart from the model-dropout ones of a step


def step_seed(seed: int, rank: int, step: int, *tag: int) -> int:
    """A 63-bit seed for the random draws of ``step`` on ``rank`` (``tag`` tells kinds of draws apart)."""
    state = np.random.SeedSequence([seed, rank, step, *tag]).generate_state(2, np.uint64)[0]
    return int(state >> np.uint64(1))


def warmup_cosine(step: int, warmup: int, total: int, start: float, end: float) -> float:
    """Learning rate at ``step``: ``start · (step + 1) / (warmup + 1)`` in warmup, then a cosine to ``end`` at ``total``.

    The first update already moves (nanoGPT's warmup); ``start`` is reached at
    step ``warmup``, ``end`` at ``total`` and held after.
    """
    if step < warmup:
        return start * (step + 1) / (warmup + 1)
    return cosine_schedule(step - warmup, max(0, total - warmup), start, end)


def decay_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW parameter groups: linear layers' weight matrices decayed, everything else not."""
    decayed = {id(m.weight) for m in model.modules() if isinstance(m, nn.Linear)}  # attention, MLP, heads
    params = [p for p in model.parameters() if p.requires_grad]
    return [
        {"params": [p for p in params if id(p) in decayed], "weight_decay": weight_decay},
        {"params": [p for p in params if id(p) not in decayed], "weight_decay": 0.0},
    ]


class DalleLightningModule(L.LightningModule):
    """Trains a :class:`DalleTransformer`; the exported model is the EMA copy when ``ema_decay`` is set."""

    def __init__(
        self,
        model: DalleConfig | dict[str, Any],
        *,
        lr: float = 4.5e-4,
        lr_end: float = 4.5e-5,
        warmup_steps: int = 5000,
        lr_steps: int = 430_000,
        weight_decay: float = 4.5e-2,
        ema_decay: float | None = None,
        caption_dropout: float = 0.0,
        seed: int = 0,
        compile: bool = False,
    ) -> None:
        super().__init__()
        config = model if isinstance(model, DalleConfig) else DalleConfig(**model)
        if ema_decay is not None and not 0.0 < ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in (0, 1) or None, got {ema_decay!r}")
        if not 0.0 <= caption_dropout < 1.0:
            raise ValueError(f"caption_dropout must be in [0, 1), got {caption_dropout!r}")
        # plain values only, so that checkpoints load with torch.load(weights_only=True)
        self.save_hyperparameters(
            {
                "model": asdict(config),
                "lr": lr,
                "lr_end": lr_end,
                "warmup_steps": warmup_steps,
                "lr_steps": lr_steps,
                "weight_decay": weight_decay,
                "ema_decay": ema_decay,
                "caption_dropout": caption_dropout,
                "seed": seed,
                "compile": compile,
            }
        )
        self.model = DalleTransformer(config)
        self.ema = copy.deepcopy(self.model).requires_grad_(False) if ema_decay is not None else None
        self._last_batch_end: float | None = None
        self._step_end: float | None = None

    @property
    def config(self) -> DalleConfig:
        return self.model.config

    def export_model(self) -> DalleTransformer:
        """The model to save and sample with: the EMA weights if kept, else the trained ones."""
        return self.ema if self.ema is not None else self.model

    def configure_model(self) -> None:
        if self.hparams.compile:
            self.model.compile()  # in place: the state-dict keys stay those of the plain model

    def drop_captions(self, text: torch.Tensor, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``text`` (B, L) with each caption replaced by all pads with probability ``caption_dropout``.

        The draws of step ``step`` on this rank are seeded by (seed, rank, step);
        returns the new text and the boolean mask (B,) of dropped captions.
        """
        p = self.hparams.caption_dropout
        if p == 0.0:
            return text, torch.zeros(text.shape[0], dtype=torch.bool, device=text.device)
        seed = step_seed(self.hparams.seed, self.global_rank, step, _CAPTION_TAG)
        generator = torch.Generator().manual_seed(seed)
        dropped = (torch.rand(text.shape[0], generator=generator) < p).to(text.device)  # (B,)
        return torch.where(dropped[:, None], self.config.text_pad_id, text), dropped

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        # the model's dropout draws from the default generator: reseed it per step for exact resumes
        if self.config.dropout > 0:
            torch.manual_seed(step_seed(self.hparams.seed, self.global_rank, self.global_step))

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        text, image = batch  # (B, L), (B, N)
        text, dropped = self.drop_captions(text, self.global_step)
        out = self.model(text, image)
        self.log_dict(
            {"train/loss": out.loss, "train/text_loss": out.text_loss, "train/image_loss": out.image_loss},
            sync_dist=True,
        )
        self.log_dict(
            {
                "train/lr": self.optimizers().param_groups[0]["lr"] if self._trainer else self.hparams.lr,
                "train/captions_dropped": dropped.float().mean(),
            }
        )
        return out.loss

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        super().optimizer_step(*args, **kwargs)
        self._step_end = time.perf_counter()

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.ema is not None:
            decay = self.hparams.ema_decay
            with torch.no_grad():
                for e, p in zip(self.ema.parameters(), self.model.parameters(), strict=True):
                    e.lerp_(p.detach(), 1.0 - decay)
        # throughput over (the end of the last step's hooks, the end of this optimiser step]: waiting for data
        # and compute count, the callbacks (sample grids, checkpoints, which Lightning runs before this hook)
        # do not. Not synchronised with the GPU: read it over many steps.
        if self._last_batch_end is not None and self._step_end is not None:
            tokens = batch[0].shape[0] * self.config.seq_len * self.trainer.world_size
            per_second = tokens / max(self._step_end - self._last_batch_end, 1e-9)
            self.log_dict(
                {
                    "train/tokens_per_sec": per_second,
                    "train/model_tflops": per_second * self.model.flops_per_token() / 1e12,
                }
            )
        self._last_batch_end = time.perf_counter()

    def on_train_start(self) -> None:
        self._last_batch_end = self._step_end = None

    def configure_optimizers(self) -> dict[str, Any]:
        h = self.hparams
        optimizer = torch.optim.AdamW(
            decay_groups(self.model, h.weight_decay),
            lr=h.lr,
            betas=BETAS,
            eps=EPS,
            weight_decay=h.weight_decay,
        )
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer,
            lambda step: warmup_cosine(step, h.warmup_steps, h.lr_steps, h.lr, h.lr_end) / h.lr,
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


# --- sample grids ---------------------------------------------------------------------------------


def token_palette(vocab: int, seed: int = 0) -> np.ndarray:
    """A fixed colour (uint8 RGB) per image token: a token grid drawn with it shows the codes' layout."""
    return np.random.default_rng(seed).integers(0, 256, size=(vocab, 3), dtype=np.uint8)


def token_images(tokens: torch.Tensor, grid: int, vocab: int) -> np.ndarray:
    """Image tokens (N, grid²) as uint8 pictures (N, grid, grid, 3), one palette colour per code."""
    codes = tokens.reshape(-1, grid, grid).cpu().numpy()
    return token_palette(vocab)[codes]


class SampleGrid(L.Callback):
    """Every ``every_n_steps`` steps, draw images for fixed captions and write them as a PNG grid.

    ``captions`` are encoded with ``encoder`` (the deterministic one). With a
    dVAE the sampled tokens are decoded to pixels, otherwise each code is drawn
    as a palette colour. ``real`` (image tokens (N, grid²) of the captions, when
    they come from the data) adds the real images as the top row. Files go to
    ``out_dir/step-<step>.png``; with an MLflow logger they are also logged as
    images under the key ``samples``. Sampling runs on rank 0 only, with a fixed
    seed; under FSDP no grids are drawn (every rank would have to take part).
    """

    def __init__(
        self,
        out_dir: str | Path,
        every_n_steps: int,
        captions: Sequence[str],
        encoder: Any,
        *,
        real: torch.Tensor | None = None,
        dvae: DiscreteVAE | None = None,
        sampling: SamplingConfig | None = None,
    ) -> None:
        if every_n_steps < 1:
            raise ValueError(f"every_n_steps must be >= 1, got {every_n_steps}")
        if not captions:
            raise ValueError("captions is empty: a sample grid needs at least one caption")
        if real is not None and len(real) != len(captions):
            raise ValueError(f"real has {len(real)} token grids for {len(captions)} captions")
        self.out_dir = Path(out_dir)
        self.every_n_steps = every_n_steps
        self.captions = list(captions)
        self.text = torch.from_numpy(encoder.encode_batch(self.captions)[0])  # (N, L)
        self.real = real
        self.dvae = dvae.eval() if dvae is not None else None
        self.sampling = sampling or SamplingConfig(temperature=1.0, seed=0)
        self.written: list[Path] = []

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.is_global_zero and trainer.global_step == 0:
            for logger in trainer.loggers:
                if type(logger).__name__ == "MLFlowLogger":
                    logger.experiment.log_text(
                        logger.run_id, "\n".join(self.captions), "samples/captions.txt"
                    )

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        if step % self.every_n_steps == 0 or step == trainer.max_steps:
            self.write(trainer, pl_module, step)

    def pictures(self, tokens: torch.Tensor, grid: int, vocab: int) -> np.ndarray:
        """Image tokens (N, grid²) as uint8 pictures: decoded by the dVAE if there is one."""
        if self.dvae is None:
            return token_images(tokens, grid, vocab)
        from dalle_lightning.data.transforms import to_uint8

        return to_uint8(decode_to_images(self.dvae, tokens.cpu()))

    def write(self, trainer: L.Trainer, pl_module: L.LightningModule, step: int) -> None:
        if not trainer.is_global_zero or "FSDP" in type(trainer.strategy).__name__:
            return
        model = pl_module.export_model()
        tokens = sample_image_tokens(model, self.text, self.sampling)  # (N, grid²)
        config = model.config
        rows = [self.pictures(tokens, config.grid_size, config.image_vocab)]
        if self.real is not None:
            rows.insert(0, self.pictures(self.real, config.grid_size, config.image_vocab))
        size = rows[0].shape[1]
        picture = image_grid(rows, scale=max(1, 64 // size))
        self.out_dir.mkdir(parents=True, exist_ok=True)
        path = self.out_dir / f"step-{step:07d}.png"
        picture.save(path)
        self.written.append(path)
        for logger in trainer.loggers:
            if type(logger).__name__ == "MLFlowLogger":
                logger.experiment.log_image(logger.run_id, picture, key="samples", step=step)
