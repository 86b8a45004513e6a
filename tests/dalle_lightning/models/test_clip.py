"""CLIP: config checks, shapes, unit-length embeddings, padding, the loss, recall, save/load, scorers."""

from __future__ import annotations

import importlib.util
import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from dalle_lightning.models.clip import (
    ClipConfig,
    ClipModel,
    contrastive_loss,
    load_clip,
    retrieval_recall,
    save_clip,
    sincos_positions_2d,
)
from dalle_lightning.models.clip_scorer import ClipScorer, OpenClipScorer, TrainedClipScorer, clip_similarity
from dalle_lightning.stages.bpe import PAD_ID, BPEConfig, CaptionEncoder, train_bpe

pytestmark = pytest.mark.timeout(60)

HAS_OPEN_CLIP = importlib.util.find_spec("open_clip") is not None


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors: one thread is as fast, and does not stall when other work holds the other cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


TINY = ClipConfig(
    image_size=16,
    patch_size=4,
    vision_width=32,
    vision_layers=2,
    vision_heads=4,
    text_len=8,
    text_vocab=300,
    text_width=32,
    text_layers=2,
    text_heads=4,
    embed_dim=24,
)
CAPTIONS = ["a small red circle at the top", "a big blue square left of a tiny green triangle"] * 4


@pytest.fixture(scope="module")
def tokenizer():
    return train_bpe(CAPTIONS, BPEConfig(vocab_size=280, min_frequency=1))


def _model(config: ClipConfig = TINY, seed: int = 0) -> ClipModel:
    torch.manual_seed(seed)
    return ClipModel(config).eval()


def _batch(config: ClipConfig = TINY, batch: int = 4, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(batch, 3, config.image_size, config.image_size, generator=g)
    ids = torch.randint(1, config.text_vocab, (batch, config.text_len), generator=g)
    ids[0, 3:] = PAD_ID  # a short caption
    ids[1, 1:] = PAD_ID  # a one-token caption
    return images, ids


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("image_size", 18),  # not a multiple of patch_size 4
        ("vision_width", 30),  # not a multiple of vision_heads 4
        ("text_width", 0),
        ("text_pad_id", 300),
        ("vision_pool", "median"),
        ("text_attention", "sparse"),
        ("text_pool", "first"),
        ("max_logit_scale", 1.0),
        ("init_logit_scale", math.log(200.0)),  # above ln(max_logit_scale)
        ("embed_dim", True),
    ],
)
def test_config_rejects_bad_values_naming_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        replace(TINY, **{field: value})


def test_defaults_are_the_papers_temperature_and_clip():
    config = ClipConfig()
    assert config.init_logit_scale == pytest.approx(math.log(1 / 0.07))
    assert config.max_logit_scale == 100.0
    model = _model(TINY)
    assert float(model.scale().detach()) == pytest.approx(1 / 0.07, rel=1e-5)
    with torch.no_grad():
        model.logit_scale.fill_(10.0)
    assert float(model.scale().detach()) == pytest.approx(100.0)


@pytest.mark.parametrize("vision_pool", ["cls", "mean", "max"])
@pytest.mark.parametrize(("attention", "pool"), [("causal", "last"), ("bidirectional", "mean")])
def test_shapes_and_unit_length_embeddings(vision_pool, attention, pool):
    config = replace(TINY, vision_pool=vision_pool, text_attention=attention, text_pool=pool)
    model = _model(config)
    images, ids = _batch(config)
    image_embeddings, text_embeddings = model.encode_image(images), model.encode_text(ids)
    assert image_embeddings.shape == text_embeddings.shape == (4, config.embed_dim)
    torch.testing.assert_close(image_embeddings.norm(dim=-1), torch.ones(4))
    torch.testing.assert_close(text_embeddings.norm(dim=-1), torch.ones(4))
    loss, logits = model(images, ids)
    assert loss.ndim == 0 and torch.isfinite(loss) and logits.shape == (4, 4)
    # different inputs, different embeddings (the encoders are not constant at initialisation)
    assert (image_embeddings @ image_embeddings.T).triu(1).max() < 0.999


