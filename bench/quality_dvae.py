"""dVAE quality on ``shapes``: the ``tiny`` preset trained for a fixed CPU budget, scored by the exact checker.

    .venv/bin/python -m bench.quality_dvae --threads 1     # 240 CPU-seconds of training
    .venv/bin/python -m bench.quality_dvae --budget-s 60   # a quick look
    .venv/bin/python -m bench.quality_dvae --set model.image_size=64 --set model.group_count=3 --set model.n_hid=16
    .venv/bin/python -m bench.quality_dvae --n-train 64 --score-train --steps 1500  # overfit, as the learning test

Renders ``n_train`` images of the ``train`` split at the preset's size and
``n_eval`` other images (seed + 1, both splits) for scoring, each round-tripped
through JPEG quality 95 as the downloader stores them. Times `train_dvae` updates (CPU
time, steadier than wall time on a shared machine) to turn the CPU budget into
a number of steps (the preset's schedules are
stretched to it), trains with :func:`~dalle_lightning.training.dvae_train.train_dvae`,
then reconstructs every held-out image from its tokens,
``decode_indices(get_codebook_indices(x))``, and reports

  checker agreement  the objects read back from the reconstruction equal the ground truth:
                     all four attributes together, and colour, shape, size, position alone;
  PSNR               of the token reconstructions, dB;
  codebook use       distinct codes in the held-out tokens / vocabulary size.

Targets (issue 3): colour and position >= 95 %, all four >= 80 %, codebook use >= 25 %.
The score of the JPEG originals themselves is printed as the ceiling.
``--score-train`` scores the training images instead (overfitting, the setting of
the learning test in ``tests/dalle_lightning/training/test_dvae_training.py``, whose target is
all four >= 95 %).
"""

from __future__ import annotations

import io
import math
import os
import resource
import tempfile
import time
from dataclasses import replace

import numpy as np
import torch
import typer
from PIL import Image

from dalle_lightning.config_overrides import parse_overrides
from dalle_lightning.data.image_stream import InMemoryImageShards
from dalle_lightning.data.transforms import to_tensor, to_uint8
from dalle_lightning.models.dvae import DiscreteVAE, load_dvae
from dalle_lightning.synth.checker import compare, read_shapes, summarise
from dalle_lightning.synth.shapes import ShapeObject, render
from dalle_lightning.synth.shapes_dataset import ShapesConfig, make_example
from dalle_lightning.training.dvae_train import DVAETrainConfig, train_dvae
from flows.train_dvae import preset_with_overrides

TARGETS = {"colour": 0.95, "position": 0.95, "all": 0.80, "codebook_use": 0.25}
OVERFIT_TARGETS = {"all": 0.95}  # the learning test's, on the training images


def shapes_images(
    count: int, size: int, seed: int, split: str | None
) -> tuple[list[np.ndarray], list[list[ShapeObject]]]:
    """``count`` images of ``split`` (None: any) as uint8 arrays after JPEG q95, and their objects."""
    config = ShapesConfig(n=1_000_000, size=size, seed=seed)
    images, truths = [], []
    index = 0
    while len(images) < count:
        scene, _, image_split = make_example(config, index)
        index += 1
        if split is not None and image_split != split:
            continue
        buffer = io.BytesIO()
        render(scene, size).save(buffer, format="JPEG", quality=95)
        buffer.seek(0)
        images.append(np.asarray(Image.open(buffer).convert("RGB")))
        truths.append(list(scene.objects))
    return images, truths


