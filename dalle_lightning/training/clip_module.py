"""CLIP as a LightningModule: the contrastive loss, steps, optimiser and schedule (Radford et al. 2021, Sec. 2.5).

Everything model-side lives in :mod:`dalle_lightning.models.clip`; this module
only wires it to Lightning:

* AdamW with β = (0.9, 0.98), ε = 1e-6 (the paper's ViT settings, Table 19)
  and decoupled weight decay on the weight matrices only: gains, biases, the
  class token and the logit scale are not decayed (Sec. 2.5);
* the learning rate warms up linearly over ``warmup_steps``, then follows a
  cosine down to ``lr_end`` at ``lr_steps`` (Sec. 2.5);
* under DDP the image and text embeddings of all ranks are gathered (with
  their gradients), so every rank scores its pairs against the whole global
  batch, as the paper does; one device scores within its batch.

Logged every step (Lightning thins them to ``log_every_n_steps``): the loss,
the logit scale (1 / temperature), the learning rate and the in-batch
accuracy (the share of images whose own caption scores highest, and of
captions whose own image does, averaged).
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn

from dalle_lightning.models.clip import ClipConfig, ClipModel, contrastive_loss
from dalle_lightning.training.dalle_module import warmup_cosine

BETAS = (0.9, 0.98)
"""AdamW's β₁, β₂ (CLIP's ViTs, Radford et al. 2021, Table 19)."""
EPS = 1e-6
"""AdamW's ε (CLIP's ViTs)."""


def decay_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW parameter groups: tensors of two or more dimensions decayed; gains, biases and scalars not."""
    params = [p for p in model.parameters() if p.requires_grad]
    return [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]


def contrastive_loss_with_negatives(logits_per_image: torch.Tensor, negatives: torch.Tensor) -> torch.Tensor:
    """:func:`contrastive_loss` where each image is also scored against the hard negative captions
    (NegCLIP, Yuksekgonul et al. 2023): image → text over ``[logits ‖ negatives]`` (B, 2B), text → image
    as before. ``negatives[i, j]`` scores image ``i`` against negative caption ``j`` (``-inf``: none)."""
    labels = torch.arange(logits_per_image.shape[0], device=logits_per_image.device)
    image_to_text = F.cross_entropy(torch.cat([logits_per_image, negatives], dim=1), labels)
    return 0.5 * (image_to_text + F.cross_entropy(logits_per_image.T, labels))


def in_batch_accuracy(logits_per_image: torch.Tensor) -> torch.Tensor:
    """Mean of image→text and text→image top-1 accuracy over a batch of matching pairs (B, B)."""
    labels = torch.arange(logits_per_image.shape[0], device=logits_per_image.device)
    image_to_text = (logits_per_image.argmax(dim=1) == labels).float().mean()
    text_to_image = (logits_per_image.argmax(dim=0) == labels).float().mean()
    return (image_to_text + text_to_image) / 2


class ClipLightningModule(L.LightningModule):
    """Trains a :class:`ClipModel` on batches of (images uint8 or in [0, 1], caption ids)."""

    def __init__(
        self,
        model: ClipConfig | dict[str, Any],
        *,
        lr: float = 5e-4,
        lr_end: float = 0.0,
        warmup_steps: int = 2000,
        lr_steps: int = 100_000,
        weight_decay: float = 0.2,
    ) -> None:
        super().__init__()
        config = model if isinstance(model, ClipConfig) else ClipConfig(**model)
        # plain values only, so that checkpoints load with torch.load(weights_only=True)
        self.save_hyperparameters(
            {
                "model": asdict(config),
                "lr": lr,
                "lr_end": lr_end,
                "warmup_steps": warmup_steps,
                "lr_steps": lr_steps,
                "weight_decay": weight_decay,
            }
        )
        self.model = ClipModel(config)

    @property
    def config(self) -> ClipConfig:
        return self.model.config

    def _gather(self, features: torch.Tensor) -> torch.Tensor:
        """``features`` (B, D) of every rank as (world · B, D), gradients flowing back to each rank's own."""
        if self._trainer is None or self.trainer.world_size == 1:
            return features
        return self.all_gather(features, sync_grads=True).flatten(0, 1)

    def training_step(self, batch: tuple[torch.Tensor, ...], batch_idx: int) -> torch.Tensor:
        images, ids = batch[:2]  # (B, 3, S, S), (B, L)
        image_features = self._gather(self.model.encode_image(images))
        text_features = self._gather(self.model.encode_text(ids))
        logits = self.model.logits(image_features, text_features)  # (world · B, world · B)
        if len(batch) == 4:  # hard negative captions (B, L) and which rows have one (B,)
            negative_features = self._gather(self.model.encode_text(batch[2]))
            has_negative = self._gather(batch[3])
            negatives = self.model.logits(image_features, negative_features)  # (world · B, world · B)
            negatives = negatives.masked_fill(~has_negative.bool()[None, :], float("-inf"))
            loss = contrastive_loss_with_negatives(logits, negatives)
        else:
            loss = contrastive_loss(logits)
        lr = self.optimizers().param_groups[0]["lr"] if self._trainer else self.hparams.lr
        self.log_dict(
            {
                "train/loss": loss,
                "train/logit_scale": self.model.scale().detach(),
                "train/accuracy": in_batch_accuracy(logits.detach()),
                "train/lr": lr,
            }
        )
        return loss

    def _lr_factor(self, step: int) -> float:
        h = self.hparams
        return warmup_cosine(step, h.warmup_steps, h.lr_steps, h.lr, h.lr_end) / h.lr

    def configure_optimizers(self) -> dict[str, Any]:
        h = self.hparams
        optimizer = torch.optim.AdamW(decay_groups(self.model, h.weight_decay), lr=h.lr, betas=BETAS, eps=EPS)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, self._lr_factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
