"""The discrete VAE of DALL-E (Ramesh et al. 2021, "Zero-Shot Text-to-Image Generation", Appendix A).

The dVAE compresses an image to a grid of codes from a codebook (256×256 px →
32×32 codes out of 8192 at paper scale), so that the transformer models
integers, not pixels. Reading order:

1. :class:`DVAEConfig` — every size and the loss settings.
2. :class:`EncoderBlock`, :class:`Encoder` — 7×7 conv stem, groups of
   bottleneck residual blocks with max-pool downsampling between groups, a 1×1
   conv to per-cell logits over the codebook (A.1).
3. :class:`DecoderBlock`, :class:`Decoder` — 1×1 conv from the (relaxed)
   one-hot codes, groups of residual blocks with nearest-neighbour upsampling,
   a 1×1 conv to the parameters of the pixel distribution (A.1).
4. :func:`map_pixels`, :func:`unmap_pixels`, :func:`logit_laplace_nll` — the
   logit-Laplace likelihood and its ε pixel mapping (A.3).
5. :class:`DiscreteVAE` — the gumbel-softmax relaxation in training, the KL
   to a uniform prior over the codebook, and the argmax tokens (A.2).
6. :func:`save_dvae`, :func:`load_dvae`, :func:`dvae_version` — the exported
   model file the tokenize stage reads.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from dalle_lightning.models.schedules import cosine_schedule

OUTPUTS = ("logit_laplace", "mse")


@dataclass(frozen=True)
class DVAEConfig:
    """Sizes of a discrete VAE and the settings of its loss; defaults are the paper's (Appendix A)."""

    image_size: int = 256
    """Side of the square input images in pixels; a multiple of ``2 ** (group_count - 1)``."""
    n_hid: int = 256
    """Channels of the first encoder group (and the last decoder group); group ``g`` has ``n_hid * 2**g``."""
    n_blk_per_group: int = 2
    """Residual blocks per group."""
    group_count: int = 4
    """Groups of blocks; ``group_count - 1`` 2× down-samplings, so the grid side is ``image_size / 2**(group_count-1)``."""
    vocab_size: int = 8192
    """Codebook size: the number of distinct image tokens."""
    n_init: int = 128
    """Channels of the decoder's first 1×1 conv, which embeds the codes."""
    output: str = "logit_laplace"
    """Reconstruction likelihood: ``logit_laplace`` (6 output channels, A.3) or ``mse`` (3 channels)."""
    logit_laplace_eps: float = 0.1
    """ε of the pixel mapping x → (1 − 2ε) x + ε, which keeps pixels away from 0 and 1 (A.3)."""
    temperature_start: float = 1.0
    """Gumbel-softmax relaxation temperature τ at step 0."""
    temperature_end: float = 1.0 / 16
    """τ after ``temperature_steps`` (cosine annealing, A.2)."""
    temperature_steps: int = 150_000
    """Updates over which τ is annealed (0: ``temperature_end`` from the start)."""
    kl_weight_start: float = 0.0
    """KL weight β at step 0."""
    kl_weight_end: float = 6.6
    """β after ``kl_weight_steps`` (cosine, A.2); 6.6 in the paper, which it found to improve codebook usage."""
    kl_weight_steps: int = 5_000
    """Updates over which β rises (0: ``kl_weight_end`` from the start)."""
    diversity_weight: float = 0.0
    """Weight of KL(posterior averaged over the batch's cells ‖ uniform), a penalty on leaving codes
    unused (the codebook diversity loss of wav2vec 2.0); 0 in the paper, whose long training and large
    β keep the codebook in use."""
    embedding_init_std: float | None = None
    """Initial std of the code embeddings (the decoder's 1×1 conv on one-hot codes); ``None``: 1/√V, the
    fan-in init of the released model. A small model trained briefly learns far faster from 1.0."""
    logit_init_scale: float = 1.0
    """Factor on the initial weights of the encoder's last conv: larger initial logits let the codes
    carry information through the gumbel noise from the first updates instead of collapsing."""

    def __post_init__(self) -> None:
        for name in ("image_size", "n_hid", "n_blk_per_group", "group_count", "n_init"):
            _check_int(name, getattr(self, name), 1)
        _check_int("vocab_size", self.vocab_size, 2)
        _check_int("temperature_steps", self.temperature_steps, 0)
        _check_int("kl_weight_steps", self.kl_weight_steps, 0)
        if self.embedding_init_std is not None and not self.embedding_init_std > 0:
            raise ValueError(f"embedding_init_std must be > 0 or None, got {self.embedding_init_std!r}")
        if not self.logit_init_scale > 0:
            raise ValueError(f"logit_init_scale must be > 0, got {self.logit_init_scale!r}")
        if self.output not in OUTPUTS:
            raise ValueError(f"output must be one of {OUTPUTS}, got {self.output!r}")
        if not 0.0 <= self.logit_laplace_eps < 0.5:
            raise ValueError(f"logit_laplace_eps must be in [0, 0.5), got {self.logit_laplace_eps!r}")
        for name in ("temperature_start", "temperature_end"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)!r}")
        for name in ("kl_weight_start", "kl_weight_end", "diversity_weight"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)!r}")
        if self.image_size % self.downsample_factor:
            raise ValueError(
                f"image_size must be a multiple of 2**(group_count-1) = {self.downsample_factor}, "
                f"got image_size={self.image_size} with group_count={self.group_count}"
            )

    @property
    def downsample_factor(self) -> int:
        """Pixels per code cell along one side."""
        return 2 ** (self.group_count - 1)

    @property
    def grid_size(self) -> int:
        """Side of the code grid (32 at paper scale)."""
        return self.image_size // self.downsample_factor

    @property
    def out_channels(self) -> int:
        """Decoder output channels: μ and ln b per RGB channel, or RGB alone for MSE."""
        return 6 if self.output == "logit_laplace" else 3

    def temperature(self, step: int) -> float:
        """τ at global ``step`` (cosine from ``temperature_start`` to ``temperature_end``)."""
        return cosine_schedule(step, self.temperature_steps, self.temperature_start, self.temperature_end)

    def kl_weight(self, step: int) -> float:
        """β at global ``step`` (cosine from ``kl_weight_start`` to ``kl_weight_end``)."""
        return cosine_schedule(step, self.kl_weight_steps, self.kl_weight_start, self.kl_weight_end)


