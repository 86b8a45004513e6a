"""Sampling image tokens from the DALL-E transformer, and decoding them to pixels with the dVAE.

:func:`sample_image_tokens` draws the ``grid²`` image tokens of a batch of
captions one at a time, reusing the keys and values of earlier positions (a KV
cache) or, for reference, running the whole prefix again at every step. Each
step can mix in an unconditional prediction (classifier-free guidance, Ho &
Salimans 2022): the same model given the null caption (all pad tokens) runs
beside the captioned one and the logits become ``uncond + cond_scale · (cond −
uncond)``. Then temperature, top-k and top-p (nucleus) filtering pick the
token; temperature 0 is greedy. :func:`decode_to_images` turns tokens into
images with the dVAE's decoder.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from dalle_lightning.models.dvae import DiscreteVAE
from dalle_lightning.models.transformer import DalleTransformer, KVCache


@dataclass(frozen=True)
class SamplingConfig:
    """How to draw image tokens."""

    temperature: float = 1.0
    """Divides the logits before sampling; 0: greedy (the most likely token)."""
    top_k: int | None = None
    """Sample among the ``top_k`` most likely tokens only; ``None``: all."""
    top_p: float | None = None
    """Sample from the smallest set of tokens whose probability reaches ``top_p``; ``None``: all."""
    cond_scale: float = 1.0
    """Classifier-free guidance scale; 1: the captioned prediction alone (no unconditional pass)."""
    batch_size: int = 16
    """Captions sampled at once (twice as many sequences run with guidance)."""
    seed: int | None = 0
    """Seeds the sampling noise when no generator is given; ``None``: torch's global generator."""

    def __post_init__(self) -> None:
        if not self.temperature >= 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature!r}")
        if self.top_k is not None and (
            isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 1
        ):
            raise ValueError(f"top_k must be an integer >= 1 or None, got {self.top_k!r}")
        if self.top_p is not None and not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1] or None, got {self.top_p!r}")
        if not self.cond_scale >= 0:
            raise ValueError(f"cond_scale must be >= 0, got {self.cond_scale!r}")
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ValueError(f"batch_size must be an integer >= 1, got {self.batch_size!r}")
        if self.seed is not None and (
            isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0
        ):
            raise ValueError(f"seed must be an integer >= 0 or None, got {self.seed!r}")

    @property
    def guided(self) -> bool:
        """Whether an unconditional pass runs (``cond_scale != 1``)."""
        return self.cond_scale != 1.0


def filter_logits(logits: torch.Tensor, top_k: int | None = None, top_p: float | None = None) -> torch.Tensor:
    """``logits`` (B, V) with the tokens outside the top-k and the top-p nucleus set to −∞."""
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)  # (B, V)
        probs = sorted_logits.softmax(dim=-1)
        before = probs.cumsum(dim=-1) - probs  # probability of the more likely tokens
        drop = torch.zeros_like(before, dtype=torch.bool).scatter(-1, order, before >= top_p)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def guide(logits: torch.Tensor, cond_scale: float) -> torch.Tensor:
    """``uncond + cond_scale · (cond − uncond)`` from logits (2B, V) of captioned then null-caption rows."""
    cond, uncond = logits.chunk(2, dim=0)  # (B, V) each
    return uncond + cond_scale * (cond - uncond)


def next_token(
    logits: torch.Tensor, config: SamplingConfig, generator: torch.Generator | None
) -> torch.Tensor:
    """One token (B,) per row of ``logits`` (B, V) under ``config``'s temperature, top-k and top-p."""
    logits = logits.float()
    if config.temperature == 0:
        return logits.argmax(dim=-1)
    logits = filter_logits(logits / config.temperature, config.top_k, config.top_p)
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator).squeeze(-1)  # (B,)


@torch.no_grad()
def sample_image_tokens(
    model: DalleTransformer,
    text_tokens: torch.Tensor,
    config: SamplingConfig | None = None,
    use_cache: bool = True,
    generator: torch.Generator | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> torch.Tensor:
    """Image tokens (B, grid²) for captions ``text_tokens`` (B, text_len), in raster order.

    Captions run in chunks of ``config.batch_size``. ``generator`` (on the
    model's device) overrides ``config.seed``. ``use_cache=False`` runs the
    whole prefix at every step: slow, the reference for the cache. The model
    runs in eval mode and is put back as it was; ``progress(done, total)`` is
    called after each token of each chunk.
    """
    config = config or SamplingConfig()
    c = model.config
    if text_tokens.ndim != 2 or text_tokens.shape[1] != c.text_len:
        raise ValueError(f"expected text_tokens of shape (B, {c.text_len}), got {tuple(text_tokens.shape)}")
    device = model.text_head.weight.device
    if generator is None and config.seed is not None:
        generator = torch.Generator(device=device).manual_seed(config.seed)
    was_training = model.training
    model.eval()
    try:
        chunks = text_tokens.to(device=device, dtype=torch.long).split(config.batch_size)
        return torch.cat([_sample_chunk(model, t, config, use_cache, generator, progress) for t in chunks])
    finally:
        model.train(was_training)


def _sample_chunk(
    model: DalleTransformer,
    text: torch.Tensor,
    config: SamplingConfig,
    use_cache: bool,
    generator: torch.Generator | None,
    progress: Callable[[int, int], None] | None,
) -> torch.Tensor:
    c = model.config
    B, n = text.shape[0], c.image_len
    if config.guided:  # the null caption: every position its pad token
        text = torch.cat([text, torch.full_like(text, c.text_pad_id)])  # (2B, L)
    prefix = torch.cat([text.new_zeros(text.shape[0], 1), text], dim=1)  # (B', L+1): start token, caption
    cache: KVCache | None = model.new_cache(prefix.shape[0]) if use_cache else None
    tokens = torch.empty(B, n, dtype=torch.long, device=text.device)
    fed = prefix[:, :0]  # the image tokens fed so far (B', k)
    for k in range(n):
        if not use_cache:  # the whole prefix again
            _, image_logits = model.forward_with_cache(torch.cat([prefix, fed], dim=1), None, 0)
        elif k == 0:  # the start token and the caption in one pass
            _, image_logits = model.forward_with_cache(prefix, cache, 0)
        else:  # image token k−1 alone, at its position
            _, image_logits = model.forward_with_cache(fed[:, -1:], cache, prefix.shape[1] + k - 1)
        logits = image_logits[:, -1]  # (B', Vi): predicts image token k
        if config.guided:
            logits = guide(logits.float(), config.cond_scale)  # (B, Vi)
        tokens[:, k] = next_token(logits, config, generator)
        fed = torch.cat([fed, tokens[:, k : k + 1].repeat(2 if config.guided else 1, 1)], dim=1)
        if progress is not None:
            progress(k + 1, n)
    return tokens  # (B, N)


@torch.no_grad()
def decode_to_images(dvae: DiscreteVAE, tokens: torch.Tensor) -> torch.Tensor:
    """Images (B, 3, H, W) in [0, 1] from image tokens (B, grid²) or (B, grid, grid), with the dVAE's decoder."""
    grid = dvae.config.grid_size
    if tokens.ndim not in (2, 3) or tokens[0].numel() != grid * grid:
        raise ValueError(
            f"expected tokens of shape (B, {grid * grid}) or (B, {grid}, {grid}), got {tuple(tokens.shape)}"
        )
    device = next(dvae.parameters()).device
    return dvae.decode_indices(tokens.reshape(-1, grid, grid).to(device))  # (B, 3, H, W)
