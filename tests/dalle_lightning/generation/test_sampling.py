"""Sampling image tokens: the KV cache changes nothing, guidance, filtering, seeds, decoding with the dVAE."""

from __future__ import annotations

import math

import pytest
import torch

from dalle_lightning.generation.sampling import (
    SamplingConfig,
    decode_to_images,
    filter_logits,
    guide,
    sample_image_tokens,
)
from dalle_lightning.models.dvae import DiscreteVAE, DVAEConfig
from dalle_lightning.models.transformer import DalleConfig, DalleTransformer

pytestmark = pytest.mark.timeout(60)

TINY = DalleConfig(
    text_len=5, text_vocab=20, image_vocab=16, grid_size=4, n_layer=4, n_head=2, n_embd=16, conv_kernel=3
)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors: one thread is as fast, and does not stall when other work holds the other cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model() -> DalleTransformer:
    torch.manual_seed(0)
    model = DalleTransformer(TINY).double()  # float64: cached and uncached logits agree to ~1e-16
    with torch.no_grad():  # peakier distributions than the initial near-uniform ones
        for head in (model.text_head, model.image_head):
            head.weight.mul_(50.0)
    return model.eval()


def _captions(batch: int = 3) -> torch.Tensor:
    text = torch.randint(1, 20, (batch, 5), generator=torch.Generator().manual_seed(0))
    text[0, 2:] = 0  # one short caption
    return text


SETTINGS = [
    SamplingConfig(temperature=0),
    SamplingConfig(temperature=1.0, seed=3),
    SamplingConfig(temperature=1.0, top_k=4, seed=4),
    SamplingConfig(temperature=0.7, top_p=0.8, seed=5),
    SamplingConfig(temperature=0, cond_scale=3.0),
    SamplingConfig(temperature=1.0, top_k=6, top_p=0.9, cond_scale=2.0, seed=6),
]


@pytest.mark.parametrize(
    "config", SETTINGS, ids=lambda c: f"t{c.temperature}-k{c.top_k}-p{c.top_p}-s{c.cond_scale}"
)
def test_cached_sampling_equals_uncached_sampling(model, config):
    text = _captions()
    cached = sample_image_tokens(model, text, config, use_cache=True)
    uncached = sample_image_tokens(model, text, config, use_cache=False)
    assert cached.shape == (3, 16) and cached.dtype == torch.long
    assert int(cached.min()) >= 0 and int(cached.max()) < 16
    assert torch.equal(cached, uncached)


