"""Reranking on ``shapes``: caption accuracy of the CLIP-best of N samples, N = 1 … 16, against the dVAE ceiling.

    .venv/bin/python -m bench.rerank_eval --work-dir /tmp/rerank          # train all four, then evaluate
    .venv/bin/python -m bench.rerank_eval --work-dir /tmp/rerank --retrain-clip   # keep dVAE + DALL-E

Not a timed test: a quality figure of the ``tiny`` presets on the CPU (issue 5:
"the N = 16 figure is higher than N = 1 by more than two standard errors").

1. Renders ``n_train`` ``train``-split shapes images at the dVAE's size
   (JPEG q95, as ingest stores them; the held-out colour–shape pairings never
   appear) with their captions.
2. Trains, each with the library's trainer and its preset, whatever is not
   already in ``work_dir`` (or given by path): the dVAE
   (:func:`~dalle_lightning.training.dvae_train.train_dvae`), the caption BPE
   (:func:`~dalle_lightning.stages.bpe.train_bpe`), the transformer on the dVAE's
   codes (:func:`~dalle_lightning.training.dalle_train.train_dalle`) and a CLIP
   (:func:`~dalle_lightning.training.clip_train.train_clip`).
3. Evaluates with :func:`~dalle_lightning.evaluation.evaluate.evaluate_models` on
   the fixed ``shapes`` caption set (``captions`` scenes, seed 1000003; half show
   a held-out pairing): N_max candidates per caption, ranked by the CLIP; exact
   caption accuracy of the top-ranked of N by the checker (seen / held-out /
   all), the dVAE round trip of the real images as the ceiling, and the CLIP
   score curve.

Besides the library's per-N standard errors it prints the standard error of
the paired per-caption difference acc(N) − acc(1), which is what "higher by
more than two standard errors" is judged on (the two figures come from the
same samples, so they are not independent).
"""

from __future__ import annotations

import io
import json
import math
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import typer
from PIL import Image

from bench.quality_dvae import stretch
from dalle_lightning.evaluation.estimates import best_of_n, mean_stderr
from dalle_lightning.evaluation.eval_sets import EvalSetConfig, shapes_eval_set
from dalle_lightning.evaluation.evaluate import EvalConfig, evaluate_models
from dalle_lightning.generation.rerank import RerankScorer
from dalle_lightning.generation.sampling import SamplingConfig
from dalle_lightning.synth.shapes import render
from dalle_lightning.synth.shapes_dataset import ShapesConfig, make_example


def training_data(count: int, size: int, seed: int) -> tuple[list[np.ndarray], list[str]]:
    """``count`` ``train``-split shapes images (uint8, after JPEG q95) and their captions."""
    config = ShapesConfig(n=10 * count, size=size, seed=seed)
    images, captions = [], []
    index = 0
    while len(images) < count:
        scene, caption, split = make_example(config, index)
        index += 1
        if split != "train":
            continue
        buffer = io.BytesIO()
        render(scene, size).save(buffer, format="JPEG", quality=95)
        buffer.seek(0)
        images.append(np.asarray(Image.open(buffer).convert("RGB")))
        captions.append(caption)
    return images, captions


def _timed(label: str, timings: dict[str, float]):
    class _Timer:
        def __enter__(self) -> None:
            self.start = time.perf_counter()
            print(f"{label} …", flush=True)

        def __exit__(self, *exc: object) -> None:
            timings[label] = time.perf_counter() - self.start
            print(f"{label}: {timings[label]:.0f} s", flush=True)

    return _Timer()