def cpu_seconds() -> float:
    """CPU time of this process so far (user + system, all threads)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def seconds_per_step(config: DVAETrainConfig, images: list[np.ndarray], steps: int = 40) -> float:
    """CPU time of one update of ``train_dvae`` itself (data loading, logging and Lightning included).

    Measured as the difference between a run of ``steps`` and one of ``steps // 4``
    updates, so that the fixed cost of starting a run cancels out. Process CPU
    time, not wall time: on a machine shared with other work the wall time of an
    update swings several-fold, its CPU time far less.
    """
    shards = InMemoryImageShards(images[: config.batch_size * steps], rows_per_shard=500)
    costs = {}
    for n in (steps // 4, steps):
        short = replace(stretch(config, n), decoder_finetune_steps=0)
        with tempfile.TemporaryDirectory() as out:
            start = cpu_seconds()
            train_dvae(short, shards=shards, out_dir=out)
            costs[n] = cpu_seconds() - start
    return (costs[steps] - costs[steps // 4]) / (steps - steps // 4)


def stretch(config: DVAETrainConfig, steps: int) -> DVAETrainConfig:
    """The config trained for ``steps`` updates, its τ, β and learning-rate schedules scaled alike."""
    scale = steps / config.max_steps
    model = replace(
        config.model,
        temperature_steps=round(config.model.temperature_steps * scale),
        kl_weight_steps=round(config.model.kl_weight_steps * scale),
    )
    lr_steps = None if config.lr_steps is None else round(config.lr_steps * scale)
    return replace(
        config,
        model=model,
        max_steps=steps,
        lr_steps=lr_steps,
        decoder_finetune_steps=round(config.decoder_finetune_steps * scale),
        num_workers=0,
        recon_every_n_steps=steps,
        checkpoint_every_n_steps=steps,
    )


def score(model: DiscreteVAE, images: list[np.ndarray], truths: list[list[ShapeObject]]) -> dict[str, float]:
    """Checker agreement, PSNR and codebook use of the token reconstructions of ``images``."""
    x = to_tensor(images)
    codes = torch.cat([model.get_codebook_indices(b) for b in x.split(100)])  # (N, h, w)
    recon = torch.cat([model.decode_indices(c) for c in codes.split(100)])  # (N, 3, H, W)
    mse = float((to_tensor(to_uint8(recon)) - x).pow(2).mean())
    rates = summarise([compare(read_shapes(r), t) for r, t in zip(to_uint8(recon), truths, strict=True)])
    counts = torch.bincount(codes.flatten(), minlength=model.config.vocab_size).double()
    p = counts[counts > 0] / counts.sum()
    return {
        **rates,
        "psnr": -10 * math.log10(max(mse, 1e-10)),
        "codebook_use": float((counts > 0).double().mean()),
        "perplexity": float(torch.exp(-(p * p.log()).sum())),
    }


def main(
    budget_s: float = typer.Option(240.0, help="CPU seconds of training (turned into updates)"),
    steps: int = typer.Option(0, help="train this many updates instead of a budget (0: use --budget-s)"),
    threads: int = typer.Option(2, help="torch CPU threads"),
    n_train: int = typer.Option(4000, help="training images (train split)"),
    n_eval: int = typer.Option(300, help="held-out images scored"),
    preset: str = typer.Option("tiny", help="dVAE preset"),
    seed: int = typer.Option(0, help="seed of the training images (held-out ones use seed + 1)"),
    score_train: bool = typer.Option(
        False, help="score the training images instead of held-out ones (overfitting)"
    ),
    overrides: list[str] = typer.Option(
        [], "--set", help="model.FIELD=VALUE or train.FIELD=VALUE on top of the preset (repeatable)"
    ),
) -> None:
    torch.set_num_threads(threads)
    config = preset_with_overrides(preset, parse_overrides(overrides))
    size = config.model.image_size
    start = time.perf_counter()
    train_images, train_truths = shapes_images(n_train, size, seed, "train")
    if score_train:
        eval_images, eval_truths, scored = train_images, train_truths, "training"
    else:
        eval_images, eval_truths, scored = *shapes_images(n_eval, size, seed + 1, None), "held-out"
    print(
        f"data: {n_train} train + {len(eval_images)} {scored} images at {size} px in {time.perf_counter() - start:.1f} s"
    )

    budgeted = steps <= 0
    if budgeted:
        per_step = seconds_per_step(config, train_images)
        steps = max(1, int(budget_s / per_step))
    config = stretch(config, steps)
    m = config.model
    print(
        f"preset {preset}: {size} px -> {m.grid_size}x{m.grid_size} codes of {m.vocab_size}, n_hid {m.n_hid}, "
        f"{m.n_blk_per_group} block(s) x {m.group_count} groups, batch {config.batch_size}, lr {config.lr}, "
        f"beta {m.kl_weight_start}->{m.kl_weight_end}, tau {m.temperature_start}->{m.temperature_end:.4f}"
    )
    if budgeted:
        print(
            f"budget {budget_s:.0f} CPU s at {per_step * 1000:.0f} CPU ms/update ({threads} threads) -> {steps} updates"
        )

    with tempfile.TemporaryDirectory() as out:
        cpu0, wall0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        result = train_dvae(config, shards=InMemoryImageShards(train_images, rows_per_shard=500), out_dir=out)
        wall = time.perf_counter() - wall0
        cpu1 = resource.getrusage(resource.RUSAGE_SELF)
        model = load_dvae(result["model_path"])
    cpu = (cpu1.ru_utime + cpu1.ru_stime) - (cpu0.ru_utime + cpu0.ru_stime)
    print(
        f"trained {result['steps']} updates in {wall:.0f} s wall, {cpu:.0f} s CPU "
        f"(load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores)"
    )
    if budgeted and cpu > budget_s:
        print(
            f"OVER BUDGET: training used {cpu:.0f} CPU s, {cpu / budget_s - 1:.0%} more than --budget-s {budget_s:.0f}"
        )

    ceiling = summarise([compare(read_shapes(i), t) for i, t in zip(eval_images, eval_truths, strict=True)])
    scores = score(model, eval_images, eval_truths)
    print(
        f"\n{scored} images: {len(eval_images)}   (checker on the JPEG originals: all four {ceiling['all']:.1%})"
    )
    print(f"{'metric':<16}{'value':>10}{'target':>10}")
    for key in ("all", "colour", "shape", "size", "position", "count", "codebook_use"):
        target = (OVERFIT_TARGETS if score_train else TARGETS).get(key)
        mark = "" if target is None else ("  ok" if scores[key] >= target else "  MISSED")
        print(f"{key:<16}{scores[key]:>10.1%}{'' if target is None else f'{target:.0%}':>10}{mark}")
    print(f"{'psnr':<16}{scores['psnr']:>9.2f}dB")
    print(f"{'perplexity':<16}{scores['perplexity']:>10.1f}")


if __name__ == "__main__":
    typer.run(main)