def _check_int(name: str, value: object, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


# --- encoder --------------------------------------------------------------------------------------


class EncoderBlock(nn.Module):
    """x + post_gain · res(x): a bottleneck of 3×3, 3×3, 3×3, 1×1 convs with ReLUs (A.1).

    The residual path is scaled by ``1 / n_layers**2`` so that a deep stack
    starts close to the identity (A.2: "multiply the outgoing activations of
    the resblocks by a small constant").
    """

    def __init__(self, n_in: int, n_out: int, n_layers: int) -> None:
        super().__init__()
        n_hid = max(1, n_out // 4)
        self.post_gain = 1.0 / n_layers**2
        self.id_path = nn.Conv2d(n_in, n_out, 1) if n_in != n_out else nn.Identity()
        self.res_path = nn.Sequential(
            nn.ReLU(),
            nn.Conv2d(n_in, n_hid, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(n_hid, n_hid, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(n_hid, n_hid, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(n_hid, n_out, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.id_path(x) + self.post_gain * self.res_path(x)  # (B, n_out, h, w)


class Encoder(nn.Module):
    """(B, 3, H, W) pixels → (B, V, H/f, W/f) logits over the codebook, f = 2**(group_count-1)."""

    def __init__(self, config: DVAEConfig) -> None:
        super().__init__()
        n_layers = config.group_count * config.n_blk_per_group
        widths = [config.n_hid * 2**g for g in range(config.group_count)]
        layers: list[nn.Module] = [nn.Conv2d(3, config.n_hid, 7, padding=3)]
        n_in = config.n_hid
        for g, width in enumerate(widths):
            for _ in range(config.n_blk_per_group):
                layers.append(EncoderBlock(n_in, width, n_layers))
                n_in = width
            if g < config.group_count - 1:
                layers.append(nn.MaxPool2d(2))
        layers += [nn.ReLU(), nn.Conv2d(n_in, config.vocab_size, 1)]
        self.blocks = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(x)  # (B, V, h, w)


# --- decoder --------------------------------------------------------------------------------------


class DecoderBlock(nn.Module):
    """x + post_gain · res(x): a bottleneck of 1×1, 3×3, 3×3, 3×3 convs with ReLUs (A.1)."""

    def __init__(self, n_in: int, n_out: int, n_layers: int) -> None:
        super().__init__()
        n_hid = max(1, n_out // 4)
        self.post_gain = 1.0 / n_layers**2
        self.id_path = nn.Conv2d(n_in, n_out, 1) if n_in != n_out else nn.Identity()
        self.res_path = nn.Sequential(
            nn.ReLU(),
            nn.Conv2d(n_in, n_hid, 1),
            nn.ReLU(),
            nn.Conv2d(n_hid, n_hid, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(n_hid, n_hid, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(n_hid, n_out, 3, padding=1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.id_path(x) + self.post_gain * self.res_path(x)  # (B, n_out, h, w)


class Decoder(nn.Module):
    """(B, V, h, w) one-hot (or relaxed) codes → (B, 6 or 3, h·f, w·f) parameters of the pixels."""

    def __init__(self, config: DVAEConfig) -> None:
        super().__init__()
        n_layers = config.group_count * config.n_blk_per_group
        widths = [config.n_hid * 2**g for g in reversed(range(config.group_count))]
        layers: list[nn.Module] = [nn.Conv2d(config.vocab_size, config.n_init, 1)]
        n_in = config.n_init
        for g, width in enumerate(widths):
            for _ in range(config.n_blk_per_group):
                layers.append(DecoderBlock(n_in, width, n_layers))
                n_in = width
            if g < config.group_count - 1:
                layers.append(nn.Upsample(scale_factor=2, mode="nearest"))
        layers += [nn.ReLU(), nn.Conv2d(n_in, config.out_channels, 1)]
        self.blocks = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.blocks(z)  # (B, 6 or 3, H, W)


# --- the logit-Laplace likelihood (A.3) -----------------------------------------------------------


def map_pixels(x: torch.Tensor, eps: float) -> torch.Tensor:
    """x in [0, 1] → (1 − 2ε) x + ε in [ε, 1 − ε], where the logit-Laplace density is bounded (A.3)."""
    return (1.0 - 2.0 * eps) * x + eps


def unmap_pixels(x: torch.Tensor, eps: float) -> torch.Tensor:
    """Inverse of :func:`map_pixels`, clamped to [0, 1]."""
    return ((x - eps) / (1.0 - 2.0 * eps)).clamp(0.0, 1.0)


def logit_laplace_nll(x: torch.Tensor, mu: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
    """Negative log-density of pixels ``x`` in (0, 1) under the logit-Laplace distribution (A.3), per value.

    f(x | μ, b) = exp(−|logit(x) − μ| / b) / (2 b x (1 − x)), so
    −ln f = ln 2 + ln b + ln x + ln(1 − x) + |logit(x) − μ| / b. All tensors (B, 3, H, W).
    """
    logit_x = torch.log(x) - torch.log1p(-x)
    return math.log(2.0) + log_b + torch.log(x) + torch.log1p(-x) + (logit_x - mu).abs() * torch.exp(-log_b)


# --- the discrete VAE -----------------------------------------------------------------------------


@dataclass
class DVAEOutput:
    """What :meth:`DiscreteVAE.forward` returns; the losses are scalars averaged over the batch."""

    loss: torch.Tensor
    """``recon_loss + kl_weight · kl · (cells / values)``: the negative ELB per pixel value (A.2),
    plus ``diversity_weight · diversity`` when the config asks for it."""
    recon_loss: torch.Tensor
    """Negative log-likelihood (logit-Laplace, nats) or squared error (MSE) per pixel value."""
    kl: torch.Tensor
    """KL(q(z | x) ‖ uniform) per code cell, in nats (at most ln V)."""
    diversity: torch.Tensor
    """KL(mean of q over the batch's cells ‖ uniform), in nats: 0 when every code is equally used."""
    logits: torch.Tensor
    """Encoder logits (B, V, h, w)."""
    reconstruction: torch.Tensor
    """Expected pixels of the relaxed sample (B, 3, H, W) in [0, 1]."""


class DiscreteVAE(nn.Module):
    """Encoder and decoder of DALL-E's discrete VAE; see the module docstring."""

    def __init__(self, config: DVAEConfig) -> None:
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.apply(self._init_weights)
        with torch.no_grad():
            self.encoder.blocks[-1].weight.mul_(config.logit_init_scale)
            if config.embedding_init_std is not None:
                nn.init.normal_(self.decoder.blocks[0].weight, std=config.embedding_init_std)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        # as in the released model: weights ~ N(0, 1 / fan_in), biases zero
        if isinstance(module, nn.Conv2d):
            fan_in = module.in_channels * module.kernel_size[0] * module.kernel_size[1]
            nn.init.normal_(module.weight, std=1.0 / math.sqrt(fan_in))
            nn.init.zeros_(module.bias)

    def _check_images(self, x: torch.Tensor) -> None:
        size = self.config.image_size
        if x.ndim != 4 or x.shape[1] != 3 or x.shape[2] != size or x.shape[3] != size:
            raise ValueError(f"expected images of shape (B, 3, {size}, {size}), got {tuple(x.shape)}")

    def _encoder_input(self, x: torch.Tensor) -> torch.Tensor:
        # the ε-mapped pixels, as the likelihood sees them (and the released encoder), centred on 0: with
        # inputs in [0, 1] a plain background gives large constant features, which pull every cell's
        # logits towards the same code early in training
        if self.config.output == "logit_laplace":
            x = map_pixels(x, self.config.logit_laplace_eps)
        return 2.0 * x - 1.0  # (B, 3, H, W)

    def encode_logits(self, x: torch.Tensor) -> torch.Tensor:
        """Logits over the codebook (B, V, h, w) of images ``x`` (B, 3, H, W) in [0, 1]."""
        self._check_images(x)
        return self.encoder(self._encoder_input(x))  # (B, V, h, w)

    @torch.no_grad()
    def get_codebook_indices(self, x: torch.Tensor) -> torch.Tensor:
        """The image tokens: argmax of the encoder logits, no noise (B, h, w) long."""
        return self.encode_logits(x).argmax(dim=1)  # (B, h, w)

    def decode_pixels(self, z: torch.Tensor) -> torch.Tensor:
        """Expected pixels (B, 3, H, W) in [0, 1] from one-hot or relaxed codes ``z`` (B, V, h, w).

        For the logit-Laplace output that is sigmoid(μ) mapped back through the
        inverse ε mapping, as the released decoder does.
        """
        out = self.decoder(z)  # (B, 6 or 3, H, W)
        if self.config.output == "logit_laplace":
            return unmap_pixels(torch.sigmoid(out[:, :3]), self.config.logit_laplace_eps)
        return out.clamp(0.0, 1.0)

    @torch.no_grad()
    def decode_indices(self, codes: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) in [0, 1] from tokens ``codes`` (B, h, w) long."""
        grid = self.config.grid_size
        if codes.ndim != 3 or codes.shape[1:] != (grid, grid):
            raise ValueError(f"expected codes of shape (B, {grid}, {grid}), got {tuple(codes.shape)}")
        if codes.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"expected integer codes, got {codes.dtype}")
        one_hot = F.one_hot(codes.long(), self.config.vocab_size)  # (B, h, w, V)
        weight = self.decoder.blocks[0].weight
        return self.decode_pixels(one_hot.permute(0, 3, 1, 2).to(weight.dtype))  # (B, 3, H, W)

    def token_reconstruction_loss(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(recon loss, reconstruction) of images ``x`` (B, 3, H, W) decoded from their tokens.

        The encoder only picks the tokens (argmax, no gradient); the loss trains
        the decoder to draw from exactly the codes the transformer will produce.
        """
        config = self.config
        with torch.no_grad():
            codes = self.get_codebook_indices(x)  # (B, h, w)
        weight = self.decoder.blocks[0].weight
        z = F.one_hot(codes, config.vocab_size).permute(0, 3, 1, 2).to(weight.dtype)  # (B, V, h, w)
        out = self.decoder(z).float()  # (B, 6 or 3, H, W)
        if config.output == "logit_laplace":
            eps = config.logit_laplace_eps
            mu, log_b = out[:, :3], out[:, 3:]
            loss = logit_laplace_nll(map_pixels(x.float(), eps), mu, log_b).mean()
            return loss, unmap_pixels(torch.sigmoid(mu), eps).detach()
        return F.mse_loss(out, x.float()), out.clamp(0.0, 1.0).detach()

    def forward(
        self,
        x: torch.Tensor,
        temperature: float,
        kl_weight: float,
        generator: torch.Generator | None = None,
    ) -> DVAEOutput:
        """The relaxed ELB (A.2) of images ``x`` (B, 3, H, W) in [0, 1].

        Codes are drawn with the gumbel-softmax relaxation at ``temperature``;
        ``generator`` (on ``x``'s device) makes the noise reproducible.
        """
        config = self.config
        logits = self.encode_logits(x)  # (B, V, h, w)
        log_q = F.log_softmax(logits.float(), dim=1)  # (B, V, h, w)
        uniform = torch.rand(logits.shape, device=logits.device, generator=generator).clamp_(1e-10, 1.0)
        gumbel = -torch.log(-torch.log(uniform))  # (B, V, h, w)
        z = F.softmax((log_q + gumbel) / temperature, dim=1).to(logits.dtype)  # (B, V, h, w)
        out = self.decoder(z).float()  # (B, 6 or 3, H, W)

        if config.output == "logit_laplace":
            eps = config.logit_laplace_eps
            mu, log_b = out[:, :3], out[:, 3:]
            recon_loss = logit_laplace_nll(map_pixels(x.float(), eps), mu, log_b).mean()
            reconstruction = unmap_pixels(torch.sigmoid(mu), eps)
        else:
            recon_loss = F.mse_loss(out, x.float())
            reconstruction = out.clamp(0.0, 1.0)

        # KL(q ‖ uniform prior) = Σ_v q_v (ln q_v + ln V), per cell
        q = log_q.exp()  # (B, V, h, w)
        kl = (q * (log_q + math.log(config.vocab_size))).sum(dim=1).mean()
        cells_per_value = config.grid_size**2 / (3 * config.image_size**2)
        loss = recon_loss + kl_weight * kl * cells_per_value
        mean_q = q.mean(dim=(0, 2, 3))  # (V,)
        diversity = (mean_q * (torch.log(mean_q.clamp_min(1e-12)) + math.log(config.vocab_size))).sum()
        if config.diversity_weight > 0:
            loss = loss + config.diversity_weight * diversity
        return DVAEOutput(loss, recon_loss, kl, diversity, logits, reconstruction.detach())


# --- the exported model file ----------------------------------------------------------------------


def save_dvae(model: DiscreteVAE, path: str | Path) -> Path:
    """Write ``{"config": asdict(config), "state_dict": …}`` (CPU tensors) with ``torch.save``; return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    torch.save({"config": asdict(model.config), "state_dict": state}, path)
    return path


def load_dvae(path: str | Path, map_location: str | torch.device = "cpu") -> DiscreteVAE:
    """The :class:`DiscreteVAE` saved by :func:`save_dvae` at ``path``, in eval mode.

    Raises ``ValueError`` naming the fields or tensors that differ when the
    saved config and weights do not fit together.
    """
    saved = torch.load(path, map_location=map_location, weights_only=True)
    if not isinstance(saved, dict) or "config" not in saved or "state_dict" not in saved:
        raise ValueError(f"{path}: not a dVAE file (expected a dict with 'config' and 'state_dict')")
    known = {f.name for f in fields(DVAEConfig)}
    unknown = sorted(set(saved["config"]) - known)
    if unknown:
        raise ValueError(f"{path}: unknown dVAE config field(s) {unknown}; fields are {sorted(known)}")
    config = DVAEConfig(**saved["config"])
    model = DiscreteVAE(config)
    expected = model.state_dict()
    state = saved["state_dict"]
    problems = []
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing:
        problems.append(f"missing tensors {missing[:5]}{'…' if len(missing) > 5 else ''}")
    if unexpected:
        problems.append(f"unexpected tensors {unexpected[:5]}{'…' if len(unexpected) > 5 else ''}")
    shapes = [
        f"{k}: saved {tuple(state[k].shape)}, config gives {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]
    if shapes:
        problems.append("shape mismatch " + "; ".join(shapes[:5]) + ("…" if len(shapes) > 5 else ""))
    if problems:
        raise ValueError(f"{path}: weights do not fit the saved config {config}: " + " | ".join(problems))
    model.load_state_dict(state)
    return model.to(map_location).eval()


def dvae_version(path: str | Path) -> str:
    """16 hex characters naming the dVAE its tokens come from: a digest of the config and the weights.

    Computed from the content, not the file bytes (``torch.save`` embeds the
    file name in its archive), so the same weights saved anywhere give the same
    version.
    """
    saved = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(saved, dict) or "config" not in saved or "state_dict" not in saved:
        raise ValueError(f"{path}: not a dVAE file (expected a dict with 'config' and 'state_dict')")
    digest = hashlib.sha256(json.dumps(saved["config"], sort_keys=True).encode())
    for name in sorted(saved["state_dict"]):
        tensor = saved["state_dict"][name].detach().cpu().contiguous()
        digest.update(name.encode())
        digest.update(str(tuple(tensor.shape)).encode() + str(tensor.dtype).encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()[:16]