def train_models(
    work: Path,
    images: list[np.ndarray],
    captions: list[str],
    *,
    dvae_path: str | None,
    dalle_path: str | None,
    clip_path: str | None,
    retrain_clip: bool,
    steps_scale: float,
    timings: dict[str, float],
) -> tuple[str, str, str, str]:
    """(dVAE, BPE, DALL-E, CLIP) paths: given, found in ``work`` from an earlier run, or trained now."""
    from dalle_lightning.data.image_stream import InMemoryImageShards
    from dalle_lightning.data.pair_stream import InMemoryPairShards
    from dalle_lightning.data.token_stream import InMemoryTokenShards
    from dalle_lightning.data.transforms import to_tensor
    from dalle_lightning.models.dvae import load_dvae
    from dalle_lightning.stages.bpe import BPEConfig, load_bpe, save_bpe, train_bpe
    from dalle_lightning.training import clip_train, dalle_train, dvae_train

    if dvae_path is None:
        dvae_path = str(work / "dvae" / "dvae.pt")
        if not Path(dvae_path).exists():
            with _timed("train dVAE (tiny)", timings):
                config = dvae_train.load_preset("tiny")
                config = replace(
                    stretch(config, max(1, round(config.max_steps * steps_scale))),
                    accelerator="cpu",
                    num_workers=0,
                )
                result = dvae_train.train_dvae(
                    config, shards=InMemoryImageShards(images), out_dir=work / "dvae"
                )
                dvae_path = str(result["model_path"])
    bpe_path = str(work / "tokenizer.json")
    if not Path(bpe_path).exists():
        save_bpe(train_bpe(captions, BPEConfig(vocab_size=512)), bpe_path)
    tokenizer = load_bpe(bpe_path)

    if dalle_path is None:
        dalle_path = str(work / "dalle" / "dalle.pt")
        if not Path(dalle_path).exists():
            dvae = load_dvae(dvae_path)
            with _timed("tokenize", timings), torch.no_grad():
                x = to_tensor(np.stack(images))
                codes = torch.cat([dvae.get_codebook_indices(b) for b in x.split(256)])  # (N, h, w)
                codes = codes.flatten(1).numpy().astype(np.uint16)
            with _timed("train transformer (tiny)", timings):
                config = dalle_train.load_preset("tiny")
                model = replace(
                    config.model,
                    text_vocab=tokenizer.get_vocab_size(),
                    image_vocab=dvae.config.vocab_size,
                    grid_size=dvae.config.grid_size,
                )
                config = replace(
                    config,
                    model=model,
                    accelerator="cpu",
                    num_workers=0,
                    max_steps=max(1, round(config.max_steps * steps_scale)),
                    warmup_steps=min(config.warmup_steps, round(config.max_steps * steps_scale)),
                )
                result = dalle_train.train_dalle(
                    config,
                    bpe=tokenizer,
                    shards=InMemoryTokenShards(captions, codes),
                    dvae_path=dvae_path,
                    out_dir=work / "dalle",
                )
                dalle_path = str(result["model_path"])

    if clip_path is None:
        clip_path = str(work / "clip" / "clip.pt")
        if retrain_clip or not Path(clip_path).exists():
            with _timed("train CLIP (tiny)", timings):
                config = clip_train.load_preset("tiny")
                config = replace(
                    config,
                    accelerator="cpu",
                    num_workers=0,
                    max_steps=max(1, round(config.max_steps * steps_scale)),
                    warmup_steps=min(config.warmup_steps, round(config.max_steps * steps_scale)),
                    model=replace(
                        config.model,
                        text_vocab=tokenizer.get_vocab_size(),
                        image_size=load_dvae(dvae_path).config.image_size,
                    ),
                )
                result = clip_train.train_clip(
                    config,
                    bpe=tokenizer,
                    shards=InMemoryPairShards(images, captions),
                    out_dir=work / ("clip-retrained" if retrain_clip else "clip"),
                )
                clip_path = str(result["model_path"])
    return dvae_path, bpe_path, dalle_path, clip_path


def main(
    work_dir: Path = typer.Option(..., help="models are trained into (and reused from) here"),
    n_train: int = typer.Option(4000, help="training images (train split)"),
    captions: int = typer.Option(300, help="evaluation captions (shapes caption set)"),
    n_max: int = typer.Option(16, help="candidates per caption"),
    threads: int = typer.Option(1, help="torch CPU threads"),
    seed: int = typer.Option(0, help="seed of the training images"),
    dvae: str | None = typer.Option(None, help="a trained dVAE file instead of training one"),
    dalle: str | None = typer.Option(None, help="a trained transformer file (on this dVAE's codes)"),
    clip: str | None = typer.Option(None, help="a trained CLIP file"),
    retrain_clip: bool = typer.Option(False, help="train a new CLIP even if work_dir has one"),
    temperature: float = typer.Option(1.0, help="sampling temperature"),
    top_k: int | None = typer.Option(None, help="sampling top-k"),
    steps_scale: float = typer.Option(1.0, help="scale every preset's max_steps (a quick look: 0.05)"),
) -> None:
    from dalle_lightning.models.dvae import load_dvae
    from dalle_lightning.stages.bpe import CaptionEncoder, load_bpe
    from dalle_lightning.training.dalle_train import load_dalle

    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    work_dir.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    start = time.perf_counter()
    size = load_dvae(dvae).config.image_size if dvae else 32
    with _timed("render training data", timings):
        images, texts = training_data(n_train, size, seed)
    dvae_path, bpe_path, dalle_path, clip_path = train_models(
        work_dir,
        images,
        texts,
        dvae_path=dvae,
        dalle_path=dalle,
        clip_path=clip,
        retrain_clip=retrain_clip,
        steps_scale=steps_scale,
        timings=timings,
    )
    print(
        f"models: dvae {dvae_path}\n        dalle {dalle_path}\n        clip {clip_path}\n        bpe {bpe_path}"
    )

    dvae_model = load_dvae(dvae_path)
    dalle_model = load_dalle(dalle_path)
    scorer = RerankScorer.load(clip_path)
    text_encoder = CaptionEncoder(load_bpe(bpe_path), dalle_model.config.text_len)
    eval_set = shapes_eval_set(EvalSetConfig(count=captions), dvae_model.config.image_size)
    ns = tuple(n for n in (1, 2, 4, 8, 16, 32, 64) if n <= n_max)
    config = EvalConfig(
        n_max=n_max,
        accuracy_ns=ns,
        sampling=SamplingConfig(temperature=temperature, top_k=top_k, batch_size=64, seed=seed),
    )
    last = [0.0]

    def progress(done: int, total: int) -> None:
        now = time.perf_counter()
        if now - last[0] > 60 or done == total:
            last[0] = now
            print(f"  sampled {done / total:.0%}", flush=True)

    with _timed(f"evaluate ({captions} captions x {n_max})", timings):
        result = evaluate_models(
            dalle_model,
            dvae_model,
            scorer,
            text_encoder,
            eval_set,
            config,
            work_dir / "eval",
            progress=progress,
        )
    report(result, ns, eval_set.summary(), timings, time.perf_counter() - start, work_dir)


