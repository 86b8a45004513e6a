"""Reranking: candidates come back in CLIP-score order, scores match the images, the grid PNG has every tile."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from dalle_lightning.data.transforms import to_tensor
from dalle_lightning.generation.rerank import (
    GRID_METADATA_CAPTIONS,
    GRID_METADATA_SCORES,
    RerankScorer,
    generate_and_rank,
    ranked_grid_png,
)
from dalle_lightning.generation.sampling import SamplingConfig
from dalle_lightning.models.dvae import DiscreteVAE, DVAEConfig
from dalle_lightning.models.transformer import DalleConfig, DalleTransformer
from dalle_lightning.stages.bpe import BPEConfig, CaptionEncoder, train_bpe

pytestmark = pytest.mark.timeout(60)

CAPTIONS = ["a red circle", "a big blue square above a small green triangle", "a yellow triangle"]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors: one thread is as fast, and does not stall when other work holds the other cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class RednessClip(torch.nn.Module):
    """A fake CLIP: an image's embedding is its unit-length mean colour, every caption's is pure red.

    Its score is how red an image is on average; it records the image sizes it was given.
    """

    def __init__(self, image_size: int = 8, text_len: int = 8) -> None:
        super().__init__()
        self.config = SimpleNamespace(image_size=image_size, text_len=text_len)
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # gives the scorer a device
        self.seen_sizes: list[tuple[int, int]] = []

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        self.seen_sizes.append(tuple(images.shape[2:]))
        return F.normalize(images.mean(dim=(2, 3)) + 1e-6, dim=-1)  # (B, 3)

    def encode_text(self, ids: torch.Tensor) -> torch.Tensor:
        assert ids.shape[1] == self.config.text_len
        return torch.tensor([[1.0, 0.0, 0.0]]).expand(len(ids), 3)


@pytest.fixture(scope="module")
def tokenizer():
    return train_bpe(CAPTIONS * 4, BPEConfig(vocab_size=300, min_frequency=1))


@pytest.fixture(scope="module")
def models(tokenizer):
    torch.manual_seed(0)
    vocab = tokenizer.get_vocab_size()
    dalle = DalleTransformer(
        DalleConfig(
            text_len=8,
            text_vocab=vocab,
            image_vocab=16,
            grid_size=4,
            n_layer=2,
            n_head=2,
            n_embd=16,
            conv_kernel=3,
        )
    ).eval()
    dvae = DiscreteVAE(
        DVAEConfig(image_size=16, n_hid=8, n_blk_per_group=1, group_count=3, vocab_size=16)
    ).eval()
    return dalle, dvae, CaptionEncoder(tokenizer, 8)


def _rank(models, tokenizer, n=6, top=None, captions=CAPTIONS, **kwargs):
    dalle, dvae, encoder = models
    clip = RednessClip()
    scorer = RerankScorer.from_model(clip, tokenizer)
    scorer.fake = clip
    config = SamplingConfig(temperature=1.0, seed=3, batch_size=4)
    return scorer, generate_and_rank(
        dalle, dvae, scorer, captions, encoder, n=n, top=top, config=config, **kwargs
    )


def test_candidates_come_back_best_first_with_the_scores_of_their_images(models, tokenizer):
    scorer, ranked = _rank(models, tokenizer, n=6)
    assert [r.caption for r in ranked] == CAPTIONS
    # 16 px dVAE images were resized to the CLIP's 8 px before scoring
    assert set(scorer.fake.seen_sizes) == {(8, 8)}
    for r in ranked:
        assert r.images.shape == (6, 16, 16, 3) and r.images.dtype == np.uint8
        assert r.scores.shape == (6,) and np.all(np.diff(r.scores) <= 0)  # best first
        assert sorted(r.order.tolist()) == list(range(6))
        # the score of each kept image is its own: rescoring the (quantised) images gives the same order
        again = scorer.score(to_tensor(r.images), scorer.embed_captions([r.caption]).expand(6, -1)).numpy()
        np.testing.assert_allclose(again, r.scores, atol=5e-3)
        np.testing.assert_array_equal(r.scores_in_sampling_order()[r.order], r.scores)
    assert len({r.images.tobytes() for r in ranked}) == len(CAPTIONS)  # captions get their own draws


def test_top_keeps_the_best_images_and_every_score(models, tokenizer):
    _, full = _rank(models, tokenizer, n=6)
    _, kept = _rank(models, tokenizer, n=6, top=2)
    for a, b in zip(full, kept, strict=True):
        assert b.images.shape[0] == 2 and b.scores.shape == (6,)
        np.testing.assert_array_equal(a.images[:2], b.images)  # the same seed draws the same candidates
        np.testing.assert_array_equal(a.order, b.order)


def test_progress_counts_every_image_token(models, tokenizer):
    calls: list[tuple[int, int]] = []
    _rank(
        models,
        tokenizer,
        n=3,
        captions=CAPTIONS[:2],
        progress=lambda done, total: calls.append((done, total)),
    )
    total = 2 * 3 * 16
    assert calls[-1] == (total, total)
    assert all(t == total for _, t in calls) and [d for d, _ in calls] == sorted(d for d, _ in calls)


def test_bad_requests_are_refused(models, tokenizer):
    dalle, dvae, encoder = models
    scorer = RerankScorer.from_model(RednessClip(), tokenizer)
    with pytest.raises(ValueError, match="top must be <= n"):
        generate_and_rank(dalle, dvae, scorer, CAPTIONS, encoder, n=2, top=3)
    with pytest.raises(ValueError, match="non-empty sequence"):
        generate_and_rank(dalle, dvae, scorer, "a red circle", encoder, n=2)
    other = DiscreteVAE(DVAEConfig(image_size=16, n_hid=8, n_blk_per_group=1, group_count=2, vocab_size=16))
    with pytest.raises(ValueError, match="grid"):
        generate_and_rank(dalle, other, scorer, CAPTIONS, encoder, n=2)


def test_scorer_takes_a_real_clip(tokenizer):
    from dalle_lightning.models.clip import ClipConfig, ClipModel

    torch.manual_seed(0)
    clip = ClipModel(
        ClipConfig(
            image_size=16,
            patch_size=8,
            vision_width=16,
            vision_layers=1,
            vision_heads=2,
            text_len=8,
            text_vocab=tokenizer.get_vocab_size(),
            text_width=16,
            text_layers=1,
            text_heads=2,
            embed_dim=8,
        )
    )
    scorer = RerankScorer.from_model(clip, tokenizer)
    images = torch.rand(3, 3, 32, 32)
    texts = scorer.embed_captions(CAPTIONS)
    scores = scorer.score(images, texts)
    assert scores.shape == (3,) and torch.all(scores.abs() <= 1.0 + 1e-5)
    expected = (scorer.embed_images(images) * texts).sum(-1)
    torch.testing.assert_close(scores, expected)


def test_scorer_takes_a_clip_scorer_that_resizes_images_itself(models, tokenizer):
    class AnySizeScorer:
        """tokenize / encode_image / encode_text, as dalle_lightning.models.clip_scorer's scorers have."""

        device = torch.device("cpu")

        def __init__(self) -> None:
            self.sizes: list[tuple[int, int]] = []

        def tokenize(self, captions):
            return torch.tensor([[len(c)] for c in captions])

        def encode_image(self, images):
            self.sizes.append(tuple(images.shape[2:]))
            return F.normalize(images.mean(dim=(2, 3)) + 1e-6, dim=-1)

        def encode_text(self, tokens):
            return F.normalize(torch.ones(len(tokens), 3), dim=-1)

    fake = AnySizeScorer()
    scorer = RerankScorer.from_clip_scorer(fake)
    dalle, dvae, encoder = models
    (ranked,) = generate_and_rank(
        dalle, dvae, scorer, CAPTIONS[:1], encoder, n=4, config=SamplingConfig(seed=0)
    )
    assert set(fake.sizes) == {(16, 16)}  # given the dVAE's images as they are
    assert np.all(np.diff(ranked.scores) <= 0)
    with pytest.raises(TypeError, match="tokenize"):
        RerankScorer.from_clip_scorer(RednessClip())


