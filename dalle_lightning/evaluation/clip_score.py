"""The CLIP score of the top-ranked sample as a function of the number of candidates (Sec. 2.5, Fig. 6).

From one set of ``N_max`` candidates per caption, each with its CLIP score
(cosine similarity of image and caption embeddings), the curve gives for
N = 1, 2, 4, …, N_max the mean over captions of the score of the best of N
candidates, with its standard error over captions. The best of N is averaged
over all N-subsets of the ``N_max`` candidates (:func:`~.estimates.best_of_n`),
so the curve starts at the mean score of one sample and never decreases.

With ``values`` the curve reports another quantity of the candidate the
scores pick, e.g. the score of a second CLIP that did not rank them (a fairer
judge than the one that chose).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from dalle_lightning.evaluation.estimates import Estimate, best_of_n, doubling_ns, mean_stderr


def reranking_curve(
    scores: Sequence[np.ndarray] | np.ndarray,
    values: Sequence[np.ndarray] | np.ndarray | None = None,
    ns: Sequence[int] | None = None,
) -> dict[int, Estimate]:
    """``{N: mean ± stderr over captions of the value of the top-scored of N candidates}``.

    ``scores`` holds each caption's ``N_max`` candidate scores (C, N_max), in
    any order; ``values`` (same shape, default ``scores``) what is reported of
    the chosen candidate. ``ns`` defaults to 1, 2, 4, …, ``N_max``.
    """
    score_array = np.asarray(scores, dtype=np.float64)
    value_array = score_array if values is None else np.asarray(values, dtype=np.float64)
    if score_array.ndim != 2 or score_array.shape[1] < 1 or score_array.shape[0] < 1:
        raise ValueError(
            f"scores must be (captions, candidates) with both >= 1, got shape {score_array.shape}"
        )
    if value_array.shape != score_array.shape:
        raise ValueError(f"values {value_array.shape} must have the shape of scores {score_array.shape}")
    total = score_array.shape[1]
    ns = doubling_ns(total) if ns is None else list(ns)
    bad = [n for n in ns if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= total]
    if bad:
        raise ValueError(f"every N must be an integer in [1, {total}] (the candidates drawn), got {bad}")
    order = np.argsort(-score_array, axis=1, kind="stable")  # best first
    ranked = np.take_along_axis(value_array, order, axis=1)  # (C, N_max)
    return {n: mean_stderr(best_of_n(ranked, n)) for n in ns}


def curve_metrics(curve: dict[int, Estimate], name: str = "clip_score") -> dict[str, float]:
    """Flat metrics ``{name}_n{N}`` and ``{name}_n{N}_stderr`` (finite values only) of a curve."""
    metrics: dict[str, float] = {}
    for n, estimate in curve.items():
        metrics[f"{name}_n{n}"] = estimate.mean
        if np.isfinite(estimate.stderr):
            metrics[f"{name}_n{n}_stderr"] = estimate.stderr
    return metrics
