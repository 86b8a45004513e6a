"""What reranking, CLIP-score evaluation and search need of a CLIP, and the models that provide it.

A :class:`ClipScorer` turns captions into tokens and images and tokens into
unit-length embeddings in one space. Two kinds fit:

- :class:`TrainedClipScorer`: the project's own :class:`~dalle_lightning.models.clip.ClipModel`
  with its caption BPE (:meth:`TrainedClipScorer.load` reads a
  :func:`~dalle_lightning.models.clip.save_clip` file);
- :class:`OpenClipScorer`: a pretrained open_clip model from weights the user
  has on disk (``pip install open_clip_torch``; not a dependency of this project).

Both take images as float tensors (B, 3, H, W) in [0, 1] (or uint8) of any
size: they are centre-cropped to a square and resized to the model's input.
:func:`clip_similarity` is the CLIP score of image–caption pairs (Ramesh et
al. 2021, Sec. 2.5: DALL-E's samples are reranked by it).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
import torch.nn.functional as F

from dalle_lightning.models.clip import IMAGE_MEAN, IMAGE_STD, ClipModel


@runtime_checkable
class ClipScorer(Protocol):
    """A CLIP as the pipeline uses it: tokens for captions, unit-length embeddings for images and tokens."""

    def tokenize(self, captions: Sequence[str]) -> torch.Tensor:
        """Captions → token ids (N, L), as :meth:`encode_text` takes them."""
        ...

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) in [0, 1] (or uint8), any size → unit-length embeddings (B, D)."""
        ...

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        """Token ids from :meth:`tokenize` → unit-length embeddings (N, D)."""
        ...


@torch.no_grad()
def clip_similarity(scorer: ClipScorer, images: torch.Tensor, captions: Sequence[str]) -> torch.Tensor:
    """Cosine similarity (N,) of each image with its own caption: the CLIP score of the pairs."""
    if len(captions) != len(images):
        raise ValueError(f"{len(images)} images but {len(captions)} captions: give one caption per image")
    image_embeddings = scorer.encode_image(images)
    text_embeddings = scorer.encode_text(scorer.tokenize(captions))
    return (image_embeddings * text_embeddings.to(image_embeddings.device)).sum(dim=-1).float()


def square_resize(images: torch.Tensor, size: int) -> torch.Tensor:
    """Float images (B, 3, H, W) in [0, 1] (or uint8): the centred square, resized to ``size`` (antialiased)."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must have shape (B, 3, H, W), got {tuple(images.shape)}")
    x = images.float().div(255.0) if images.dtype == torch.uint8 else images.float()
    h, w = x.shape[2:]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    x = x[:, :, top : top + side, left : left + side]
    if side != size:
        x = F.interpolate(x, size=(size, size), mode="bicubic", antialias=True, align_corners=False)
    return x.clamp(0.0, 1.0)


class TrainedClipScorer:
    """The project's :class:`ClipModel` with its caption BPE, as a :class:`ClipScorer`."""

    def __init__(self, model: ClipModel, tokenizer: Any) -> None:
        from dalle_lightning.stages.bpe import CaptionEncoder

        self.model = model.eval()
        self.encoder = CaptionEncoder(tokenizer, model.config.text_len)
        if self.encoder.vocab_size > model.config.text_vocab:
            raise ValueError(
                f"the tokenizer has {self.encoder.vocab_size} tokens, the model only {model.config.text_vocab}"
            )

    @classmethod
    def load(cls, path: str | Path, map_location: str | torch.device = "cpu") -> TrainedClipScorer:
        """The scorer of a :func:`~dalle_lightning.models.clip.save_clip` file."""
        from dalle_lightning.models.clip import load_clip

        return cls(*load_clip(path, map_location))

    @property
    def device(self) -> torch.device:
        return self.model.logit_scale.device

    def tokenize(self, captions: Sequence[str]) -> torch.Tensor:
        ids, _ = self.encoder.encode_batch(list(captions))
        return torch.from_numpy(ids).to(self.device)

    @torch.no_grad()
    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(square_resize(images, self.model.config.image_size).to(self.device))

    @torch.no_grad()
    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model.encode_text(tokens.to(self.device))


def _import_open_clip() -> Any:
    try:
        import open_clip
    except ImportError as err:
        raise ImportError(
            "OpenClipScorer needs the open_clip package, which dalle-lightning does not install: "
            "`pip install open_clip_torch`, then give the path of the model's weights"
        ) from err
    return open_clip


class OpenClipScorer:
    """A pretrained open_clip model loaded from a local weights file, as a :class:`ClipScorer`.

    ``model_name`` is an open_clip architecture (``ViT-B-32``…, see
    ``open_clip.list_models()``) and ``weights`` the path of its checkpoint
    (e.g. ``open_clip_pytorch_model.bin``); nothing is downloaded for the
    weights. Captions use open_clip's tokenizer for the architecture; images
    are normalised with the model's own mean and std.
    """

    def __init__(self, model_name: str, weights: str | Path, device: str | torch.device = "cpu") -> None:
        open_clip = _import_open_clip()
        if not Path(weights).is_file():
            raise FileNotFoundError(f"open_clip weights not found: {str(weights)!r} (give a local file)")
        model, _, _ = open_clip.create_model_and_transforms(
            model_name, pretrained=str(weights), device=device
        )
        self.model = model.eval()
        self.device = torch.device(device)
        self._tokenizer = open_clip.get_tokenizer(model_name)
        visual = model.visual
        size = getattr(visual, "image_size", 224)
        self.image_size = int(size[0] if isinstance(size, tuple | list) else size)
        mean = getattr(visual, "image_mean", None) or IMAGE_MEAN
        std = getattr(visual, "image_std", None) or IMAGE_STD
        self._mean = torch.tensor(mean, device=self.device).view(1, 3, 1, 1)
        self._std = torch.tensor(std, device=self.device).view(1, 3, 1, 1)

    def tokenize(self, captions: Sequence[str]) -> torch.Tensor:
        return self._tokenizer(list(captions)).to(self.device)

    @torch.no_grad()
    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        x = square_resize(images, self.image_size).to(self.device)
        return F.normalize(self.model.encode_image((x - self._mean) / self._std).float(), dim=-1)

    @torch.no_grad()
    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.model.encode_text(tokens.to(self.device)).float(), dim=-1)
