"""Acceptance (issue 5): for "a red circle" on ``shapes``, >= 90 % of the top 16 hits are red circles by the checker.

The ``tiny_search`` CLIP preset is trained with the project's own trainer on
20,000 rendered 32 px ``shapes`` scenes of one object each (every
colour–shape pairing in training: this measures search, not zero-shot
composition), 500 other images — one or two objects, as the data set makes
them — are embedded by the embed stage, and the hits of
``ImageSearch.search`` are read back from the ``filter`` dataset and judged by
:func:`dalle_lightning.synth.checker.read_shapes`, which is right on all four
attributes of 100 % of such images.
"""

from __future__ import annotations

import time

import pytest
import torch

from bench.search_quality import index_split, train_search_clip, write_filtered
from dalle_lightning.data.transforms import decode_image
from dalle_lightning.models.clip import load_clip
from dalle_lightning.synth.checker import read_shapes
from dalle_lightning.training.clip_train import load_preset

pytest.importorskip("faiss", reason="faiss-cpu is not installed (the `search` extra)")

# slow: about three minutes on 2 CPU threads. The `tiny` preset (full captions, half the scenes with two
# objects) stays shape-blind at this size: 6–9/16 red circles, zero-shot shape on lone objects at chance
# (measured 2026-11-25 and 2026-12-06, with object captions, hard negatives, max pooling, 20,000 images,
# 2,400 steps). Lone-object scenes with short object captions (`tiny_search`) learn shape: 16/16 on
# 2026-12-06 (docs/benchmarks.md, "Search on shapes").
pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(600)]

SIZE = 32
TRAIN_IMAGES = 20_000
SEARCH_IMAGES = 500
K = 16
QUERY = "a red circle"
TRAIN_SECONDS = 300  # guard: the preset's 2,400 steps take ~3 minutes on 2 threads
THREADS = 2


def test_red_circle_search_on_shapes(tmp_path):
    threads = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    try:
        root = str(tmp_path / "root")
        write_filtered(root, "train", TRAIN_IMAGES, seed=10, shards=8, p_two_objects=0.0)
        write_filtered(root, "search", SEARCH_IMAGES, seed=11, shards=2)

        start = time.perf_counter()
        result = train_search_clip(root, load_preset("tiny_search"), tmp_path / "clip")
        train_seconds = time.perf_counter() - start
        clip_path, steps = str(result["model_path"]), int(result["steps"])

        model, _ = load_clip(clip_path)
        assert model.config.image_size == SIZE
        searcher = index_split(root, "search", clip_path)
        hits = searcher.search(QUERY, K)
        images = searcher.index.image_bytes(hits)
    finally:
        torch.set_num_threads(threads)

    found = [read_shapes(decode_image(data)) for data in images]
    good = [any(o.colour == "red" and o.shape == "circle" for o in objects) for objects in found]
    report = "\n".join(
        f"{'ok ' if g else 'BAD'} {h.score:.3f} {h.caption!r} read as {[(o.colour, o.shape) for o in objs]}"
        for g, h, objs in zip(good, hits, found, strict=True)
    )
    print(
        f"\n{steps} steps in {train_seconds:.1f} s; {sum(good)}/{K} hits for {QUERY!r} are red circles:\n{report}"
    )
    assert sum(good) >= 0.9 * K, f"{sum(good)}/{K} hits for {QUERY!r} are red circles:\n{report}"
    assert train_seconds < TRAIN_SECONDS, f"training took {train_seconds:.0f} s"