def test_max_pooling_takes_each_channel_from_its_strongest_patch():
    """``vision_pool: max`` is the per-channel maximum over the patches' projected features, with no class
    token."""
    config = replace(TINY, vision_pool="max", vision_layers=1)
    model = _model(config)
    assert model.image_encoder.class_token is None
    assert model.image_encoder.position.shape == (config.num_patches, config.vision_width)
    images, _ = _batch(config)
    encoder = model.image_encoder
    with torch.no_grad():
        x = (images - model.image_mean) / model.image_std
        tokens = encoder.patchify(x).flatten(2).transpose(1, 2)
        tokens = encoder.ln_pre(tokens + encoder.position)
        for block in encoder.blocks:
            tokens = block(tokens)
        per_patch = encoder.proj(encoder.ln_post(tokens))  # (B, N, D)
        expected = F.normalize(per_patch.max(dim=1).values, dim=-1)
        torch.testing.assert_close(model.encode_image(images), expected)


def test_uint8_images_are_read_as_fractions_and_wrong_sizes_rejected():
    model = _model()
    images = torch.randint(0, 256, (2, 3, 16, 16), dtype=torch.uint8)
    torch.testing.assert_close(model.encode_image(images), model.encode_image(images.float() / 255))
    with pytest.raises(ValueError, match=r"\(B, 3, 16, 16\)"):
        model.encode_image(torch.rand(2, 3, 32, 32))
    with pytest.raises(ValueError, match="text_len=8"):
        model.encode_text(torch.ones(2, 5, dtype=torch.long))


@pytest.mark.parametrize(
    ("attention", "pool"),
    [("causal", "last"), ("causal", "mean"), ("bidirectional", "last"), ("bidirectional", "mean")],
)
def test_text_embedding_ignores_the_padding(attention, pool):
    """Whatever the pad token's embedding, a caption's embedding stays: pads are neither read nor pooled."""
    model = _model(replace(TINY, text_attention=attention, text_pool=pool))
    _, ids = _batch()
    ids[2, :] = PAD_ID  # an empty caption reads as its first position
    before = model.encode_text(ids)
    with torch.no_grad():
        model.text_encoder.token.weight[PAD_ID].normal_(std=5.0)
    after = model.encode_text(ids)
    rows = [0, 1, 3]  # row 2 is all pads: its first position is the pad token itself
    torch.testing.assert_close(after[rows], before[rows])
    assert torch.isfinite(after).all()


def test_loss_is_the_symmetric_cross_entropy():
    model = _model()
    images, ids = _batch(batch=5)
    loss, logits = model(images, ids)
    image_embeddings, text_embeddings = model.encode_image(images), model.encode_text(ids)
    expected_logits = (1 / 0.07) * image_embeddings @ text_embeddings.T
    torch.testing.assert_close(logits, expected_logits, rtol=1e-5, atol=1e-5)
    # by hand: -log softmax of the positive, over each row (image → texts) and each column (text → images)
    image_to_text = -torch.stack([F.log_softmax(expected_logits[i], 0)[i] for i in range(5)]).mean()
    text_to_image = -torch.stack([F.log_softmax(expected_logits[:, j], 0)[j] for j in range(5)]).mean()
    torch.testing.assert_close(loss, (image_to_text + text_to_image) / 2)
    torch.testing.assert_close(contrastive_loss(expected_logits), loss)


def test_contrastive_loss_rewards_matching_pairs():
    diagonal = torch.eye(4) * 50.0
    assert float(contrastive_loss(diagonal)) < 1e-6
    assert float(contrastive_loss(torch.zeros(4, 4))) == pytest.approx(math.log(4))


def test_retrieval_recall_counts_ranks_and_ties():
    gallery = torch.eye(3)
    queries = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, 0.7, 0.7]])  # 0 right, 1 wrong, 2 a tie
    assert retrieval_recall(queries, gallery, k=1) == pytest.approx(1 / 3)
    assert retrieval_recall(queries, gallery, k=2) == pytest.approx(2 / 3)  # query 1's item ranks 2nd or 3rd
    assert retrieval_recall(queries, gallery, k=3) == 1.0
    with pytest.raises(ValueError, match="must be"):
        retrieval_recall(queries, gallery[:2])


def test_sincos_positions_tell_every_patch_apart():
    grid = sincos_positions_2d(4, 32)
    assert grid.shape == (16, 32)
    distances = torch.cdist(grid, grid)
    assert distances[~torch.eye(16, dtype=torch.bool)].min() > 0.1
    model = _model()
    torch.testing.assert_close(model.image_encoder.position[1:], grid)  # after the class token's


