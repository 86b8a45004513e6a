"""Cosine schedules of dVAE training (Ramesh et al. 2021, Appendix A.2).

The paper anneals three quantities with cosine schedules: the relaxation
temperature τ from 1 to 1/16 over the first 150,000 updates, the KL weight β
from 0 to 6.6 over the first 5,000 updates, and the step size from 1e-4 to
1.25e-6 over 1,200,000 updates. Each holds its end value afterwards.
"""

from __future__ import annotations

import math


def cosine_schedule(step: int, total: int, start: float, end: float) -> float:
    """``end + (start - end) * (1 + cos(π · min(step, total) / total)) / 2``; ``end`` when ``total`` is 0.

    Equals ``start`` at step 0, ``(start + end) / 2`` halfway and ``end`` from
    ``total`` on.
    """
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if total < 0:
        raise ValueError(f"total must be >= 0, got {total}")
    if total == 0:
        return float(end)
    progress = min(step, total) / total
    return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * progress))


def temperature_schedule(step: int, total: int = 150_000, start: float = 1.0, end: float = 1.0 / 16) -> float:
    """Gumbel-softmax temperature τ at ``step`` (paper: 1 → 1/16 over 150,000 updates)."""
    return cosine_schedule(step, total, start, end)


def kl_weight_schedule(step: int, total: int = 5_000, start: float = 0.0, end: float = 6.6) -> float:
    """KL weight β at ``step`` (paper: 0 → 6.6 over 5,000 updates)."""
    return cosine_schedule(step, total, start, end)


def learning_rate_schedule(
    step: int, total: int = 1_200_000, start: float = 1e-4, end: float = 1.25e-6
) -> float:
    """Step size at ``step`` (paper: 1e-4 → 1.25e-6 over 1,200,000 updates)."""
    return cosine_schedule(step, total, start, end)