def _image_logits(model: DalleTransformer, text: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
    tokens = torch.cat([torch.zeros(text.shape[0], 1, dtype=torch.long), text, image], dim=1)
    with torch.no_grad():
        return model.forward_with_cache(tokens, None)[1][:, -1]  # (B, Vi): the next image token


def test_greedy_follows_the_argmax_with_and_without_guidance(model):
    text = _captions()
    tokens = sample_image_tokens(model, text, SamplingConfig(temperature=0))
    for k in (0, 5, 15):
        assert torch.equal(tokens[:, k], _image_logits(model, text, tokens[:, :k]).argmax(-1))
    guided = sample_image_tokens(model, text, SamplingConfig(temperature=0, cond_scale=4.0))
    null = torch.zeros_like(text)  # every position its pad token
    for k in (0, 7, 15):
        cond = _image_logits(model, text, guided[:, :k])
        uncond = _image_logits(model, null, guided[:, :k])
        assert torch.equal(guided[:, k], (uncond + 4.0 * (cond - uncond)).argmax(-1))
    assert not torch.equal(guided, tokens)


def test_guide_mixes_the_two_halves():
    cond, uncond = torch.tensor([[1.0, 3.0]]), torch.tensor([[2.0, 2.0]])
    torch.testing.assert_close(guide(torch.cat([cond, uncond]), 3.0), torch.tensor([[-1.0, 5.0]]))
    torch.testing.assert_close(guide(torch.cat([cond, uncond]), 1.0), cond)


def test_filter_logits_keeps_the_top_k_and_the_nucleus():
    logits = torch.log(torch.tensor([[0.1, 0.4, 0.2, 0.3]]))

    def kept(**kw):
        return torch.isfinite(filter_logits(logits, **kw)).tolist()[0]

    assert kept(top_k=2) == [False, True, False, True]
    assert kept(top_p=0.5) == [False, True, False, True]  # 0.4 + 0.3 reach 0.5
    assert kept(top_p=0.4) == [False, True, False, False]
    assert kept(top_p=0.05) == [False, True, False, False]  # the most likely token always stays
    # top-p applies to the top-k renormalised: 0.4, 0.3, 0.2 over 0.9 = 0.44, 0.33, 0.22
    assert kept(top_k=3, top_p=0.8) == [False, True, True, True]
    assert kept(top_k=3, top_p=0.75) == [False, True, False, True]
    assert torch.equal(filter_logits(logits, top_k=4, top_p=1.0), logits)


def test_top_k_one_and_greedy_agree(model):
    text = _captions()
    greedy = sample_image_tokens(model, text, SamplingConfig(temperature=0))
    assert torch.equal(sample_image_tokens(model, text, SamplingConfig(top_k=1, seed=9)), greedy)


def test_seeds_and_generators(model):
    text = _captions()
    config = SamplingConfig(temperature=1.0, seed=1)
    first = sample_image_tokens(model, text, config)
    assert torch.equal(sample_image_tokens(model, text, config), first)
    assert not torch.equal(sample_image_tokens(model, text, SamplingConfig(seed=2)), first)
    from_generator = sample_image_tokens(
        model, text, SamplingConfig(seed=2), generator=torch.Generator().manual_seed(1)
    )
    assert torch.equal(from_generator, first)


def test_chunks_progress_and_training_mode(model):
    text = _captions(5)
    whole = sample_image_tokens(model, text, SamplingConfig(temperature=0))
    calls: list[tuple[int, int]] = []
    model.train()
    chunked = sample_image_tokens(
        model, text, SamplingConfig(temperature=0, batch_size=2), progress=lambda d, t: calls.append((d, t))
    )
    assert model.training  # put back as it was
    model.eval()
    assert torch.equal(chunked, whole)
    assert calls == [(k, 16) for k in range(1, 17)] * 3  # three chunks of 2, 2 and 1 captions


def test_bad_settings_name_the_field(model):
    for field, value in [
        ("temperature", -1.0),
        ("top_k", 0),
        ("top_p", 0.0),
        ("top_p", 1.5),
        ("batch_size", 0),
    ]:
        with pytest.raises(ValueError, match=field):
            SamplingConfig(**{field: value})
    with pytest.raises(ValueError, match="cond_scale"):
        SamplingConfig(cond_scale=-1.0)
    with pytest.raises(ValueError, match="text_tokens"):
        sample_image_tokens(model, torch.zeros(2, 4, dtype=torch.long))


def test_decode_to_images_uses_the_dvae():
    dvae = DiscreteVAE(
        DVAEConfig(image_size=16, n_hid=8, n_blk_per_group=1, group_count=3, vocab_size=16, n_init=8)
    )
    tokens = torch.randint(0, 16, (2, 16), generator=torch.Generator().manual_seed(0))
    images = decode_to_images(dvae, tokens)
    assert images.shape == (2, 3, 16, 16) and float(images.min()) >= 0 and float(images.max()) <= 1
    torch.testing.assert_close(images, dvae.decode_indices(tokens.view(2, 4, 4)))
    torch.testing.assert_close(decode_to_images(dvae, tokens.view(2, 4, 4)), images)
    with pytest.raises(ValueError, match="tokens of shape"):
        decode_to_images(dvae, tokens[:, :9])
    assert math.isfinite(float(images.sum()))
