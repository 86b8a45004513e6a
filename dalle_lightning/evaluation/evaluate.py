"""Evaluate one (DALL-E, dVAE, CLIP) on one caption set: every metric from one draw of N_max samples per caption.

:func:`evaluate_models` draws ``n_max`` candidates per caption
(:func:`~dalle_lightning.generation.rerank.generate_and_rank`) and computes

- the reranking curve: CLIP score of the top-ranked of N, N = 1, 2, 4, …, n_max
  (``clip_score_n{N}`` ± ``_stderr``; :mod:`.clip_score`);
- FID in the CLIP's image feature space against the captions' real images:
  ``fid`` of the top-ranked at n_max, ``fid_n1`` of one sample per caption (no
  reranking) and ``fid_dvae`` of the real images' dVAE round trips (what the
  dVAE alone loses); ``fid_inception`` too when Inception weights are given.
  The same CLIP ranks the samples and embeds them for ``fid``, which favours
  reranking; compare ``fid`` between models, and with ``fid_n1``, with that in mind;
- on a ``shapes`` set, caption accuracy of the top-ranked of N for N in
  ``accuracy_ns`` for seen and held-out pairings, and the dVAE ceiling
  (:mod:`.shapes_accuracy`);

Captions are drawn ``caption_chunk`` at a time, so memory holds
``caption_chunk · n_max`` images whatever the number of captions. It writes
image grids: ``ranked.png`` (the best of each of the first
captions, with their scores) and ``real_and_dvae.png`` (real images above
their dVAE round trips), plus ``per_caption.json`` (every caption's scores).
"""

from __future__ import annotations

import json
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dalle_lightning.evaluation.clip_score import curve_metrics, reranking_curve
from dalle_lightning.evaluation.estimates import Estimate
from dalle_lightning.evaluation.eval_sets import EvalSet
from dalle_lightning.evaluation.fid import clip_features, fid, inception_features
from dalle_lightning.evaluation.shapes_accuracy import (
    accuracy_from_checks,
    accuracy_metrics,
    check_images,
    dvae_ceiling,
    dvae_round_trip,
)
from dalle_lightning.generation.rerank import RankedSamples, RerankScorer, generate_and_rank, ranked_grid_png
from dalle_lightning.generation.sampling import SamplingConfig
from dalle_lightning.synth.checker import MIN_SIZE


@dataclass
class EvalConfig:
    """How to evaluate: samples per caption, sampling settings, what to report."""

    n_max: int = 64
    """Candidates drawn per caption; the curve runs N = 1, 2, 4, … up to it (paper: 512)."""
    accuracy_ns: tuple[int, ...] = (1, 16)
    """N of the shapes accuracy of the top-ranked of N; those above ``n_max`` are left out with a warning."""
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    """Temperature, top-k, top-p, guidance, batch size and seed of the draws."""
    grid_captions: int = 8
    """Captions (the first ones) shown in the ranked grid."""
    grid_top: int = 8
    """Best candidates per caption shown in the ranked grid."""
    caption_chunk: int = 16
    """Captions drawn, ranked and checked at once: ``caption_chunk · n_max`` images are held in memory."""
    feature_batch_size: int = 64
    """Images per batch when extracting FID features and round-tripping through the dVAE."""
    inception_weights: str | None = None
    """Local file of the FID Inception weights (``torch-fidelity``); ``None``: no Inception FID."""

    def __post_init__(self) -> None:
        if not isinstance(self.sampling, SamplingConfig):
            raise ValueError(f"sampling must be a SamplingConfig, got {type(self.sampling).__name__}")
        for name in ("n_max", "grid_captions", "grid_top", "caption_chunk", "feature_batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        self.accuracy_ns = tuple(self.accuracy_ns)
        if any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in self.accuracy_ns):
            raise ValueError(f"accuracy_ns must be integers >= 1, got {self.accuracy_ns!r}")


