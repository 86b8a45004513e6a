"""Means with their standard errors, and the expected best of n candidates out of N drawn.

Reranking draws N candidates per caption and keeps the best by score. The
quality of the kept one as a function of n ≤ N (the paper's reranking curve)
can be read from one set of N candidates: rather than the best of the first
n, :func:`best_of_n` takes the expected value over every n-subset of the N
(an average over all C(N, n) subsets, in closed form), which has the same
expectation and a lower variance, and gives a curve that does not decrease
with n when the value is the score itself.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Estimate:
    """A mean over ``count`` items (captions) and its standard error."""

    mean: float
    stderr: float
    """Standard deviation of the items over √count (``nan`` for fewer than two items)."""
    count: int

    def __str__(self) -> str:
        return f"{self.mean:.4f} ± {self.stderr:.4f} (n={self.count})"


def mean_stderr(values: Sequence[float] | np.ndarray) -> Estimate:
    """The mean of ``values`` and its standard error (sample std with ddof=1 over √n)."""
    array = np.asarray(values, dtype=np.float64).reshape(-1)
    if array.size == 0:
        raise ValueError("mean_stderr needs at least one value, got none")
    stderr = float(array.std(ddof=1) / math.sqrt(array.size)) if array.size > 1 else math.nan
    return Estimate(float(array.mean()), stderr, int(array.size))


def best_of_n_weights(total: int, n: int) -> np.ndarray:
    """float64 (total,): the probability that the candidate ranked ``r`` (0 = best) is the best of a
    uniformly random ``n``-subset of ``total`` candidates: ``C(total−1−r, n−1) / C(total, n)``."""
    if isinstance(total, bool) or not isinstance(total, int) or total < 1:
        raise ValueError(f"total must be an integer >= 1, got {total!r}")
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= total:
        raise ValueError(f"n must be an integer in [1, {total}], got {n!r}")
    ranks = np.arange(total - n + 1)  # the others can never be the best of n
    log_comb_total = math.lgamma(total + 1) - math.lgamma(n + 1) - math.lgamma(total - n + 1)
    log_weights = np.array(
        [math.lgamma(total - r) - math.lgamma(n) - math.lgamma(total - r - n + 1) for r in ranks]
    )
    weights = np.zeros(total)
    weights[: ranks.size] = np.exp(log_weights - log_comb_total)
    return weights / weights.sum()  # sums to 1 up to rounding; exact after this


def best_of_n(ranked_values: np.ndarray, n: int) -> np.ndarray:
    """float64 (C,): per caption, the expected value of the best-ranked of ``n`` random candidates.

    ``ranked_values`` (C, N) holds each caption's candidates in rank order
    (best first, by whatever score ranked them); the value can be that score,
    another score, or 1/0 for a correct/incorrect image.
    """
    values = np.asarray(ranked_values, dtype=np.float64)
    if values.ndim != 2:
        raise ValueError(f"ranked_values must be (captions, candidates), got shape {values.shape}")
    return values @ best_of_n_weights(values.shape[1], n)


def doubling_ns(total: int) -> list[int]:
    """1, 2, 4, … up to ``total``, and ``total`` itself when it is not a power of two."""
    if isinstance(total, bool) or not isinstance(total, int) or total < 1:
        raise ValueError(f"total must be an integer >= 1, got {total!r}")
    ns = [2**k for k in range(total.bit_length()) if 2**k <= total]
    return ns if ns[-1] == total else [*ns, total]
