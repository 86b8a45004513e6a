"""The Fréchet distance between two sets of images in a feature space (FID; Heusel et al. 2017).

Each set's features are summarised by their mean μ and covariance Σ, and

    d² = ‖μ₁ − μ₂‖² + Tr(Σ₁ + Σ₂ − 2 (Σ₁ Σ₂)^½)

is the squared 2-Wasserstein distance between the two Gaussians. The trace
of the matrix square root is computed as Σ √λᵢ over the eigenvalues λᵢ of the
symmetric positive semi-definite Σ₁^½ Σ₂ Σ₁^½ (which has the eigenvalues of
Σ₁ Σ₂), with two symmetric eigen-decompositions: exact, real, and stable when
the covariances are singular, as they are with fewer images than features.

The feature extractor is pluggable — any callable from images (B, 3, H, W)
in [0, 1] to features (B, D):

- :func:`clip_features` — our CLIP's image encoder (the default: no download);
- :func:`inception_features` — the Inception-v3 pool features of the usual FID,
  from ``torch-fidelity`` with weights that are already on disk (nothing is
  downloaded; ``ImportError`` / ``FileNotFoundError`` otherwise).

FID from a few hundred images is biased upwards; compare numbers computed
from the same number of images with the same extractor.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dalle_lightning.data.transforms import to_tensor

FeatureExtractor = Callable[[torch.Tensor], torch.Tensor]
"""Images (B, 3, H, W) float in [0, 1] → features (B, D)."""


def feature_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mean (D,), covariance (D, D), ddof=1) of ``features`` (N, D), N >= 2, in float64."""
    array = np.asarray(features, dtype=np.float64)
    if array.ndim != 2 or array.shape[0] < 2:
        raise ValueError(f"features must be (N, D) with N >= 2, got shape {array.shape}")
    return array.mean(axis=0), np.cov(array, rowvar=False).reshape(array.shape[1], array.shape[1])


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """d² between N(``mu1``, ``sigma1``) and N(``mu2``, ``sigma2``) (see the module docstring)."""
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    d = mu1.shape[0]
    if mu1.shape != (d,) or mu2.shape != (d,) or sigma1.shape != (d, d) or sigma2.shape != (d, d):
        raise ValueError(
            f"expected means (D,) and covariances (D, D); got {mu1.shape}, {sigma1.shape}, {mu2.shape}, {sigma2.shape}"
        )
    root1 = _psd_sqrt(sigma1)
    middle = root1 @ sigma2 @ root1
    eigenvalues = np.linalg.eigvalsh((middle + middle.T) / 2.0).clip(min=0.0)
    trace_covmean = float(np.sqrt(eigenvalues).sum())
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * trace_covmean)


def _psd_sqrt(matrix: np.ndarray) -> np.ndarray:
    """The symmetric square root of a symmetric positive semi-definite matrix (negative rounding clipped)."""
    eigenvalues, vectors = np.linalg.eigh((matrix + matrix.T) / 2.0)
    return (vectors * np.sqrt(eigenvalues.clip(min=0.0))) @ vectors.T


@torch.no_grad()
def extract_features(
    images: np.ndarray | torch.Tensor, extractor: FeatureExtractor, batch_size: int = 64
) -> np.ndarray:
    """float64 (N, D) features of ``images``: uint8 (N, H, W, 3) or float (N, 3, H, W) in [0, 1]."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if isinstance(images, np.ndarray):
        if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
            raise ValueError(f"expected uint8 images (N, H, W, 3), got {images.dtype} {images.shape}")
        batches = (to_tensor(images[i : i + batch_size]) for i in range(0, len(images), batch_size))
    else:
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images (N, 3, H, W), got {tuple(images.shape)}")
        batches = (images[i : i + batch_size].float() for i in range(0, len(images), batch_size))
    found = [extractor(batch).detach().float().cpu().numpy() for batch in batches]
    return np.concatenate(found).astype(np.float64)


def fid(
    real: np.ndarray | torch.Tensor,
    generated: np.ndarray | torch.Tensor,
    extractor: FeatureExtractor,
    batch_size: int = 64,
) -> float:
    """The Fréchet distance between ``real`` and ``generated`` images (at least two of each) in ``extractor``'s space."""
    real_stats = feature_statistics(extract_features(real, extractor, batch_size))
    generated_stats = feature_statistics(extract_features(generated, extractor, batch_size))
    return frechet_distance(*real_stats, *generated_stats)


def clip_features(scorer: Any) -> FeatureExtractor:
    """The unit-length image embeddings of a :class:`~dalle_lightning.generation.rerank.RerankScorer`."""
    return scorer.embed_images


INCEPTION_WEIGHTS_FILE = "weights-inception-2015-12-05-6726825d.pth"
"""The file name ``torch-fidelity`` gives the FID Inception weights (in the torch hub checkpoint folder)."""


def inception_features(
    weights_path: str | Path | None = None, device: str | torch.device = "cpu"
) -> FeatureExtractor:
    """The 2048-d pool features of the FID Inception-v3 (``torch-fidelity``), from local weights only.

    ``weights_path`` defaults to ``torch-fidelity``'s file in the torch hub
    checkpoint folder. ``ImportError`` without ``torch-fidelity``,
    ``FileNotFoundError`` when the weights are not on disk (nothing is downloaded).
    """
    try:
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
    except ImportError as err:
        raise ImportError(
            "Inception features need torch-fidelity (pip install torch-fidelity) and its weights on disk"
        ) from err
    path = (
        Path(weights_path)
        if weights_path is not None
        else Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_WEIGHTS_FILE
    )
    if not path.is_file():
        raise FileNotFoundError(f"no Inception weights at {path}: put them there or pass their path")
    model = FeatureExtractorInceptionV3(
        "inception-v3-compat", ["2048"], feature_extractor_weights_path=str(path)
    )
    model = model.to(device).eval()

    @torch.no_grad()
    def extract(images: torch.Tensor) -> torch.Tensor:
        pixels = images.clamp(0.0, 1.0).mul(255.0).round().to(device, torch.uint8)  # what it expects
        return model(pixels)[0].reshape(len(images), -1)

    return extract
