"""The dVAE model: shapes and gradients, schedules, the logit-Laplace loss, the KL, save/load."""

from __future__ import annotations

import math
from dataclasses import replace

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
from dalle_lightning.models.schedules import (
    cosine_schedule,
    kl_weight_schedule,
    learning_rate_schedule,
    temperature_schedule,
)

pytestmark = pytest.mark.timeout(60)

TINY = DVAEConfig(image_size=16, n_hid=8, n_blk_per_group=1, group_count=3, vocab_size=32, n_init=8)


def _images(batch: int = 2, size: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def test_shapes_of_every_public_method():
    model = DiscreteVAE(TINY)
    x = _images(3)
    assert TINY.grid_size == 4 and TINY.downsample_factor == 4
    assert model.encode_logits(x).shape == (3, 32, 4, 4)
    codes = model.get_codebook_indices(x)
    assert codes.shape == (3, 4, 4) and codes.dtype == torch.long
    assert int(codes.min()) >= 0 and int(codes.max()) < 32
    images = model.decode_indices(codes)
    assert images.shape == (3, 3, 16, 16) and images.dtype == torch.float32
    assert float(images.min()) >= 0.0 and float(images.max()) <= 1.0
    out = model(x, temperature=1.0, kl_weight=1.0)
    assert out.logits.shape == (3, 32, 4, 4) and out.reconstruction.shape == x.shape
    assert out.loss.ndim == 0 and out.recon_loss.ndim == 0 and out.kl.ndim == 0


def test_paper_config_has_the_published_shapes():
    config = DVAEConfig()
    assert (config.image_size, config.grid_size, config.vocab_size) == (256, 32, 8192)
    assert config.out_channels == 6 and replace(config, output="mse").out_channels == 3


def test_every_parameter_gets_a_finite_gradient():
    model = DiscreteVAE(TINY)
    out = model(_images(), temperature=0.5, kl_weight=2.0)
    out.loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
    assert model.encoder.blocks[0].weight.grad.abs().sum() > 0  # through the relaxation to the encoder


def test_mse_output_uses_three_channels_and_squared_error():
    model = DiscreteVAE(replace(TINY, output="mse"))
    assert model.decoder.blocks[-1].out_channels == 3
    x = _images()
    out = model(x, temperature=1.0, kl_weight=0.0, generator=torch.Generator().manual_seed(1))
    z = torch.softmax(  # the same relaxed sample again
        (
            torch.log_softmax(out.logits, 1)
            - torch.log(-torch.log(torch.rand(out.logits.shape, generator=torch.Generator().manual_seed(1))))
        ),
        dim=1,
    )
    expected = ((model.decoder(z) - x) ** 2).mean()
    torch.testing.assert_close(out.recon_loss, expected, rtol=1e-5, atol=1e-6)


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match="image_size"):
        DVAEConfig(image_size=20, group_count=4)
    with pytest.raises(ValueError, match="output"):
        DVAEConfig(output="bernoulli")
    with pytest.raises(ValueError, match="vocab_size"):
        DVAEConfig(vocab_size=1)
    with pytest.raises(ValueError, match="logit_laplace_eps"):
        DVAEConfig(logit_laplace_eps=0.5)
    with pytest.raises(ValueError, match="temperature_end"):
        DVAEConfig(temperature_end=0.0)
    with pytest.raises(ValueError, match="n_hid"):
        DVAEConfig(n_hid=True)


def test_wrong_input_shapes_are_value_errors():
    model = DiscreteVAE(TINY)
    with pytest.raises(ValueError, match=r"\(B, 3, 16, 16\)"):
        model.encode_logits(torch.rand(1, 3, 32, 32))
    with pytest.raises(ValueError, match=r"\(B, 4, 4\)"):
        model.decode_indices(torch.zeros(1, 8, 8, dtype=torch.long))
    with pytest.raises(TypeError, match="integer"):
        model.decode_indices(torch.zeros(1, 4, 4))


# --- schedules (A.2) ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("step", "total"), [(0, 100), (25, 100), (50, 100), (99, 100), (100, 100), (500, 100)]
)
def test_cosine_schedule_is_the_cosine_formula(step, total):
    start, end = 1.0, 1.0 / 16
    expected = end + 0.5 * (start - end) * (1 + math.cos(math.pi * min(step, total) / total))
    assert cosine_schedule(step, total, start, end) == pytest.approx(expected, rel=1e-12)


