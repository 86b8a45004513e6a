"""The DALL-E transformer: config and presets, shapes, the loss, pad tokens, masks, backends, the KV cache."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from dalle_lightning.models.attention_masks import MASK_KINDS, dense_mask
from dalle_lightning.models.transformer import (
    PRESETS,
    DalleConfig,
    DalleTransformer,
    flops_per_token,
    load_dalle_preset,
)
from dalle_lightning.training.dvae_train import load_preset as load_dvae_preset

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors: one thread is as fast, and does not stall when other work holds the other cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


TINY = DalleConfig(
    text_len=5, text_vocab=20, image_vocab=16, grid_size=4, n_layer=5, n_head=2, n_embd=16, conv_kernel=3
)


def _model(config: DalleConfig = TINY, seed: int = 0, kind: str | None = None) -> DalleTransformer:
    torch.manual_seed(seed)
    model = DalleTransformer(config).double().eval()
    if kind is not None:  # every layer under one mask
        for block in model.blocks:
            block.attn.kind = kind
    return model


def _batch(config: DalleConfig = TINY, batch: int = 3, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    text = torch.randint(1, config.text_vocab, (batch, config.text_len), generator=g)
    text[0, 3:] = config.text_pad_id  # a short caption
    image = torch.randint(0, config.image_vocab, (batch, config.image_len), generator=g)
    return text, image


def _flex_twin(model: DalleTransformer) -> DalleTransformer:
    twin = DalleTransformer(replace(model.config, attention_backend="flex")).double().eval()
    twin.load_state_dict(model.state_dict())
    for mine, theirs in zip(model.blocks, twin.blocks, strict=True):
        theirs.attn.kind = mine.attn.kind
    return twin


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("text_len", 0),
        ("n_head", 3),  # 16 is not a multiple
        ("text_pad_id", 20),
        ("attention", "sparse-ish"),
        ("attention_backend", "triton"),
        ("conv_kernel", 4),
        ("dropout", 1.0),
        ("image_loss_weight", -1.0),
        ("init_std", 0.0),
    ],
)
def test_bad_config_values_name_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        replace(TINY, **{field: value})


def test_presets_load_and_fit_their_dvae():
    for name in PRESETS:
        assert isinstance(load_dalle_preset(name), DalleConfig)
    paper = load_dalle_preset("paper")
    assert (paper.text_len, paper.text_vocab, paper.image_vocab, paper.grid_size) == (256, 16384, 8192, 32)
    assert (paper.n_layer, paper.n_embd, paper.n_head, paper.seq_len) == (64, 3968, 62, 1280)
    assert 12 * paper.n_layer * paper.n_embd**2 == pytest.approx(12.1e9, rel=0.01)  # "12-billion parameter"
    assert paper.text_loss_weight == 1 / 8 and paper.image_loss_weight == 7 / 8
    for name in ("tiny", "small"):
        dalle, dvae = load_dalle_preset(name), load_dvae_preset(name).model
        assert (dalle.grid_size, dalle.image_vocab) == (dvae.grid_size, dvae.vocab_size)
    tiny = DalleTransformer(load_dalle_preset("tiny"))
    assert [b.attn.kind for b in tiny.blocks] == ["row", "column", "row", "conv"]
    with pytest.raises(ValueError, match="presets are"):
        load_dalle_preset("huge")


def test_shapes_and_the_weighted_loss():
    model = _model()
    text, image = _batch()
    out = model(text, image.view(3, 4, 4))  # a grid is accepted too
    assert out.text_logits.shape == (3, 5, 20 + 5) and out.image_logits.shape == (3, 16, 16)
    text_targets = torch.where(text == 0, 20 + torch.arange(5), text)
    text_nll = -out.text_logits.log_softmax(-1).gather(-1, text_targets[..., None]).mean()
    image_nll = -out.image_logits.log_softmax(-1).gather(-1, image[..., None]).mean()
    torch.testing.assert_close(out.text_loss, text_nll)
    torch.testing.assert_close(out.image_loss, image_nll)
    torch.testing.assert_close(out.loss, text_nll / 8 + 7 * image_nll / 8)
    zero_text = DalleTransformer(replace(TINY, text_loss_weight=0.0, image_loss_weight=1.0)).double()
    zero_text.load_state_dict(model.state_dict())
    torch.testing.assert_close(zero_text(text, image).loss, image_nll)


def test_each_parameter_gets_a_gradient():
    model = _model()
    model(*_batch()).loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        if not name.startswith("text_emb"):  # rows of unused text tokens get none
            assert p.grad.abs().sum() > 0, name


def test_pad_tokens_are_learned_per_position():
    model = _model()
    text, image = _batch()
    assert model.text_targets(text)[0].tolist() == [*text[0, :3].tolist(), 20 + 3, 20 + 4]
    before = model(text, image)
    with torch.no_grad():
        model.text_emb.weight[0] += torch.randn(16, dtype=torch.float64)  # the pad id's own row is never used
    torch.testing.assert_close(model(text, image).image_logits, before.image_logits)
    with torch.no_grad():
        model.text_emb.weight[20 + 4] += torch.randn(
            16, dtype=torch.float64
        )  # the pad of text position 4 (input position 5)
    after = model(text, image)
    torch.testing.assert_close(after.text_logits[0], before.text_logits[0])  # positions 0…4 come before it
    assert not torch.allclose(after.image_logits[0], before.image_logits[0])  # caption 0 is padded there
    torch.testing.assert_close(after.image_logits[1:], before.image_logits[1:])  # the others are not


def _outputs(model: DalleTransformer, text: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
    out = model(text, image)
    return torch.cat([out.text_logits[..., :16], out.image_logits], dim=1)  # (B, T, 16): position order


@pytest.mark.parametrize("kind", MASK_KINDS)
def test_no_output_depends_on_a_later_token(kind):
    model = _model(kind=kind)
    text, image = _batch()
    base = _outputs(model, text, image)
    for p in range(1, TINY.seq_len + 1):  # input position p (the last image token is never fed)
        t, i = text.clone(), image.clone()
        if p <= TINY.text_len:
            t[:, p - 1] = (t[:, p - 1] % 19) + 1
        else:
            i[:, p - TINY.text_len - 1] = (i[:, p - TINY.text_len - 1] + 1) % 16
        changed = _outputs(model, t, i)
        torch.testing.assert_close(changed[:, :p], base[:, :p])
        assert p == TINY.seq_len or not torch.allclose(changed[:, p:], base[:, p:])


@pytest.mark.parametrize("kind", MASK_KINDS)
def test_one_layer_sees_exactly_its_mask(kind):
    config = replace(TINY, n_layer=1)
    model = _model(config, kind=kind)
    text, image = _batch(config, batch=1)
    base = _outputs(model, text, image)[0]
    seen = torch.zeros(config.seq_len, config.seq_len, dtype=torch.bool)  # [query, key]
    for p in range(1, config.seq_len):
        t, i = text.clone(), image.clone()
        if p <= config.text_len:
            t[0, p - 1] = (t[0, p - 1] % 19) + 1
        else:
            i[0, p - config.text_len - 1] = (i[0, p - config.text_len - 1] + 1) % 16
        seen[:, p] = (_outputs(model, t, i)[0] - base).abs().amax(dim=-1) > 1e-12
    expected = dense_mask(kind, config.layout)[: config.seq_len, : config.seq_len]
    assert torch.equal(seen[:, 1:], expected[:, 1:])  # position 0, the start token, is not a token


@pytest.mark.parametrize("kind", [None, *MASK_KINDS])
def test_flex_and_dense_backends_agree(kind):
    model = _model(kind=kind)
    flex = _flex_twin(model)
    text, image = _batch()
    with torch.no_grad():  # FlexAttention has no backward on CPU
        dense_out, flex_out = model(text, image), flex(text, image)
    torch.testing.assert_close(flex_out.text_logits, dense_out.text_logits)
    torch.testing.assert_close(flex_out.image_logits, dense_out.image_logits)
    torch.testing.assert_close(flex_out.loss, dense_out.loss)


def test_full_attention_config_uses_causal_masks():
    model = _model(replace(TINY, attention="full"))
    assert {b.attn.kind for b in model.blocks} == {"full"}
    with torch.no_grad():
        torch.testing.assert_close(_flex_twin(model)(*_batch()).loss, model(*_batch()).loss)


@pytest.mark.parametrize("backend", ["dense", "flex"])
def test_cached_decoding_equals_the_whole_sequence(backend):
    model = _model()
    if backend == "flex":
        model = _flex_twin(model)  # the whole-sequence pass runs on flex, the cached steps on dense
    text, image = _batch()
    tokens = torch.cat([torch.zeros(3, 1, dtype=torch.long), text, image[:, :-1]], dim=1)  # (B, T)
    with torch.no_grad():
        whole_text, whole_image = model.forward_with_cache(tokens, None)
        cache = model.new_cache(3)
        steps = [
            (0, 3),
            (3, 7),
            *((p, p + 1) for p in range(7, TINY.seq_len)),
        ]  # prefill in parts, then one by one
        text_parts, image_parts = zip(
            *(model.forward_with_cache(tokens[:, a:b], cache, a) for a, b in steps), strict=True
        )
        out = model(text, image)
    torch.testing.assert_close(torch.cat(text_parts, 1), whole_text)
    torch.testing.assert_close(torch.cat(image_parts, 1), whole_image)
    torch.testing.assert_close(whole_text, out.text_logits)
    torch.testing.assert_close(whole_image, out.image_logits)


def test_bad_inputs_are_value_errors():
    model = _model()
    text, image = _batch()
    with pytest.raises(ValueError, match="text of shape"):
        model(text[:, :4], image)
    with pytest.raises(ValueError, match="image tokens"):
        model(text, image[:, :15])
    with pytest.raises(ValueError, match="start_pos"):
        model.forward_with_cache(image[:, :1], None, 6)
    with pytest.raises(ValueError, match="seq_len"):
        model.forward_with_cache(image[:, :2], model.new_cache(3), TINY.seq_len - 1)


def test_flops_per_token_counts_the_matmuls():
    model = _model()
    c = TINY
    block_weights = sum(m.weight.numel() for m in model.blocks.modules() if isinstance(m, torch.nn.Linear))
    assert block_weights == 12 * c.n_layer * c.n_embd**2
    heads = (
        c.text_len * model.text_head.weight.numel() + c.image_len * model.image_head.weight.numel()
    ) / c.seq_len
    expected = 6 * (block_weights + heads) + 12 * c.n_layer * c.seq_len * c.n_embd
    assert model.flops_per_token() == pytest.approx(expected)
    assert flops_per_token(load_dalle_preset("paper")) == pytest.approx(
        6 * 12.1e9 + 12 * 64 * 1280 * 3968, rel=0.01
    )


def test_a_tiny_model_learns_four_sequences():
    config = DalleConfig(
        text_len=4, text_vocab=16, image_vocab=16, grid_size=4, n_layer=2, n_head=2, n_embd=32
    )
    torch.manual_seed(0)
    model = DalleTransformer(config)
    text, image = _batch(config, batch=4)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    first = None
    for _ in range(200):
        out = model(text, image)
        first = first if first is not None else out.loss.item()
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    # the first text token follows the start token alone: at best ln 4 over 4 text positions
    assert out.image_loss.item() < 0.1 < 2.0 < first
    assert out.loss.item() < first / 10


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_flex_and_dense_gradients_agree_on_cuda():
    config = replace(
        TINY,
        text_len=16,
        grid_size=16,
        image_vocab=64,
        text_vocab=64,
        n_layer=5,
        n_head=2,
        n_embd=64,
        conv_kernel=5,
    )
    torch.manual_seed(0)
    dense = DalleTransformer(config).cuda()
    flex = DalleTransformer(replace(config, attention_backend="flex")).cuda()
    flex.load_state_dict(dense.state_dict())
    text, image = (t.cuda() for t in _batch(config, batch=4))
    dense_out, flex_out = dense(text, image), flex(text, image)
    torch.testing.assert_close(flex_out.loss, dense_out.loss, rtol=1e-4, atol=1e-4)
    dense_out.loss.backward()
    flex_out.loss.backward()
    for (name, a), b in zip(dense.named_parameters(), flex.parameters(), strict=True):
        torch.testing.assert_close(b.grad, a.grad, rtol=2e-3, atol=2e-5, msg=name)
    assert (
        F.cosine_similarity(
            torch.cat([p.grad.flatten() for p in flex.parameters()]),
            torch.cat([p.grad.flatten() for p in dense.parameters()]),
            dim=0,
        )
        > 0.9999
    )
