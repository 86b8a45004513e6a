"""Training progress lines: one every few percent of the run, with the loss, on rank 0."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from dalle_lightning.training.progress import StepProgress

pytestmark = pytest.mark.timeout(30)


def test_a_line_every_ten_percent_and_at_the_end(capsys):
    trainer = SimpleNamespace(global_step=0, max_steps=25, global_rank=0, callback_metrics={})
    progress = StepProgress("dvae", every_percent=20)
    progress.on_train_start(trainer, None)
    for step in range(1, 26):
        trainer.global_step = step
        trainer.callback_metrics = {"train/loss": torch.tensor(1.0 / step)}
        progress.on_train_batch_end(trainer, None, None, None, step - 1)
    lines = capsys.readouterr().err.strip().splitlines()
    assert [line.split()[2] for line in lines] == ["5/25", "10/25", "15/25", "20/25", "25/25"]
    assert lines[0].startswith("dvae step 5/25 (20%) loss 0.2 ·")


def test_other_ranks_stay_quiet_and_bad_settings_are_errors(capsys):
    trainer = SimpleNamespace(global_step=0, max_steps=4, global_rank=1, callback_metrics={})
    progress = StepProgress("dalle")
    progress.on_train_start(trainer, None)
    for step in range(1, 5):
        trainer.global_step = step
        progress.on_train_batch_end(trainer, None, None, None, step - 1)
    assert capsys.readouterr().err == ""
    with pytest.raises(ValueError, match="every_percent"):
        StepProgress("x", every_percent=0)