def test_save_load_round_trip_with_weights_only(tmp_path, tokenizer):
    model = _model(seed=3)
    path = save_clip(model, tmp_path / "clip.pt", tokenizer)
    saved = torch.load(path, map_location="cpu", weights_only=True)
    assert set(saved) == {"format", "config", "state_dict", "tokenizer"}
    loaded, loaded_tokenizer = load_clip(path)
    assert loaded.config == model.config and not loaded.training
    assert loaded_tokenizer.to_str() == tokenizer.to_str()
    images, ids = _batch()
    torch.testing.assert_close(loaded.encode_image(images), model.encode_image(images))
    torch.testing.assert_close(loaded.encode_text(ids), model.encode_text(ids))
    # the tokenizer can also be given as the path of its JSON
    tokenizer_path = tmp_path / "tokenizer.json"
    tokenizer_path.write_text(tokenizer.to_str())
    _, again = load_clip(save_clip(model, tmp_path / "clip2.pt", tokenizer_path))
    assert again.to_str() == tokenizer.to_str()


def test_save_and_load_reject_what_does_not_fit(tmp_path, tokenizer):
    small_vocab = _model(replace(TINY, text_vocab=100))
    with pytest.raises(ValueError, match="text_vocab=100"):
        save_clip(small_vocab, tmp_path / "x.pt", tokenizer)
    torch.save({"config": {}, "state_dict": {}}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a CLIP file"):
        load_clip(tmp_path / "other.pt")
    path = save_clip(_model(), tmp_path / "clip.pt", tokenizer)
    saved = torch.load(path, weights_only=True)
    saved["config"]["vision_layers"] = 3
    torch.save(saved, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="do not fit"):
        load_clip(tmp_path / "bad.pt")


def test_trained_clip_scorer(tmp_path, tokenizer):
    model = _model(seed=1)
    scorer = TrainedClipScorer.load(save_clip(model, tmp_path / "clip.pt", tokenizer))
    assert isinstance(scorer, ClipScorer)
    tokens = scorer.tokenize(CAPTIONS[:2])
    expected, _ = CaptionEncoder(tokenizer, TINY.text_len).encode_batch(CAPTIONS[:2])
    assert torch.equal(tokens, torch.from_numpy(expected))
    # any image size: the centred square is resized to the model's input
    images = torch.rand(2, 3, 24, 40)
    embeddings = scorer.encode_image(images)
    assert embeddings.shape == (2, TINY.embed_dim)
    same_size = scorer.encode_image(images[:, :, :, 8:32])
    torch.testing.assert_close(embeddings, same_size)
    scores = clip_similarity(scorer, images, CAPTIONS[:2])
    direct = (embeddings * model.encode_text(tokens)).sum(-1)
    torch.testing.assert_close(scores, direct.detach())
    with pytest.raises(ValueError, match="one caption per image"):
        clip_similarity(scorer, images, CAPTIONS[:3])


@pytest.mark.skipif(HAS_OPEN_CLIP, reason="open_clip is installed: the adapter test runs instead")
def test_open_clip_scorer_says_how_to_install_open_clip(tmp_path):
    with pytest.raises(ImportError, match="pip install open_clip_torch"):
        OpenClipScorer("ViT-B-32", tmp_path / "weights.bin")


@pytest.mark.skipif(
    not HAS_OPEN_CLIP, reason="open_clip is not installed (optional; pip install open_clip_torch)"
)
def test_open_clip_scorer_loads_local_weights(tmp_path):
    import json

    import open_clip

    # a tiny architecture, so that the test needs no download and little memory
    config = {
        "embed_dim": 16,
        "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
    }
    (tmp_path / "clip-test-tiny.json").write_text(json.dumps(config))
    open_clip.add_model_config(tmp_path / "clip-test-tiny.json")
    torch.manual_seed(0)
    reference = open_clip.create_model("clip-test-tiny")
    weights = tmp_path / "weights.pt"
    torch.save(reference.state_dict(), weights)
    with pytest.raises(FileNotFoundError, match="not found"):
        OpenClipScorer("clip-test-tiny", tmp_path / "missing.pt")

    scorer = OpenClipScorer("clip-test-tiny", weights)
    assert isinstance(scorer, ClipScorer) and scorer.image_size == 32
    loaded = scorer.model.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in reference.state_dict().items())  # the weights given
    images = torch.rand(3, 3, 48, 48)
    embeddings = scorer.encode_image(images)
    assert embeddings.shape == (3, 16)
    torch.testing.assert_close(embeddings.norm(dim=-1), torch.ones(3))
    tokens = scorer.tokenize(CAPTIONS[:3])
    assert tokens.shape == (3, 77)
    torch.testing.assert_close(scorer.encode_text(tokens).norm(dim=-1), torch.ones(3))
    assert clip_similarity(scorer, images, CAPTIONS[:3]).shape == (3,)