def report(result, ns, summary, timings, wall, work_dir: Path) -> None:
    """Print the accuracy table, the paired differences, the CLIP-score curve and the timings."""
    per_caption = json.loads(result.files["per_caption"].read_text())
    correct = np.array([c["correct_ranked"] for c in per_caption], dtype=np.float64)  # (C, N_max) ranked
    pairings = np.array([c["pairing"] for c in per_caption])
    print(f"\ncaption set: {summary}; eval set fingerprint in {result.files['per_caption']}")
    print("\naccuracy of the CLIP-best of N (checker, all four attributes), mean ± stderr over captions")
    print(f"{'N':>4} {'all':>16} {'seen':>16} {'held-out':>16}  {'all − N=1 (paired)':>20}")
    one = best_of_n(correct, 1)
    rows = {}
    for n in ns:
        acc = result.accuracy[n]
        diff = mean_stderr(best_of_n(correct, n) - one)
        rows[n] = {k: (v.mean, v.stderr) for k, v in acc.items()} | {"diff": (diff.mean, diff.stderr)}
        cells = [
            f"{acc[k].mean:6.1%} ± {acc[k].stderr:5.1%}" if k in acc else f"{'-':>16}"
            for k in ("all", "seen", "heldout")
        ]
        print(
            f"{n:>4} {cells[0]:>16} {cells[1]:>16} {cells[2]:>16}  {diff.mean:+6.1%} ± {diff.stderr:5.1%}"
            f" ({diff.mean / diff.stderr if diff.stderr > 0 else math.nan:.1f} SE)"
        )
    ceiling = result.ceiling
    print(
        "dVAE ceiling (round trip of the real images): "
        + ", ".join(f"{k} {v.mean:.1%} ± {v.stderr:.1%}" for k, v in ceiling.items())
    )
    print(
        "\nCLIP score of the top-ranked of N: "
        + ", ".join(f"N={n} {e.mean:.4f}±{e.stderr:.4f}" for n, e in result.curve.items())
    )
    fids = {k: round(v, 3) for k, v in result.metrics.items() if k.startswith("fid")}
    print(f"FID (CLIP features): {fids}")
    seen = correct[pairings == "seen"]
    print(
        f"samples correct at all (any of N_max): {float((correct.max(1) > 0).mean()):.1%}; seen-caption samples correct: {float(seen.mean()):.1%}"
    )
    print(f"\nwall: {wall:.0f} s; " + ", ".join(f"{k} {v:.0f} s" for k, v in timings.items()))
    print(f"samples/s: {result.metrics['samples_per_second']:.2f}")
    out = {
        "accuracy": {str(n): r for n, r in rows.items()},
        "ceiling": {k: (v.mean, v.stderr) for k, v in ceiling.items()},
        "clip_score": {str(n): (e.mean, e.stderr) for n, e in result.curve.items()},
        "metrics": result.metrics,
        "timings": timings,
        "wall_s": wall,
    }
    (work_dir / "rerank_eval.json").write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    typer.run(main)
