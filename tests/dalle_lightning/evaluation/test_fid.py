"""FID: the eigen-decomposition route agrees with a direct scipy sqrtm computation and with closed forms."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
import torch

from dalle_lightning.evaluation.fid import (
    extract_features,
    feature_statistics,
    fid,
    frechet_distance,
    inception_features,
)

pytestmark = pytest.mark.timeout(60)


def _direct(mu1, sigma1, mu2, sigma2) -> float:
    """The textbook formula with scipy's general matrix square root."""
    covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(sigma1 + sigma2 - 2.0 * np.real(covmean)))


def _gaussian(rng, d, n):
    a = rng.normal(size=(d, d))
    return rng.normal(size=d) + rng.normal(size=(n, d)) @ a  # covariance a.T @ a


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_scipy_sqrtm_on_small_gaussians(seed):
    rng = np.random.default_rng(seed)
    mu1, s1 = feature_statistics(_gaussian(rng, 6, 200))
    mu2, s2 = feature_statistics(_gaussian(rng, 6, 300))
    ours = frechet_distance(mu1, s1, mu2, s2)
    assert ours == pytest.approx(_direct(mu1, s1, mu2, s2), rel=1e-8, abs=1e-8)
    assert ours == pytest.approx(frechet_distance(mu2, s2, mu1, s1), rel=1e-9)  # symmetric
    assert frechet_distance(mu1, s1, mu1, s1) == pytest.approx(0.0, abs=1e-8)


def test_closed_form_for_diagonal_covariances():
    a, b = np.array([1.0, 4.0, 9.0]), np.array([4.0, 1.0, 0.0])
    mu1, mu2 = np.zeros(3), np.array([1.0, 2.0, 2.0])
    expected = 9.0 + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)  # |Δμ|² + Σ (√aᵢ − √bᵢ)²
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-12)


def test_singular_covariances_from_few_samples_stay_finite_and_real():
    rng = np.random.default_rng(3)
    x, y = rng.normal(size=(4, 10)), rng.normal(size=(5, 10)) + 1.0  # fewer samples than dimensions
    value = frechet_distance(*feature_statistics(x), *feature_statistics(y))
    assert np.isfinite(value) and value == pytest.approx(
        _direct(*feature_statistics(x), *feature_statistics(y)), rel=1e-6
    )


def test_fid_of_images_uses_the_extractor_features():
    rng = np.random.default_rng(4)
    real = rng.integers(0, 256, (12, 8, 8, 3), dtype=np.uint8)
    fake = np.clip(real.astype(int) + 40, 0, 255).astype(np.uint8)[::-1].copy()

    def mean_colour(images: torch.Tensor) -> torch.Tensor:
        return images.mean(dim=(2, 3))  # (B, 3)

    features_real = extract_features(real, mean_colour, batch_size=5)
    assert features_real.shape == (12, 3)
    expected = _direct(
        *feature_statistics(features_real), *feature_statistics(extract_features(fake, mean_colour))
    )
    assert fid(real, fake, mean_colour, batch_size=5) == pytest.approx(expected, rel=1e-8)
    assert fid(real, real, mean_colour) == pytest.approx(0.0, abs=1e-10)
    with pytest.raises(ValueError, match="N >= 2"):
        fid(real[:1], fake, mean_colour)


def test_inception_needs_local_weights(tmp_path):
    pytest.importorskip("torch_fidelity", reason="torch-fidelity is not installed")
    with pytest.raises(FileNotFoundError):
        inception_features(tmp_path / "absent.pth")