def test_grid_png_has_a_tile_per_image_and_the_scores(tmp_path):
    rng = np.random.default_rng(0)
    rows = [rng.integers(0, 255, (3, 16, 16, 3), dtype=np.uint8) for _ in range(2)]
    scores = [np.array([0.9, 0.5, 0.1, -0.2]), np.array([0.3, 0.2, 0.1])]  # longer arrays are cut to the row
    path = ranked_grid_png(rows, scores, tmp_path / "g" / "grid.png", captions=["one", "two"], min_tile=96)
    with Image.open(path) as grid:
        assert json.loads(grid.text[GRID_METADATA_SCORES]) == [[0.9, 0.5, 0.1], [0.3, 0.2, 0.1]]
        assert json.loads(grid.text[GRID_METADATA_CAPTIONS]) == ["one", "two"]
        tile_w, tile_h, pad, text_h = 96, 96 + 14, 4, 14  # 16 px enlarged 6× to reach 96, a score line below
        assert grid.size == (3 * (tile_w + pad) + pad, 2 * (text_h + tile_h + pad) + pad)
        pixels = np.asarray(grid)
    # the first image sits at its tile, enlarged by nearest neighbour
    np.testing.assert_array_equal(
        pixels[pad + text_h : pad + text_h + 96 : 6, pad : pad + 96 : 6], rows[0][0]
    )

    single = ranked_grid_png(rows[0], np.array([3.0, 2.0, 1.0]), tmp_path / "one.png", min_tile=16)
    with Image.open(single) as grid:
        assert json.loads(grid.text[GRID_METADATA_SCORES]) == [[3.0, 2.0, 1.0]]
        assert grid.size == (3 * (16 + pad) + pad, 16 + 14 + 2 * pad)
    with pytest.raises(ValueError, match="scores for 3 images"):
        ranked_grid_png(rows[0], np.array([1.0]), tmp_path / "bad.png")
