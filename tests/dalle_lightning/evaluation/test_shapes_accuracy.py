"""Shapes accuracy bookkeeping: real renders as samples score 1, corrupted ones 0, split by seen / held-out pairing."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dalle_lightning.evaluation.eval_sets import EvalSetConfig, shapes_eval_set
from dalle_lightning.evaluation.shapes_accuracy import (
    accuracy_by_pairing,
    accuracy_metrics,
    check_images,
    dvae_ceiling,
    dvae_round_trip,
    pairing_of_split,
    shapes_accuracy,
)
from dalle_lightning.synth.shapes import HELDOUT_PAIRS

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors: one thread is as fast, and does not stall when other work holds the other cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def eval_set():
    return shapes_eval_set(EvalSetConfig(count=16, seed=11), image_size=32)


def _blank(images: np.ndarray) -> np.ndarray:
    """The images with their objects painted over in the background colour: nothing to find."""
    return np.broadcast_to(
        np.median(images.reshape(len(images), -1, 3), axis=1)[:, None, None], images.shape
    ).astype(np.uint8)


def test_eval_set_mixes_seen_and_heldout_pairings(eval_set):
    summary = eval_set.summary()
    assert summary["captions"] == 16 and summary["seen"] > 0 and summary["heldout"] > 0
    assert eval_set.images.shape == (16, 32, 32, 3)
    for truth, pairing in zip(eval_set.truths, eval_set.pairings, strict=True):
        held = any((o.colour, o.shape) in HELDOUT_PAIRS for o in truth)
        assert held == (pairing == "heldout")
    again = shapes_eval_set(EvalSetConfig(count=16, seed=11), image_size=32)
    assert again.fingerprint == eval_set.fingerprint and again.captions == eval_set.captions
    assert (
        shapes_eval_set(EvalSetConfig(count=16, seed=12), image_size=32).fingerprint != eval_set.fingerprint
    )


def test_real_renders_score_one_and_corrupted_ones_zero(eval_set):
    real = [
        np.repeat(image[None], 4, axis=0) for image in eval_set.images
    ]  # 4 candidates, all the real image
    accuracy = shapes_accuracy(real, eval_set.truths, eval_set.pairings, ns=(1, 4))
    for n in (1, 4):
        for pairing in ("seen", "heldout", "all"):
            assert accuracy[n][pairing].mean == 1.0 and accuracy[n][pairing].stderr == 0.0
    counts = accuracy[1]
    assert counts["seen"].count + counts["heldout"].count == counts["all"].count == 16

    blank = [_blank(candidates) for candidates in real]
    zero = shapes_accuracy(blank, eval_set.truths, eval_set.pairings, ns=(1, 4))
    assert all(zero[n][p].mean == 0.0 for n in (1, 4) for p in ("seen", "heldout", "all"))

    # swapping every caption's scene for the next one's: wrong objects, also 0 (up to coincidences)
    shifted = shapes_accuracy(real, eval_set.truths[1:] + eval_set.truths[:1], eval_set.pairings, ns=(1,))
    assert shifted[1]["all"].mean <= 1 / 16


def test_accuracy_follows_the_rank_of_the_right_image(eval_set):
    # best-ranked candidate right, the other three blank: right at N=4 always, at N=1 a quarter of the time
    mixed = [
        np.concatenate([image[None], _blank(np.repeat(image[None], 3, axis=0))]) for image in eval_set.images
    ]
    accuracy = shapes_accuracy(mixed, eval_set.truths, eval_set.pairings, ns=(1, 2, 4))
    assert accuracy[4]["all"].mean == pytest.approx(1.0)
    assert accuracy[2]["all"].mean == pytest.approx(0.5)  # rank 0 is in half the 2-subsets
    assert accuracy[1]["all"].mean == pytest.approx(0.25)
    # the right one ranked last: only N=1 ever picks it
    last = [candidates[::-1] for candidates in mixed]
    assert shapes_accuracy(last, eval_set.truths, eval_set.pairings, ns=(4,))[4]["all"].mean == 0.0


def test_dvae_ceiling_and_round_trip(eval_set):
    assert dvae_ceiling(eval_set.images, eval_set.truths, eval_set.pairings)["all"].mean == 1.0
    assert dvae_ceiling(_blank(eval_set.images), eval_set.truths, eval_set.pairings)["heldout"].mean == 0.0
    from dalle_lightning.models.dvae import DiscreteVAE, DVAEConfig

    torch.manual_seed(0)
    dvae = DiscreteVAE(
        DVAEConfig(image_size=32, n_hid=8, n_blk_per_group=1, group_count=3, vocab_size=16)
    ).eval()
    trips = dvae_round_trip(dvae, eval_set.images[:5], batch_size=2)
    assert trips.shape == (5, 32, 32, 3) and trips.dtype == np.uint8


def test_metrics_bookkeeping():
    by_pairing = accuracy_by_pairing([1.0, 0.0, 1.0, 1.0], ["seen", "seen", "heldout", "heldout"])
    assert (
        by_pairing["seen"].mean == 0.5
        and by_pairing["heldout"].mean == 1.0
        and by_pairing["all"].mean == 0.75
    )
    metrics = accuracy_metrics({1: by_pairing}, {"all": by_pairing["all"]})
    assert metrics["shapes_accuracy_seen_n1"] == 0.5 and metrics["shapes_captions_heldout"] == 2.0
    assert metrics["shapes_accuracy_seen_n1_stderr"] == pytest.approx(0.5)
    assert metrics["dvae_ceiling_all"] == 0.75
    assert pairing_of_split("train") == "seen" and pairing_of_split("heldout") == "heldout"
    with pytest.raises(ValueError, match="pairings"):
        accuracy_by_pairing([1.0], ["novel"])
    assert check_images(np.zeros((2, 32, 32, 3), np.uint8), []).tolist() == [True, True]  # nothing, as asked
