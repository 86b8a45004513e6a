"""The reranking curve: best-of-n weights are exact, the curve never decreases when the scorer is the judge."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from dalle_lightning.evaluation.clip_score import curve_metrics, reranking_curve
from dalle_lightning.evaluation.estimates import best_of_n, best_of_n_weights, doubling_ns, mean_stderr

pytestmark = pytest.mark.timeout(60)


def test_weights_match_every_subset_enumerated():
    rng = np.random.default_rng(0)
    values = rng.normal(size=7)  # ranked best first (their ranking need not follow the values)
    for n in range(1, 8):
        subsets = list(itertools.combinations(range(7), n))
        brute = np.mean([values[min(s)] for s in subsets])  # the lowest rank index is the best-scored
        assert best_of_n(values[None], n)[0] == pytest.approx(brute, rel=1e-12)
    np.testing.assert_allclose(best_of_n_weights(5, 1), np.full(5, 0.2))
    np.testing.assert_allclose(best_of_n_weights(5, 5), [1, 0, 0, 0, 0])
    big = best_of_n_weights(512, 64)  # no overflow at the paper's N
    assert big.sum() == pytest.approx(1.0) and np.all(big >= 0) and np.all(np.diff(big) <= 0)


def test_curve_is_monotone_for_an_oracle_like_scorer():
    rng = np.random.default_rng(1)
    quality = rng.normal(size=(20, 16))  # what a perfect judge would say of each candidate
    scores = quality + 0.01 * rng.normal(size=quality.shape)  # an oracle-like reranker: nearly the judge
    curve = reranking_curve(scores, values=quality)
    assert list(curve) == [1, 2, 4, 8, 16]
    means = [curve[n].mean for n in curve]
    assert all(b >= a - 1e-3 for a, b in itertools.pairwise(means))
    assert means[-1] > means[0] + 0.5  # reranking helps
    assert curve[1].mean == pytest.approx(quality.mean())  # N = 1: the mean sample
    # scored by the reranker itself the curve is exactly monotone
    own = reranking_curve(scores)
    assert all(own[b].mean >= own[a].mean for a, b in itertools.pairwise(own))
    # and at N = N_max it is each caption's best score
    assert own[16].mean == pytest.approx(scores.max(axis=1).mean())
    assert own[16].stderr == pytest.approx(scores.max(axis=1).std(ddof=1) / math.sqrt(20))


def test_a_random_reranker_does_not_help():
    rng = np.random.default_rng(2)
    quality = rng.normal(size=(400, 8))
    curve = reranking_curve(rng.normal(size=quality.shape), values=quality)
    assert abs(curve[8].mean - curve[1].mean) < 4 * curve[8].stderr


def test_helpers_and_errors():
    assert doubling_ns(1) == [1] and doubling_ns(8) == [1, 2, 4, 8] and doubling_ns(6) == [1, 2, 4, 6]
    estimate = mean_stderr([1.0, 2.0, 3.0, 4.0])
    assert estimate.mean == 2.5 and estimate.count == 4
    assert estimate.stderr == pytest.approx(np.std([1, 2, 3, 4], ddof=1) / 2)
    assert math.isnan(mean_stderr([1.0]).stderr)
    metrics = curve_metrics(reranking_curve(np.array([[0.1, 0.3]])))
    assert metrics == {
        "clip_score_n1": pytest.approx(0.2),
        "clip_score_n2": pytest.approx(0.3),
    }  # one caption: no stderr
    with pytest.raises(ValueError, match=r"\[1, 4\]"):
        reranking_curve(np.zeros((2, 4)), ns=[8])
    with pytest.raises(ValueError, match="shape of scores"):
        reranking_curve(np.zeros((2, 4)), values=np.zeros((2, 3)))
