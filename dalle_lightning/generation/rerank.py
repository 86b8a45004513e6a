"""Draw N images per caption and keep the ones a CLIP finds closest to it (Ramesh et al. 2021, Sec. 2.5).

DALL-E samples many candidates per caption (512 in the paper) and reranks them
by the cosine similarity of their CLIP image embedding to the caption's CLIP
text embedding. Reading order:

1. :class:`RerankScorer` — a CLIP (a model with ``encode_image``,
   ``encode_text`` and ``config.image_size`` / ``config.text_len`` and its
   caption BPE, see :mod:`dalle_lightning.models.clip`; or a scorer with
   ``tokenize``): captions to embeddings, images (resized to the CLIP's side
   when they differ) to embeddings, and their cosine similarity.
2. :func:`generate_and_rank` — for each caption, N candidates sampled in
   batches with the KV cache (:func:`~.sampling.sample_image_tokens`), decoded
   by the dVAE, scored and sorted best first (:class:`RankedSamples`).
3. :func:`ranked_grid_png` — a PNG of the best candidates, each with its rank
   and score written under it (and every score in the PNG's text metadata).
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont
from PIL.PngImagePlugin import PngInfo

from dalle_lightning.data.transforms import to_uint8
from dalle_lightning.generation.sampling import SamplingConfig, decode_to_images, sample_image_tokens
from dalle_lightning.models.dvae import DiscreteVAE
from dalle_lightning.models.transformer import DalleTransformer

GRID_METADATA_SCORES = "dalle.scores"
"""PNG text key of a ranked grid: JSON list (one per row) of the scores drawn, best first."""
GRID_METADATA_CAPTIONS = "dalle.captions"
"""PNG text key of a ranked grid: JSON list of the row captions (empty strings when none were given)."""


class ClipLike(Protocol):
    """What reranking needs of a CLIP model (:class:`~dalle_lightning.models.clip.ClipModel` has it)."""

    config: Any  # .image_size, .text_len

    def encode_image(self, images: torch.Tensor) -> torch.Tensor: ...  # (B, 3, S, S) in [0, 1] → (B, D)

    def encode_text(self, ids: torch.Tensor) -> torch.Tensor: ...  # (B, text_len) → (B, D)


class RerankScorer:
    """Cosine similarity between images and captions under one CLIP.

    Built from a CLIP model and its caption BPE (:meth:`from_model`, or
    :meth:`load` for a :func:`~dalle_lightning.models.clip.save_clip` file):
    ``model.encode_image`` takes images (B, 3, S, S) in [0, 1] with ``S =
    model.config.image_size`` (other sizes are resized here, bicubic and
    antialiased) and ``model.encode_text`` BPE ids (B, ``model.config.text_len``),
    both returning unit-length embeddings. Or from any scorer with
    ``tokenize(captions)``, ``encode_image(images of any size)`` and
    ``encode_text(tokens)`` (:meth:`from_clip_scorer`, e.g. the scorers of
    :mod:`dalle_lightning.models.clip_scorer`), which resizes images itself.
    """

    def __init__(
        self,
        encode_captions: Callable[[list[str]], torch.Tensor],
        encode_images: Callable[[torch.Tensor], torch.Tensor],
        image_size: int | None,
        device: torch.device | str = "cpu",
    ) -> None:
        self._encode_captions = encode_captions
        self._encode_images = encode_images
        self.image_size = image_size
        """Side images are resized to before ``encode_images``; ``None``: the encoder takes any size."""
        self.device = torch.device(device)

    @classmethod
    def from_model(cls, model: ClipLike, tokenizer: Any) -> RerankScorer:
        """The scorer of a CLIP model and the BPE it reads captions with."""
        from dalle_lightning.stages.bpe import CaptionEncoder

        for name in ("encode_image", "encode_text", "config"):
            if not hasattr(model, name):
                raise TypeError(f"the CLIP model lacks {name!r} (got a {type(model).__name__})")
        encoder = CaptionEncoder(tokenizer, int(model.config.text_len))
        device = torch.device("cpu")
        if isinstance(model, torch.nn.Module):
            model.eval()
            device = next((t.device for t in model.parameters()), device)

        def captions_to_embeddings(captions: list[str]) -> torch.Tensor:
            return model.encode_text(torch.from_numpy(encoder.encode_batch(captions)[0]).to(device))

        return cls(captions_to_embeddings, model.encode_image, int(model.config.image_size), device)

    @classmethod
    def from_clip_scorer(cls, scorer: Any) -> RerankScorer:
        """The scorer of an object with ``tokenize``, ``encode_image`` (any image size) and ``encode_text``."""
        for name in ("tokenize", "encode_image", "encode_text"):
            if not hasattr(scorer, name):
                raise TypeError(f"the CLIP scorer lacks {name!r} (got a {type(scorer).__name__})")
        device = getattr(scorer, "device", "cpu")

        def captions_to_embeddings(captions: list[str]) -> torch.Tensor:
            return scorer.encode_text(scorer.tokenize(captions))

        return cls(captions_to_embeddings, scorer.encode_image, None, device)

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device = "cpu") -> RerankScorer:
        """The scorer of a CLIP file written by :func:`~dalle_lightning.models.clip.save_clip`, on ``device``."""
        from dalle_lightning.models.clip import load_clip

        model, tokenizer = load_clip(path)
        return cls.from_model(model.to(device), tokenizer)

    @torch.no_grad()
    def embed_captions(self, captions: Sequence[str]) -> torch.Tensor:
        """Unit-length text embeddings (C, D) of ``captions``."""
        return self._encode_captions(list(captions)).float()

    @torch.no_grad()
    def embed_images(self, images: torch.Tensor) -> torch.Tensor:
        """Unit-length image embeddings (B, D) of ``images`` (B, 3, H, W) in [0, 1], resized if needed."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images of shape (B, 3, H, W), got {tuple(images.shape)}")
        images = images.to(self.device, torch.float32)
        size = self.image_size
        if size is not None and images.shape[2:] != (size, size):
            images = F.interpolate(images, size=(size, size), mode="bicubic", antialias=True).clamp(0.0, 1.0)
        return self._encode_images(images).float()

    @torch.no_grad()
    def score(self, images: torch.Tensor, text_embeddings: torch.Tensor) -> torch.Tensor:
        """Cosine similarity (B,) of each image (B, 3, H, W) to its row of ``text_embeddings`` (B, D)."""
        image_embeddings = self.embed_images(images)  # (B, D)
        if text_embeddings.shape != image_embeddings.shape:
            raise ValueError(
                f"text_embeddings {tuple(text_embeddings.shape)} must match the images' "
                f"embeddings {tuple(image_embeddings.shape)}"
            )
        return (image_embeddings * text_embeddings.to(image_embeddings)).sum(dim=-1).cpu()  # (B,)


