"""Exact caption accuracy on the synthetic ``shapes`` data, read back by the checker (no learned judge).

For each evaluation caption the scene it was made from is known. A generated
image is right when :func:`~dalle_lightning.synth.checker.read_shapes` finds
the caption's objects in it with every attribute right (colour, shape, size,
position: ``compare(...)["all"]``). Every candidate of a caption is checked,
and the accuracy of the top-ranked of N candidates is the expected
correctness of the best-scored of a random N-subset
(:func:`~.estimates.best_of_n`; N = 1 is the share of correct samples).

Captions are split by pairing (DESIGN.md, Evaluation): ``seen`` when every
colour–shape pairing in the caption occurs in the training split, ``heldout``
when one of them was held out of it (zero-shot composition). The dVAE's
round trip of the real images of the same captions, checked the same way, is
the ceiling: the transformer cannot draw better than its dVAE decodes.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from dalle_lightning.evaluation.estimates import Estimate, best_of_n, mean_stderr
from dalle_lightning.synth.checker import compare, read_shapes
from dalle_lightning.synth.shapes import ShapeObject

SEEN = "seen"
HELDOUT = "heldout"
PAIRINGS = (SEEN, HELDOUT)
_SPLIT_PAIRING = {"train": SEEN, "heldout": HELDOUT}


def pairing_of_split(split: str) -> str:
    """``seen`` for a ``train``-split scene, ``heldout`` for a ``heldout`` one (see :mod:`~dalle_lightning.synth.shapes`)."""
    if split not in _SPLIT_PAIRING:
        raise ValueError(f"split must be one of {sorted(_SPLIT_PAIRING)}, got {split!r}")
    return _SPLIT_PAIRING[split]


def check_images(images: np.ndarray, truth: Sequence[ShapeObject]) -> np.ndarray:
    """bool (N,): whether each uint8 image (N, H, W, 3) shows exactly the objects of ``truth``."""
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"expected images (N, H, W, 3), got shape {images.shape}")
    truth = list(truth)
    return np.array([compare(read_shapes(image), truth)["all"] for image in images], dtype=bool)


def accuracy_by_pairing(values: Sequence[float] | np.ndarray, pairings: Sequence[str]) -> dict[str, Estimate]:
    """Mean ± stderr of per-caption ``values`` for ``seen``, ``heldout`` (those present) and ``all``."""
    array = np.asarray(values, dtype=np.float64)
    labels = np.asarray(list(pairings))
    if array.shape != labels.shape:
        raise ValueError(f"got {labels.size} pairings for {array.size} captions")
    unknown = sorted(set(labels.tolist()) - set(PAIRINGS))
    if unknown:
        raise ValueError(f"pairings must be {PAIRINGS}, got {unknown}")
    found = {p: mean_stderr(array[labels == p]) for p in PAIRINGS if (labels == p).any()}
    return {**found, "all": mean_stderr(array)}


def shapes_accuracy(
    ranked_images: Sequence[np.ndarray],
    truths: Sequence[Sequence[ShapeObject]],
    pairings: Sequence[str],
    ns: Sequence[int] = (1, 16),
) -> dict[int, dict[str, Estimate]]:
    """``{N: {pairing: accuracy of the top-ranked of N candidates}}`` over the captions.

    ``ranked_images[c]`` holds all ``N_max`` candidates of caption ``c`` as
    uint8 (N_max, H, W, 3), best-ranked first (e.g.
    :attr:`~dalle_lightning.generation.rerank.RankedSamples.images` drawn with
    ``top=None``); ``truths[c]`` its scene's objects, ``pairings[c]`` ``seen``
    or ``heldout``. Every N must be at most ``N_max``.
    """
    if not len(ranked_images) == len(truths) == len(pairings) or not ranked_images:
        raise ValueError(
            f"need one truth and one pairing per caption and at least one caption; got {len(ranked_images)} "
            f"image sets, {len(truths)} truths, {len(pairings)} pairings"
        )
    counts = {len(images) for images in ranked_images}
    if len(counts) != 1:
        raise ValueError(f"every caption needs the same number of candidates, got {sorted(counts)}")
    total = counts.pop()
    bad = [n for n in ns if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= total]
    if bad:
        raise ValueError(f"every N must be an integer in [1, {total}] (the candidates given), got {bad}")
    correct = np.stack(
        [check_images(images, truth) for images, truth in zip(ranked_images, truths, strict=True)]
    )
    return accuracy_from_checks(correct, pairings, ns)


def accuracy_from_checks(
    correct: np.ndarray, pairings: Sequence[str], ns: Sequence[int] = (1, 16)
) -> dict[int, dict[str, Estimate]]:
    """:func:`shapes_accuracy` from the checks already made: ``correct`` bool (C, N_max), best-ranked first."""
    correct = np.asarray(correct, dtype=np.float64)
    if correct.ndim != 2 or correct.shape[0] != len(pairings):
        raise ValueError(f"correct must be (captions={len(pairings)}, candidates), got shape {correct.shape}")
    bad = [n for n in ns if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= correct.shape[1]]
    if bad:
        raise ValueError(
            f"every N must be an integer in [1, {correct.shape[1]}] (the candidates given), got {bad}"
        )
    return {n: accuracy_by_pairing(best_of_n(correct, n), pairings) for n in ns}


@torch.no_grad()
def dvae_round_trip(dvae: torch.nn.Module, images: np.ndarray, batch_size: int = 64) -> np.ndarray:
    """uint8 (N, H, W, 3): ``images`` (uint8, the dVAE's size) encoded to codes and decoded again."""
    from dalle_lightning.data.transforms import to_tensor, to_uint8

    device = next(dvae.parameters()).device
    out = []
    for start in range(0, len(images), batch_size):
        batch = to_tensor(images[start : start + batch_size]).to(device)
        out.append(to_uint8(dvae.decode_indices(dvae.get_codebook_indices(batch))))
    return np.concatenate(out)


def dvae_ceiling(
    reconstructions: np.ndarray, truths: Sequence[Sequence[ShapeObject]], pairings: Sequence[str]
) -> dict[str, Estimate]:
    """Accuracy of the dVAE round trips (:func:`dvae_round_trip`) of the captions' real images, by pairing."""
    if len(reconstructions) != len(truths):
        raise ValueError(f"got {len(truths)} truths for {len(reconstructions)} images")
    correct = [
        bool(check_images(image[None], truth)[0])
        for image, truth in zip(reconstructions, truths, strict=True)
    ]
    return accuracy_by_pairing(correct, pairings)


def accuracy_metrics(
    accuracy: dict[int, dict[str, Estimate]], ceiling: dict[str, Estimate] | None = None
) -> dict[str, float]:
    """Flat metrics: ``shapes_accuracy_{pairing}_n{N}`` (+ ``_stderr``), ``shapes_captions_{pairing}``,
    and ``dvae_ceiling_{pairing}`` (+ ``_stderr``); non-finite standard errors are left out."""
    metrics: dict[str, float] = {}
    for n, by_pairing in accuracy.items():
        for pairing, estimate in by_pairing.items():
            _put(metrics, f"shapes_accuracy_{pairing}_n{n}", estimate)
            metrics[f"shapes_captions_{pairing}"] = float(estimate.count)
    for pairing, estimate in (ceiling or {}).items():
        _put(metrics, f"dvae_ceiling_{pairing}", estimate)
    return metrics


def _put(metrics: dict[str, float], name: str, estimate: Estimate) -> None:
    metrics[name] = estimate.mean
    if np.isfinite(estimate.stderr):
        metrics[f"{name}_stderr"] = estimate.stderr
