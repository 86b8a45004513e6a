"""The dVAE as a LightningModule: loss, steps, optimiser and schedules (Ramesh et al. 2021, Appendix A.2).

Everything model-side lives in :mod:`dalle_lightning.models.dvae`; this module
only wires it to Lightning:

* the relaxation temperature τ and the KL weight β follow the config's
  cosine schedules by global step, and so does the learning rate;
* AdamW with β = (0.9, 0.999), ε = 1e-8 and weight decay 1e-4 (A.2);
* an optional exponential moving average of the parameters (``ema_decay``),
  kept as a submodule so that it is checkpointed and restored with the rest;
* the gumbel noise of step ``s`` on rank ``r`` comes from a generator seeded
  with (seed, r, s), so a run resumed from a checkpoint draws the same noise
  as an uninterrupted one.

Logged every step (Lightning thins them to ``log_every_n_steps``): the loss
terms, τ, β, the learning rate, PSNR of the relaxed reconstruction, the
fraction of the codebook used (argmax codes) in the batch and over the last
``usage_window`` steps, and the perplexity of the batch's codes.
"""

from __future__ import annotations

import copy
import math
from dataclasses import asdict
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from PIL import Image

from dalle_lightning.data.transforms import to_uint8
from dalle_lightning.models.dvae import DiscreteVAE, DVAEConfig
from dalle_lightning.models.schedules import cosine_schedule


def step_seed(seed: int, rank: int, step: int) -> int:
    """A 63-bit seed for the gumbel noise of ``step`` on ``rank``."""
    return int(np.random.SeedSequence([seed, rank, step]).generate_state(2, np.uint64)[0] >> np.uint64(1))