@dataclass
class EvalResult:
    """The metrics (flat, for MLflow), their estimates, the scores, the best images and the files written."""

    metrics: dict[str, float]
    curve: dict[int, Estimate]
    accuracy: dict[int, dict[str, Estimate]] | None
    ceiling: dict[str, Estimate] | None
    scores: np.ndarray
    """float (C, N_max): every candidate's CLIP score, each caption's best first."""
    best: np.ndarray
    """uint8 (C, H, W, 3): each caption's top-ranked image."""
    files: dict[str, Path]


def evaluate_models(
    dalle: Any,
    dvae: Any,
    scorer: RerankScorer,
    text_encoder: Any,
    eval_set: EvalSet,
    config: EvalConfig,
    out_dir: str | Path,
    progress: Callable[[int, int], None] | None = None,
) -> EvalResult:
    """All metrics of the module docstring for ``eval_set``; grids and ``per_caption.json`` go to ``out_dir``.

    ``text_encoder`` encodes captions for the transformer (its BPE and
    ``text_len``); ``progress(done, total)`` counts image tokens sampled.
    """
    size = dvae.config.image_size
    if eval_set.images.shape[1:3] != (size, size):
        raise ValueError(
            f"the eval set's real images are {eval_set.images.shape[1:3]}, the dVAE draws {size}²"
        )
    check = eval_set.truths is not None and eval_set.pairings is not None
    if check and size < MIN_SIZE:
        warnings.warn(
            f"no shapes accuracy: the checker needs images of at least {MIN_SIZE} px, the dVAE draws {size}",
            stacklevel=2,
        )
        check = False
    start = time.perf_counter()
    drawn = _draw(dalle, dvae, scorer, text_encoder, eval_set, config, check, progress)
    sampled = time.perf_counter() - start
    metrics: dict[str, float] = {
        "samples_per_second": len(eval_set.captions) * config.n_max / max(sampled, 1e-9),
        "captions": float(len(eval_set.captions)),
        "n_max": float(config.n_max),
    }
    curve = reranking_curve(drawn.scores)
    metrics.update(curve_metrics(curve))

    real = eval_set.images
    reconstructions = dvae_round_trip(dvae, real, config.feature_batch_size)
    metrics.update(_fids(real, drawn.best, drawn.first, reconstructions, scorer, config))

    accuracy = ceiling = None
    if check:
        ns = [n for n in config.accuracy_ns if n <= config.n_max]
        if len(ns) < len(config.accuracy_ns):
            warnings.warn(
                f"shapes accuracy at N={[n for n in config.accuracy_ns if n > config.n_max]} left out: "
                f"only n_max={config.n_max} candidates are drawn",
                stacklevel=2,
            )
        accuracy = accuracy_from_checks(drawn.correct, eval_set.pairings, ns)
        ceiling = dvae_ceiling(reconstructions, eval_set.truths, eval_set.pairings)
        metrics.update(accuracy_metrics(accuracy, ceiling))
    metrics["eval_seconds"] = time.perf_counter() - start
    files = _write_files(Path(out_dir), drawn, eval_set, reconstructions, config)
    return EvalResult(metrics, curve, accuracy, ceiling, drawn.scores, drawn.best, files)


@dataclass
class _Drawn:
    scores: np.ndarray  # (C, N_max) ranked
    orders: np.ndarray  # (C, N_max) sampling index of each ranked candidate
    best: np.ndarray  # (C, H, W, 3) top-ranked
    first: np.ndarray  # (C, H, W, 3) the first drawn
    correct: np.ndarray | None  # (C, N_max) ranked, shapes checks
    shown: list[RankedSamples]  # the grid's captions, their best images


