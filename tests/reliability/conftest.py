"""Fixtures shared by the reliability tests (issue 7); helpers live in modules beside it (``hostile_web``)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest


@pytest.fixture
def one_torch_thread() -> Iterator[None]:
    """Torch on one thread: on the shared 2-core machine two threads are slower under contention."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