@dataclass
class RankedSamples:
    """The candidates drawn for one caption, best first."""

    caption: str
    images: np.ndarray
    """uint8 (K, H, W, 3): the ``top`` best candidates (all N when ``top`` is None), best first."""
    scores: np.ndarray
    """float (N,): the CLIP score of every candidate, best first (the first K belong to ``images``)."""
    order: np.ndarray
    """int (N,): the sampling index (0…N−1) of each ranked candidate; ``order[0]`` drew the best."""

    def scores_in_sampling_order(self) -> np.ndarray:
        """float (N,): the scores as the candidates were drawn (candidate i at position i)."""
        out = np.empty_like(self.scores)
        out[self.order] = self.scores
        return out


def generate_and_rank(
    dalle: DalleTransformer,
    dvae: DiscreteVAE,
    scorer: RerankScorer,
    captions: Sequence[str],
    text_encoder: Any,
    *,
    n: int = 64,
    top: int | None = None,
    config: SamplingConfig | None = None,
    batch_size: int | None = None,
    generator: torch.Generator | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> list[RankedSamples]:
    """Draw ``n`` images per caption, score them with ``scorer`` against the caption and sort them.

    ``text_encoder`` is the transformer's caption encoder (a
    :class:`~dalle_lightning.stages.bpe.CaptionEncoder` of its BPE and
    ``text_len``); the scorer encodes the captions with its own BPE. All
    ``len(captions) · n`` sequences are sampled in batches of ``batch_size``
    (default ``config.batch_size``) with the KV cache, caption after caption,
    with one random stream (``generator``, else ``config.seed``) running through
    the batches: the same seed and batch size draw the same images. ``top``
    keeps that many images per caption (the scores of all ``n`` are kept).
    ``progress(done, total)`` counts image tokens sampled.
    """
    if isinstance(captions, str) or not captions or not all(isinstance(c, str) for c in captions):
        raise ValueError("captions must be a non-empty sequence of str")
    _check_count("n", n)
    if top is not None:
        _check_count("top", top)
        if top > n:
            raise ValueError(f"top must be <= n={n}, got {top}")
    if dvae.config.grid_size != dalle.config.grid_size:
        raise ValueError(
            f"the dVAE has a {dvae.config.grid_size}² grid, the transformer {dalle.config.grid_size}²: "
            "use the dVAE whose codes the transformer was trained on"
        )
    if dalle.config.image_vocab > dvae.config.vocab_size:
        raise ValueError(
            f"the transformer draws {dalle.config.image_vocab} image codes, the dVAE has only "
            f"{dvae.config.vocab_size}"
        )
    if text_encoder.text_len != dalle.config.text_len:
        raise ValueError(
            f"text_encoder gives {text_encoder.text_len} tokens, the transformer reads {dalle.config.text_len}"
        )
    config = config or SamplingConfig()
    if batch_size is not None:
        config = dataclasses.replace(config, batch_size=batch_size)
    device = dalle.text_head.weight.device
    if generator is None and config.seed is not None:
        generator = torch.Generator(device=device).manual_seed(config.seed)

    ids = torch.from_numpy(text_encoder.encode_batch(list(captions))[0])  # (C, L)
    text_embeddings = scorer.embed_captions(captions)  # (C, D)
    owner = torch.arange(len(captions)).repeat_interleave(n)  # (C·n,) caption of each sequence
    per_token = dalle.config.image_len
    total = len(owner) * per_token
    pending: dict[int, tuple[list[np.ndarray], list[torch.Tensor]]] = {}
    ranked: list[RankedSamples] = []
    for start in range(0, len(owner), config.batch_size):
        rows = owner[start : start + config.batch_size]  # (b,)

        def step(k: int, _: int, start: int = start, b: int = len(rows)) -> None:
            if progress is not None:
                progress(start * per_token + k * b, total)

        tokens = sample_image_tokens(dalle, ids[rows], config, generator=generator, progress=step)
        pixels = decode_to_images(dvae, tokens)  # (b, 3, H, W) in [0, 1]
        scores = scorer.score(pixels, text_embeddings[rows])  # (b,)
        pictures = to_uint8(pixels)  # (b, H, W, 3)
        for i, caption_index in enumerate(rows.tolist()):
            images, found = pending.setdefault(caption_index, ([], []))
            images.append(pictures[i])
            found.append(scores[i])
            if len(found) == n:
                del pending[caption_index]
                ranked.append(_rank(captions[caption_index], np.stack(images), torch.stack(found), top))
    assert not pending and len(ranked) == len(captions)
    return ranked


def _rank(caption: str, images: np.ndarray, scores: torch.Tensor, top: int | None) -> RankedSamples:
    sorted_scores, order = torch.sort(scores.float(), descending=True, stable=True)
    keep = order[: top if top is not None else len(order)].numpy()
    return RankedSamples(caption, images[keep], sorted_scores.numpy().astype(np.float64), order.numpy())


def _check_count(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")


# --- the grid -------------------------------------------------------------------------------------


def ranked_grid_png(
    images: np.ndarray | Sequence[np.ndarray],
    scores: np.ndarray | Sequence[np.ndarray],
    path: str | Path,
    *,
    captions: Sequence[str] | None = None,
    min_tile: int = 96,
) -> Path:
    """Write a PNG grid of ranked images with ``#rank: score`` under each; returns the path.

    ``images`` is one row, uint8 (K, H, W, 3), or a list of rows (one per
    caption); ``scores`` matches it, (K,) per row (longer score arrays are cut
    to the row's images). ``captions`` (one per row) are written above their
    rows. Images are enlarged by an integer factor to at least ``min_tile``
    pixels. The scores and captions are also stored as JSON in the PNG's text
    chunks :data:`GRID_METADATA_SCORES` and :data:`GRID_METADATA_CAPTIONS`.
    """
    rows = [images] if isinstance(images, np.ndarray) and images.ndim == 4 else list(images)
    row_scores = [scores] if len(rows) == 1 and np.ndim(scores[0]) == 0 else list(scores)
    if not rows or any(len(r) == 0 for r in rows):
        raise ValueError("ranked_grid_png needs at least one non-empty row of images")
    if len(row_scores) != len(rows):
        raise ValueError(f"got {len(row_scores)} rows of scores for {len(rows)} rows of images")
    if captions is not None and len(captions) != len(rows):
        raise ValueError(f"got {len(captions)} captions for {len(rows)} rows of images")
    h, w = rows[0].shape[1:3]
    for i, (row, found) in enumerate(zip(rows, row_scores, strict=True)):
        if row.ndim != 4 or row.shape[1:] != (h, w, 3) or row.dtype != np.uint8:
            raise ValueError(f"row {i}: expected uint8 images of shape (K, {h}, {w}, 3), got {row.shape}")
        if len(found) < len(row):
            raise ValueError(f"row {i}: {len(found)} scores for {len(row)} images")
    scale = max(1, math.ceil(min_tile / max(h, w)))
    font = _font(11)
    text_h, pad = 14, 4
    tile_w, tile_h = w * scale, h * scale + text_h
    header = text_h if captions is not None else 0
    cols = max(len(r) for r in rows)
    canvas = Image.new(
        "RGB", (cols * (tile_w + pad) + pad, len(rows) * (header + tile_h + pad) + pad), "white"
    )
    draw = ImageDraw.Draw(canvas)
    for i, row in enumerate(rows):
        top = pad + i * (header + tile_h + pad)
        if captions is not None:
            draw.text(
                (pad, top + 1), _fit(draw, captions[i], font, canvas.width - 2 * pad), fill="black", font=font
            )
        for j, image in enumerate(row):
            left = pad + j * (tile_w + pad)
            tile = Image.fromarray(image).resize((tile_w, h * scale), Image.Resampling.NEAREST)
            canvas.paste(tile, (left, top + header))
            label = _fit(draw, f"#{j + 1}: {float(row_scores[i][j]):.3f}", font, tile_w)
            draw.text((left + 1, top + header + h * scale + 1), label, fill="black", font=font)
    info = PngInfo()
    info.add_text(
        GRID_METADATA_SCORES,
        json.dumps([[float(s) for s in f[: len(r)]] for r, f in zip(rows, row_scores, strict=True)]),
    )
    info.add_text(
        GRID_METADATA_CAPTIONS, json.dumps(list(captions) if captions is not None else [""] * len(rows))
    )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path, format="PNG", pnginfo=info)
    return path


def _font(size: int) -> Any:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, ImportError, OSError):  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def _fit(draw: ImageDraw.ImageDraw, text: str, font: Any, width: int) -> str:
    """``text``, cut with an ellipsis to fit ``width`` pixels."""
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "…", font=font) > width:
        text = text[:-1]
    return text + "…"