def test_paper_schedules_at_chosen_steps():
    assert temperature_schedule(0) == 1.0
    assert temperature_schedule(75_000) == pytest.approx((1 + 1 / 16) / 2)
    assert temperature_schedule(150_000) == pytest.approx(1 / 16)
    assert temperature_schedule(1_000_000) == pytest.approx(1 / 16)
    assert kl_weight_schedule(0) == 0.0
    assert kl_weight_schedule(2_500) == pytest.approx(3.3)
    assert kl_weight_schedule(1_250) == pytest.approx(6.6 * (1 - math.cos(math.pi / 4)) / 2)
    assert kl_weight_schedule(5_000) == pytest.approx(6.6)
    assert learning_rate_schedule(0) == pytest.approx(1e-4)
    assert learning_rate_schedule(600_000) == pytest.approx((1e-4 + 1.25e-6) / 2)
    assert learning_rate_schedule(1_200_000) == pytest.approx(1.25e-6)
    config = DVAEConfig()
    for step in (0, 1_000, 37_500, 150_000, 200_000):
        assert config.temperature(step) == temperature_schedule(step)
        assert config.kl_weight(step) == kl_weight_schedule(step)
    assert DVAEConfig(kl_weight_steps=0).kl_weight(0) == 6.6
    with pytest.raises(ValueError, match="step"):
        cosine_schedule(-1, 10, 1.0, 0.0)


# --- the logit-Laplace likelihood (A.3) -----------------------------------------------------------


def test_pixel_mapping_and_its_inverse():
    x = torch.linspace(0, 1, 11)
    y = map_pixels(x, 0.1)
    assert float(y.min()) == pytest.approx(0.1) and float(y.max()) == pytest.approx(0.9)
    torch.testing.assert_close(unmap_pixels(y, 0.1), x)


def test_logit_laplace_nll_equals_the_density():
    """−ln f(x) for f(x | μ, b) = exp(−|logit x − μ| / b) / (2 b x (1 − x)): a Laplace density in logit
    space times the Jacobian of the logit."""
    gen = torch.Generator().manual_seed(0)
    x = map_pixels(torch.rand(2, 3, 4, 4, generator=gen), 0.1)
    mu = torch.randn(2, 3, 4, 4, generator=gen)
    log_b = torch.randn(2, 3, 4, 4, generator=gen) * 0.5
    laplace = torch.distributions.Laplace(mu, log_b.exp())
    logit = torch.log(x / (1 - x))
    direct = -(laplace.log_prob(logit) - torch.log(x * (1 - x)))
    torch.testing.assert_close(logit_laplace_nll(x, mu, log_b), direct, rtol=1e-5, atol=1e-5)
    # and by hand, for one value
    xv, m, b = 0.3, 0.2, 0.7
    by_hand = -math.log(math.exp(-abs(math.log(xv / (1 - xv)) - m) / b) / (2 * b * xv * (1 - xv)))
    value = logit_laplace_nll(torch.tensor(xv), torch.tensor(m), torch.tensor(math.log(b)))
    assert float(value) == pytest.approx(by_hand, rel=1e-5)


def test_forward_loss_is_the_mean_logit_laplace_nll_plus_the_weighted_kl():
    model = DiscreteVAE(TINY)
    x = _images()
    out = model(x, temperature=0.5, kl_weight=3.0, generator=torch.Generator().manual_seed(7))
    log_q = torch.log_softmax(out.logits, 1)
    u = torch.rand(out.logits.shape, generator=torch.Generator().manual_seed(7)).clamp(1e-10, 1.0)
    z = torch.softmax((log_q - torch.log(-torch.log(u))) / 0.5, dim=1)  # the same gumbel-softmax sample
    params = model.decoder(z)
    mu, b = params[:, :3], params[:, 3:].exp()
    xm = map_pixels(x, TINY.logit_laplace_eps)
    density = torch.exp(-(torch.log(xm / (1 - xm)) - mu).abs() / b) / (2 * b * xm * (1 - xm))
    recon = -torch.log(density).mean()
    torch.testing.assert_close(out.recon_loss, recon, rtol=1e-4, atol=1e-5)
    q = log_q.exp()
    kl = (q * (log_q - math.log(1 / TINY.vocab_size))).sum(1).mean()  # KL(q ‖ uniform) per cell
    torch.testing.assert_close(out.kl, kl, rtol=1e-5, atol=1e-6)
    cells, values = TINY.grid_size**2, 3 * TINY.image_size**2
    torch.testing.assert_close(out.loss, recon + 3.0 * kl * cells / values, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out.reconstruction, unmap_pixels(torch.sigmoid(mu), 0.1).detach())


