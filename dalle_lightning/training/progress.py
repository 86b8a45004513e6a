"""A progress line every few percent of training, for logs that are not a terminal.

Lightning's bar redraws one line, which a Prefect log or a CI log shows as
noise or not at all; training here runs as a subprocess of a flow, so a
plain line every ``every_percent`` of ``max_steps`` (rank 0 only) is what a
user watching the flow sees.
"""

from __future__ import annotations

import sys
import time
from typing import Any

import lightning as L


class StepProgress(L.Callback):
    """Prints ``<name> step S/N (P%) loss L · T s elapsed, ~R s left`` every ``every_percent`` of the run."""

    def __init__(self, name: str, every_percent: float = 10.0, metric: str = "train/loss") -> None:
        if not 0 < every_percent <= 100:
            raise ValueError(f"every_percent must be in (0, 100], got {every_percent!r}")
        self.name, self.every_percent, self.metric = name, every_percent, metric
        self._start = 0.0
        self._first_step = 0
        self._next = 0

    def on_train_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self._start = time.monotonic()
        self._first_step = trainer.global_step
        self._next = self._threshold(trainer, trainer.global_step)

    def _threshold(self, trainer: L.Trainer, step: int) -> int:
        """The first step past ``step`` at a multiple of ``every_percent`` of ``max_steps``."""
        stride = max(1, round(trainer.max_steps * self.every_percent / 100))
        return (step // stride + 1) * stride

    def on_train_batch_end(
        self, trainer: L.Trainer, module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        if step < self._next and step < trainer.max_steps:
            return
        self._next = self._threshold(trainer, step)
        if trainer.global_rank != 0:
            return
        elapsed = time.monotonic() - self._start
        done = step - self._first_step
        left = elapsed / done * (trainer.max_steps - step) if done else float("nan")
        loss = trainer.callback_metrics.get(self.metric)
        loss_text = f" {self.metric.split('/')[-1]} {float(loss):.4g}" if loss is not None else ""
        print(
            f"{self.name} step {step}/{trainer.max_steps} ({100 * step / trainer.max_steps:.0f}%)"
            f"{loss_text} · {elapsed:.0f} s elapsed, ~{left:.0f} s left",
            file=sys.stderr,
            flush=True,
        )