def _draw(
    dalle: Any,
    dvae: Any,
    scorer: RerankScorer,
    text_encoder: Any,
    eval_set: EvalSet,
    config: EvalConfig,
    check: bool,
    progress: Callable[[int, int], None] | None,
) -> _Drawn:
    """Draw and rank ``caption_chunk`` captions at a time, keeping what the metrics need of each."""
    import torch

    seed = config.sampling.seed
    device = dalle.text_head.weight.device
    generator = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    per_caption = config.n_max * dalle.config.image_len
    total = len(eval_set.captions) * per_caption
    scores, orders, best, first, correct, shown = [], [], [], [], [], []
    for offset in range(0, len(eval_set.captions), config.caption_chunk):
        captions = eval_set.captions[offset : offset + config.caption_chunk]

        def step(done: int, _: int, base: int = offset * per_caption) -> None:
            if progress is not None:
                progress(base + done, total)

        chunk = generate_and_rank(
            dalle,
            dvae,
            scorer,
            captions,
            text_encoder,
            n=config.n_max,
            config=config.sampling,
            generator=generator,
            progress=step,
        )
        for i, r in enumerate(chunk, offset):
            scores.append(r.scores)
            orders.append(r.order)
            best.append(r.images[0])
            first.append(r.images[int(np.argmax(r.order == 0))])
            if check:
                correct.append(check_images(r.images, eval_set.truths[i]))
            if len(shown) < config.grid_captions:
                shown.append(RankedSamples(r.caption, r.images[: config.grid_top], r.scores, r.order))
    return _Drawn(
        np.stack(scores),
        np.stack(orders),
        np.stack(best),
        np.stack(first),
        np.stack(correct) if check else None,
        shown,
    )


def _fids(
    real: np.ndarray,
    best: np.ndarray,
    first: np.ndarray,
    reconstructions: np.ndarray,
    scorer: RerankScorer,
    config: EvalConfig,
) -> dict[str, float]:
    if len(real) < 2:
        warnings.warn("no FID: it needs at least two captions", stacklevel=3)
        return {}
    batch = config.feature_batch_size
    extractor = clip_features(scorer)
    out = {
        "fid": fid(real, best, extractor, batch),
        "fid_n1": fid(real, first, extractor, batch),
        "fid_dvae": fid(real, reconstructions, extractor, batch),
    }
    if config.inception_weights is not None:
        try:
            inception = inception_features(config.inception_weights, device=scorer.device)
        except (ImportError, FileNotFoundError) as err:
            warnings.warn(f"no Inception FID: {err}", stacklevel=3)
        else:
            out["fid_inception"] = fid(real, best, inception, batch)
    return out


def _write_files(
    out: Path, drawn: _Drawn, eval_set: EvalSet, reconstructions: np.ndarray, config: EvalConfig
) -> dict[str, Path]:
    from dalle_lightning.image_grid import image_grid

    out.mkdir(parents=True, exist_ok=True)
    files = {
        "ranked": ranked_grid_png(
            [r.images for r in drawn.shown],
            [r.scores for r in drawn.shown],
            out / "ranked.png",
            captions=[r.caption for r in drawn.shown],
        )
    }
    k = min(len(eval_set.images), config.grid_captions * config.grid_top)
    scale = max(1, 96 // eval_set.images.shape[1])
    image_grid([eval_set.images[:k], reconstructions[:k]], scale=scale).save(out / "real_and_dvae.png")
    files["real_and_dvae"] = out / "real_and_dvae.png"
    per_caption = [
        {
            "key": eval_set.keys[i],
            "caption": eval_set.captions[i],
            "pairing": eval_set.pairings[i] if eval_set.pairings is not None else None,
            "scores_ranked": [round(float(s), 6) for s in drawn.scores[i]],
            "order": [int(o) for o in drawn.orders[i]],
            "correct_ranked": [bool(c) for c in drawn.correct[i]] if drawn.correct is not None else None,
        }
        for i in range(len(eval_set.captions))
    ]
    files["per_caption"] = out / "per_caption.json"
    files["per_caption"].write_text(json.dumps(per_caption, indent=1))
    return files