def test_kl_is_zero_for_uniform_posteriors_and_log_v_for_certain_ones():
    model = DiscreteVAE(TINY)
    with torch.no_grad():
        last = model.encoder.blocks[-1]
        last.weight.zero_()
        last.bias.zero_()
        uniform = model(_images(), 1.0, 1.0)
        last.bias[3] = 100.0
        out = model(_images(), 1.0, 1.0)
    assert float(uniform.kl) == pytest.approx(0.0, abs=1e-6)
    assert float(uniform.diversity) == pytest.approx(0.0, abs=1e-6)  # every code equally likely
    assert float(out.kl) == pytest.approx(math.log(TINY.vocab_size), rel=1e-4)
    assert float(out.diversity) == pytest.approx(math.log(TINY.vocab_size), rel=1e-4)  # one code in use
    assert (model.get_codebook_indices(_images()) == 3).all()


def test_diversity_weight_adds_the_codebook_diversity_penalty():
    x, noise = _images(), 11
    plain = DiscreteVAE(TINY)(x, 1.0, 2.0, generator=torch.Generator().manual_seed(noise))
    torch.manual_seed(0)
    a = DiscreteVAE(TINY)
    torch.manual_seed(0)
    b = DiscreteVAE(replace(TINY, diversity_weight=0.5))
    out_a = a(x, 1.0, 2.0, generator=torch.Generator().manual_seed(noise))
    out_b = b(x, 1.0, 2.0, generator=torch.Generator().manual_seed(noise))
    q = torch.softmax(out_a.logits, 1).mean(dim=(0, 2, 3))
    expected = (q * (q.log() - math.log(1 / TINY.vocab_size))).sum()
    torch.testing.assert_close(out_a.diversity, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out_b.loss, out_a.loss + 0.5 * expected, rtol=1e-5, atol=1e-6)
    assert plain.diversity >= 0


# --- the exported file ----------------------------------------------------------------------------


def test_save_load_round_trip_and_version(tmp_path):
    model = DiscreteVAE(TINY)
    path = save_dvae(model, tmp_path / "a" / "dvae.pt")
    saved = torch.load(path, weights_only=True)
    assert set(saved) == {"config", "state_dict"} and saved["config"]["vocab_size"] == 32
    loaded = load_dvae(path)
    assert loaded.config == TINY and not loaded.training
    x = _images()
    torch.testing.assert_close(loaded.encode_logits(x), model.encode_logits(x))
    codes = model.get_codebook_indices(x)
    torch.testing.assert_close(loaded.decode_indices(codes), model.decode_indices(codes))
    version = dvae_version(path)
    assert len(version) == 16 and int(version, 16) >= 0
    assert dvae_version(save_dvae(loaded, tmp_path / "b.pt")) == version
    with torch.no_grad():
        loaded.decoder.blocks[0].bias.add_(1.0)
    assert dvae_version(save_dvae(loaded, tmp_path / "c.pt")) != version


def test_mismatched_files_name_what_differs(tmp_path):
    path = save_dvae(DiscreteVAE(TINY), tmp_path / "dvae.pt")
    saved = torch.load(path, weights_only=True)

    saved["config"]["n_hid"] = 16  # config says wider than the weights
    torch.save(saved, tmp_path / "wider.pt")
    with pytest.raises(ValueError, match=r"shape mismatch .*encoder\.blocks\.0\.weight"):
        load_dvae(tmp_path / "wider.pt")

    saved["config"]["n_hid"] = 8
    saved["config"]["n_blk_per_group"] = 2  # config asks for blocks the file lacks
    torch.save(saved, tmp_path / "deeper.pt")
    with pytest.raises(ValueError, match="missing tensors"):
        load_dvae(tmp_path / "deeper.pt")

    saved["config"]["n_blk_per_group"] = 1
    saved["config"]["codebook"] = 7
    torch.save(saved, tmp_path / "unknown.pt")
    with pytest.raises(ValueError, match="unknown dVAE config field.*codebook"):
        load_dvae(tmp_path / "unknown.pt")

    torch.save({"weights": {}}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a dVAE file"):
        load_dvae(tmp_path / "other.pt")