def psnr(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Peak signal-to-noise ratio in dB of images in [0, 1], over the whole batch."""
    mse = (x.float() - y.float()).pow(2).mean().clamp_min(1e-10)
    return -10.0 * torch.log10(mse)


class DVAELightningModule(L.LightningModule):
    """Trains a :class:`DiscreteVAE`; the exported model is the EMA copy when ``ema_decay`` is set."""

    def __init__(
        self,
        model: DVAEConfig | dict[str, Any],
        *,
        lr: float = 1e-4,
        lr_end: float = 1.25e-6,
        lr_steps: int = 1_200_000,
        weight_decay: float = 1e-4,
        ema_decay: float | None = None,
        seed: int = 0,
        usage_window: int = 100,
        decoder_finetune_from: int | None = None,
        decoder_finetune_lr: float = 1e-3,
    ) -> None:
        super().__init__()
        config = model if isinstance(model, DVAEConfig) else DVAEConfig(**model)
        if ema_decay is not None and not 0.0 < ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in (0, 1) or None, got {ema_decay!r}")
        if usage_window < 1:
            raise ValueError(f"usage_window must be >= 1, got {usage_window}")
        # plain values only, so that checkpoints load with torch.load(weights_only=True)
        self.save_hyperparameters(
            {
                "model": asdict(config),
                "lr": lr,
                "lr_end": lr_end,
                "lr_steps": lr_steps,
                "weight_decay": weight_decay,
                "ema_decay": ema_decay,
                "seed": seed,
                "usage_window": usage_window,
                "decoder_finetune_from": decoder_finetune_from,
                "decoder_finetune_lr": decoder_finetune_lr,
            }
        )
        self.model = DiscreteVAE(config)
        self.ema = copy.deepcopy(self.model).requires_grad_(False) if ema_decay is not None else None
        # global step at which each code was last the argmax of some cell (-inf: never)
        self.register_buffer("code_last_seen", torch.full((config.vocab_size,), -math.inf))

    @property
    def config(self) -> DVAEConfig:
        return self.model.config

    def export_model(self) -> DiscreteVAE:
        """The model to save and tokenize with: the EMA weights if kept, else the trained ones."""
        return self.ema if self.ema is not None else self.model

    def _decoder_phase(self, step: int) -> bool:
        start = self.hparams.decoder_finetune_from
        return start is not None and step >= start

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        x = batch.float().div(255.0) if batch.dtype == torch.uint8 else batch  # (B, 3, H, W)
        step = self.global_step
        if self._decoder_phase(step):
            # decoder only, from the tokens; the encoder gets no gradient, so AdamW leaves it alone
            loss, reconstruction = self.model.token_reconstruction_loss(x)
            lr = self.optimizers().param_groups[0]["lr"] if self._trainer else self.hparams.lr
            self.log_dict(
                {
                    "train/loss": loss,
                    "train/recon_loss": loss,
                    "train/lr": lr,
                    "train/psnr": psnr(reconstruction, x),
                }
            )
            return loss
        temperature, kl_weight = self.config.temperature(step), self.config.kl_weight(step)
        generator = torch.Generator(device=x.device)
        generator.manual_seed(step_seed(self.hparams.seed, self.global_rank, step))
        out = self.model(x, temperature, kl_weight, generator=generator)

        with torch.no_grad():
            codes = out.logits.argmax(dim=1)  # (B, h, w)
            counts = torch.bincount(codes.flatten(), minlength=self.config.vocab_size).float()  # (V,)
            used = counts > 0
            self.code_last_seen[used] = float(step)
            window = (self.code_last_seen > step - self.hparams.usage_window).float().mean()
            p = counts / counts.sum()
            perplexity = torch.exp(-(p[used] * p[used].log()).sum())
        self.log_dict(
            {
                "train/loss": out.loss,
                "train/recon_loss": out.recon_loss,
                "train/kl": out.kl,
                "train/diversity": out.diversity,
                "train/temperature": temperature,
                "train/kl_weight": kl_weight,
                "train/lr": self.optimizers().param_groups[0]["lr"] if self._trainer else self.hparams.lr,
                "train/psnr": psnr(out.reconstruction, x),
                "train/codebook_usage": used.float().mean(),
                "train/codebook_usage_window": window,
                "train/perplexity": perplexity,
            },
            prog_bar=False,
        )
        return out.loss

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.ema is None:
            return
        decay = self.hparams.ema_decay
        with torch.no_grad():
            for e, p in zip(self.ema.parameters(), self.model.parameters(), strict=True):
                e.lerp_(p.detach(), 1.0 - decay)

    def _lr_factor(self, step: int) -> float:
        """Learning rate at ``step`` over the peak: cosine-annealed, restarted for the decoder-only phase."""
        h = self.hparams
        if self._decoder_phase(step):
            start = h.decoder_finetune_from
            total = max(1, self.trainer.max_steps - start) if self._trainer else 1
            return cosine_schedule(step - start, total, h.decoder_finetune_lr, h.lr_end) / h.lr
        return cosine_schedule(step, h.lr_steps, h.lr, h.lr_end) / h.lr

    def configure_optimizers(self) -> dict[str, Any]:
        h = self.hparams
        optimizer = torch.optim.AdamW(
            self.model.parameters(), lr=h.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=h.weight_decay
        )
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, self._lr_factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


# --- reconstruction grids -------------------------------------------------------------------------


def reconstruction_grid(
    originals: torch.Tensor, reconstructions: torch.Tensor, scale: int = 1
) -> Image.Image:
    """One PIL image: ``originals`` (N, 3, H, W) in [0, 1] in the top row, ``reconstructions`` below."""
    if originals.shape != reconstructions.shape:
        raise ValueError(
            f"originals {tuple(originals.shape)} and reconstructions {tuple(reconstructions.shape)} differ"
        )
    rows = [np.concatenate(list(to_uint8(images)), axis=1) for images in (originals, reconstructions)]
    grid = Image.fromarray(np.concatenate(rows, axis=0))
    if scale > 1:
        grid = grid.resize((grid.width * scale, grid.height * scale), Image.Resampling.NEAREST)
    return grid


@torch.no_grad()
def reconstruct(model: DiscreteVAE, images: torch.Tensor) -> torch.Tensor:
    """decode(argmax codes(images)): what the transformer's tokens of ``images`` look like."""
    was_training = model.training
    model.eval()
    try:
        return model.decode_indices(model.get_codebook_indices(images))
    finally:
        model.train(was_training)


class ReconstructionGrid(L.Callback):
    """Every ``every_n_steps`` steps, write originals above their token reconstructions as a PNG.

    The originals are the first ``count`` images of the first training batch.
    Files go to ``out_dir/step-<step>.png``; with an MLflow logger they are also
    logged as images under the key ``reconstructions``.
    """

    def __init__(self, out_dir: str | Path, every_n_steps: int, count: int = 8) -> None:
        if every_n_steps < 1:
            raise ValueError(f"every_n_steps must be >= 1, got {every_n_steps}")
        self.out_dir = Path(out_dir)
        self.every_n_steps = every_n_steps
        self.count = count
        self.images: torch.Tensor | None = None
        self.written: list[Path] = []

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self.images is None:
            x = batch[: self.count]
            self.images = (x.float().div(255.0) if x.dtype == torch.uint8 else x).detach().clone()
        step = trainer.global_step
        if step % self.every_n_steps == 0 or step == trainer.max_steps:
            self.write(trainer, pl_module, step)

    def write(self, trainer: L.Trainer, pl_module: L.LightningModule, step: int) -> None:
        if not trainer.is_global_zero or self.images is None:
            return
        model = pl_module.export_model() if hasattr(pl_module, "export_model") else pl_module.model
        grid = reconstruction_grid(self.images, reconstruct(model, self.images).cpu(), scale=2)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        path = self.out_dir / f"step-{step:07d}.png"
        grid.save(path)
        self.written.append(path)
        for logger in trainer.loggers:
            if type(logger).__name__ == "MLFlowLogger":
                logger.experiment.log_image(logger.run_id, grid, key="reconstructions", step=step)
