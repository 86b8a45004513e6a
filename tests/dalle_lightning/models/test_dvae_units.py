"""dVAE unit checks: shapes, gradients, the logit-Laplace likelihood, schedules, the saved file."""

from __future__ import annotations

import math

import pytest
import torch

from dalle_lightning.models.dvae import (
    DiscreteVAE,
    DVAEConfig,
    dvae_version,
    load_dvae,
    logit_laplace_nll,
    map_pixels,
    save_dvae,
    unmap_pixels,
)
from dalle_lightning.models.schedules import cosine_schedule, kl_weight_schedule, temperature_schedule

TINY = dict(image_size=32, n_hid=16, n_blk_per_group=1, group_count=3, vocab_size=64)


@pytest.mark.parametrize("output", ["logit_laplace", "mse"])
def test_shapes_and_gradients(output):
    torch.manual_seed(0)
    model = DiscreteVAE(DVAEConfig(**TINY, output=output))
    x = torch.rand(2, 3, 32, 32)
    assert model.encode_logits(x).shape == (2, 64, 8, 8)
    codes = model.get_codebook_indices(x)
    assert codes.shape == (2, 8, 8) and codes.dtype == torch.int64
    pixels = model.decode_indices(codes)
    assert pixels.shape == (2, 3, 32, 32) and pixels.min() >= 0.0 and pixels.max() <= 1.0
    out = model(x, temperature=1.0, kl_weight=1.0)
    out.loss.backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in model.encoder.parameters() for g in [g.grad])


def test_wrong_input_shape_is_a_clear_error():
    model = DiscreteVAE(DVAEConfig(**TINY))
    with pytest.raises(ValueError, match=r"expected images of shape \(B, 3, 32, 32\)"):
        model.encode_logits(torch.rand(1, 3, 16, 16))
    with pytest.raises(ValueError, match=r"expected codes of shape \(B, 8, 8\)"):
        model.decode_indices(torch.zeros(1, 4, 4, dtype=torch.long))


def test_logit_laplace_matches_the_density():
    # f(x | mu, b) = exp(-|logit x - mu| / b) / (2 b x (1 - x))  (Appendix A.3)
    torch.manual_seed(0)
    x = map_pixels(torch.rand(4, 3, 5, 5), 0.1)
    mu, log_b = torch.randn(4, 3, 5, 5), torch.randn(4, 3, 5, 5) * 0.3
    b = log_b.exp()
    logit = torch.log(x / (1 - x))
    density = torch.exp(-(logit - mu).abs() / b) / (2 * b * x * (1 - x))
    torch.testing.assert_close(logit_laplace_nll(x, mu, log_b), -torch.log(density), rtol=1e-5, atol=1e-5)


def test_pixel_mapping_round_trip():
    x = torch.linspace(0, 1, 11)
    mapped = map_pixels(x, 0.1)
    assert mapped.min() == pytest.approx(0.1) and mapped.max() == pytest.approx(0.9)
    torch.testing.assert_close(unmap_pixels(mapped, 0.1), x)


@pytest.mark.parametrize("step", [0, 1_000, 37_500, 75_000, 150_000, 200_000])
def test_temperature_schedule_is_the_cosine_formula(step):
    progress = min(step, 150_000) / 150_000
    expected = 1 / 16 + (1 - 1 / 16) * 0.5 * (1 + math.cos(math.pi * progress))
    assert temperature_schedule(step) == pytest.approx(expected)


def test_schedule_end_points():
    assert kl_weight_schedule(0) == 0.0
    assert kl_weight_schedule(2_500) == pytest.approx(3.3)
    assert kl_weight_schedule(10_000) == pytest.approx(6.6)
    assert cosine_schedule(5, 0, 1.0, 2.0) == 2.0
    with pytest.raises(ValueError, match="step"):
        cosine_schedule(-1, 10, 0.0, 1.0)


def test_save_load_round_trip_and_version(tmp_path):
    torch.manual_seed(0)
    model = DiscreteVAE(DVAEConfig(**TINY))
    path = save_dvae(model, tmp_path / "a.pt")
    loaded = load_dvae(path)
    x = torch.rand(2, 3, 32, 32)
    assert torch.equal(loaded.get_codebook_indices(x), model.get_codebook_indices(x))
    assert dvae_version(path) == dvae_version(save_dvae(loaded, tmp_path / "b.pt"))
    assert len(dvae_version(path)) == 16


def test_mismatched_file_names_what_differs(tmp_path):
    model = DiscreteVAE(DVAEConfig(**TINY))
    saved = {"config": {**model.config.__dict__, "vocab_size": 128}, "state_dict": model.state_dict()}
    torch.save(saved, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="shape mismatch"):
        load_dvae(tmp_path / "bad.pt")
    torch.save({"config": {**model.config.__dict__, "colour": 1}, "state_dict": {}}, tmp_path / "odd.pt")
    with pytest.raises(ValueError, match="unknown dVAE config field"):
        load_dvae(tmp_path / "odd.pt")
