"""A small CLIP: a ViT image encoder and a transformer text encoder trained contrastively.

Radford et al. 2021, "Learning Transferable Visual Models From Natural Language
Supervision" (arXiv 2103.00020). DALL-E reranks its samples with such a model
(Ramesh et al. 2021, Sec. 2.5); here it is trained on the project's own
``filter`` data over the caption BPE (:mod:`dalle_lightning.stages.bpe`), and
a pretrained open_clip model can take its place through
:mod:`dalle_lightning.models.clip_scorer`.

Reading order:

1. :class:`ClipConfig` — sizes of both encoders, the embedding and the temperature.
2. :class:`Block` (pre-LN attention + MLP) shared by both towers.
3. :class:`ImageEncoder` — patchify convolution, a class token (or mean or max
   pooling), learned position embeddings, pre-LN blocks, a linear projection (Sec. 2.4).
4. :class:`TextEncoder` — token and position embeddings, causal or
   bidirectional attention over the BPE ids (pads masked), the features at the
   last real token or the mean over real tokens, a linear projection.
5. :class:`ClipModel` — a learned temperature (initialised to 0.07, the logit
   scale clipped at 100, Sec. 2.5) and the symmetric InfoNCE loss
   (:func:`contrastive_loss`, Fig. 3); :func:`retrieval_recall` for evaluation.
6. :func:`save_clip` / :func:`load_clip` — one file with the config, the
   weights and the tokenizer, readable with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tokenizers import Tokenizer
from torch import nn

from dalle_lightning.config_overrides import build

IMAGE_MEAN = (0.48145466, 0.4578275, 0.40821073)
"""Per-channel mean the image encoder subtracts from images in [0, 1] (OpenAI CLIP's)."""
IMAGE_STD = (0.26862954, 0.26130258, 0.27577711)
"""Per-channel std the image encoder divides by (OpenAI CLIP's)."""
VISION_POOLS = ("cls", "mean", "max")
TEXT_ATTENTIONS = ("causal", "bidirectional")
TEXT_POOLS = ("last", "mean")
FILE_FORMAT = "dalle-lightning/clip/1"


@dataclass(frozen=True)
class ClipConfig:
    """Sizes of a CLIP; defaults are the paper's ViT-B/16 (Radford et al. 2021, Tables 19–20)."""

    image_size: int = 224
    """Side of the square input images in pixels."""
    patch_size: int = 16
    """Side of a patch; ``image_size`` must be a multiple."""
    vision_width: int = 768
    """Width of the image transformer."""
    vision_layers: int = 12
    """Blocks of the image transformer."""
    vision_heads: int = 12
    """Attention heads of the image transformer; ``vision_width`` must be a multiple."""
    vision_pool: str = "cls"
    """``cls``: the class token's output (the paper); ``mean``: the mean over the patch tokens; ``max``:
    the per-channel maximum over the patch tokens' projected features (global max pooling), which does
    not dilute a small object's few patches with the background."""
    text_len: int = 77
    """Text positions; captions are cut or padded with ``text_pad_id`` to this length."""
    text_vocab: int = 49408
    """Token ids are in ``[0, text_vocab)``: at least the caption BPE's vocabulary size."""
    text_pad_id: int = 0
    """The id that marks padding (the BPE's ``<pad>``); pads never count as caption."""
    text_width: int = 512
    """Width of the text transformer."""
    text_layers: int = 12
    """Blocks of the text transformer."""
    text_heads: int = 8
    """Attention heads of the text transformer; ``text_width`` must be a multiple."""
    text_attention: str = "causal"
    """``causal`` (the paper, so that a language-model loss could be added) or ``bidirectional``."""
    text_pool: str = "last"
    """``last``: the features at the last real token (the paper's [EOS]); ``mean``: over the real tokens."""
    embed_dim: int = 512
    """Dimension of the joint embedding space."""
    mlp_ratio: int = 4
    """Hidden width of each MLP over the block width."""
    init_logit_scale: float = math.log(1 / 0.07)
    """Initial log of the logit scale: the temperature starts at 0.07 (Sec. 2.5)."""
    max_logit_scale: float = 100.0
    """The logit scale (1 / temperature) is clipped to at most this (Sec. 2.5: 100)."""

    def __post_init__(self) -> None:
        for name in (
            "image_size",
            "patch_size",
            "vision_width",
            "vision_layers",
            "vision_heads",
            "text_len",
            "text_vocab",
            "text_width",
            "text_layers",
            "text_heads",
            "embed_dim",
            "mlp_ratio",
        ):
            _check_int(name, getattr(self, name), 1)
        _check_int("text_pad_id", self.text_pad_id, 0)
        if self.image_size % self.patch_size:
            raise ValueError(
                f"image_size must be a multiple of patch_size={self.patch_size}, got {self.image_size}"
            )
        if self.vision_width % self.vision_heads:
            raise ValueError(
                f"vision_width must be a multiple of vision_heads={self.vision_heads}, got {self.vision_width}"
            )
        if self.text_width % self.text_heads:
            raise ValueError(
                f"text_width must be a multiple of text_heads={self.text_heads}, got {self.text_width}"
            )
        if self.text_pad_id >= self.text_vocab:
            raise ValueError(f"text_pad_id must be < text_vocab={self.text_vocab}, got {self.text_pad_id}")
        for name, allowed in (
            ("vision_pool", VISION_POOLS),
            ("text_attention", TEXT_ATTENTIONS),
            ("text_pool", TEXT_POOLS),
        ):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        for name in ("init_logit_scale", "max_logit_scale"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value!r}")
        if not self.max_logit_scale > 1.0:
            raise ValueError(f"max_logit_scale must be > 1, got {self.max_logit_scale!r}")
        if not 0.0 <= self.init_logit_scale <= math.log(self.max_logit_scale):
            raise ValueError(
                f"init_logit_scale must be in [0, ln(max_logit_scale)={math.log(self.max_logit_scale):.4f}], "
                f"got {self.init_logit_scale!r}"
            )

    @property
    def grid_size(self) -> int:
        """Patches along one side of the image."""
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid_size**2


def _check_int(name: str, value: object, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


# --- blocks ---------------------------------------------------------------------------------------


class SelfAttention(nn.Module):
    """Multi-head self-attention; ``mask`` (broadcastable to (B, H, T, T), True = may attend) or causal."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, causal: bool) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = (t.view(B, T, self.heads, C // self.heads).transpose(1, 2) for t in self.qkv(x).split(C, 2))
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal and mask is None)
        return self.proj(y.transpose(1, 2).reshape(B, T, C))  # (B, T, C)


class Block(nn.Module):
    """Pre-LN transformer block: ``x + attn(ln(x))``, then ``x + mlp(ln(x))``."""

    def __init__(self, width: int, heads: int, mlp_ratio: int) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.attn = SelfAttention(width, heads)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(
            nn.Linear(width, mlp_ratio * width), nn.GELU(), nn.Linear(mlp_ratio * width, width)
        )

    def forward(
        self, x: torch.Tensor, mask: torch.Tensor | None = None, causal: bool = False
    ) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), mask, causal)
        return x + self.mlp(self.ln_2(x))


def sincos_positions_2d(grid_size: int, width: int) -> torch.Tensor:
    """Fixed 2-D sin-cos features (grid², width) of the patches in raster order (MAE, He et al. 2021).

    Half of the channels encode the row, half the column, each as sines and
    cosines of geometrically spaced frequencies; channels left over stay 0.
    They start the image encoder's learned positions, so that a small model
    can tell where a patch is from the first step.
    """
    quarter = width // 4
    frequencies = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / max(1, quarter))  # (W/4,)
    rows, cols = torch.meshgrid(torch.arange(grid_size), torch.arange(grid_size), indexing="ij")
    out = torch.zeros(grid_size * grid_size, width, dtype=torch.float64)
    for i, axis in enumerate((rows, cols)):
        angles = axis.reshape(-1, 1).double() * frequencies  # (grid², W/4)
        out[:, 2 * i * quarter : (2 * i + 1) * quarter] = angles.sin()
        out[:, (2 * i + 1) * quarter : (2 * i + 2) * quarter] = angles.cos()
    return out.float()


# --- the two towers -------------------------------------------------------------------------------


class ImageEncoder(nn.Module):
    """ViT: images (B, 3, S, S), normalised → features (B, embed_dim), not yet unit length."""

    def __init__(self, config: ClipConfig) -> None:
        super().__init__()
        c = config
        self.pool = c.vision_pool
        self.patchify = nn.Conv2d(3, c.vision_width, c.patch_size, stride=c.patch_size, bias=False)
        self.class_token = nn.Parameter(torch.zeros(c.vision_width)) if c.vision_pool == "cls" else None
        tokens = c.num_patches + (1 if c.vision_pool == "cls" else 0)
        self.position = nn.Parameter(torch.zeros(tokens, c.vision_width))
        self.ln_pre = nn.LayerNorm(c.vision_width)
        self.blocks = nn.ModuleList(
            Block(c.vision_width, c.vision_heads, c.mlp_ratio) for _ in range(c.vision_layers)
        )
        self.ln_post = nn.LayerNorm(c.vision_width)
        self.proj = nn.Linear(c.vision_width, c.embed_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patchify(x).flatten(2).transpose(1, 2)  # (B, N, C), patches in raster order
        if self.class_token is not None:
            x = torch.cat([self.class_token.expand(x.shape[0], 1, -1), x], dim=1)  # (B, 1 + N, C)
        x = self.ln_pre(x + self.position)
        for block in self.blocks:
            x = block(x)
        if self.pool == "max":
            return self.proj(self.ln_post(x)).amax(dim=1)  # (B, N, D) → (B, D)
        x = x[:, 0] if self.pool == "cls" else x.mean(dim=1)  # (B, C)
        return self.proj(self.ln_post(x))  # (B, D)


class TextEncoder(nn.Module):
    """Transformer over BPE ids (B, L) → features (B, embed_dim), not yet unit length.

    Captions are their first ``length`` ids, the rest pads (the
    :class:`~dalle_lightning.stages.bpe.CaptionEncoder` convention). Causal
    attention never lets a real token see a later pad; bidirectional attention
    masks the pads as keys. An empty caption is read as its first position.
    """

    def __init__(self, config: ClipConfig) -> None:
        super().__init__()
        c = config
        self.config = c
        self.token = nn.Embedding(c.text_vocab, c.text_width)
        self.position = nn.Parameter(torch.zeros(c.text_len, c.text_width))
        self.blocks = nn.ModuleList(
            Block(c.text_width, c.text_heads, c.mlp_ratio) for _ in range(c.text_layers)
        )
        self.ln_final = nn.LayerNorm(c.text_width)
        self.proj = nn.Linear(c.text_width, c.embed_dim, bias=False)

    def real_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        """Bool (B, L): the caption's own positions (position 0 always, so that no row is empty)."""
        real = ids != self.config.text_pad_id
        real[:, 0] = True
        return real

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        c = self.config
        B, length = ids.shape
        if length != c.text_len:
            raise ValueError(f"ids must have text_len={c.text_len} positions, got shape {tuple(ids.shape)}")
        real = self.real_tokens(ids)  # (B, L)
        x = self.token(ids) + self.position  # (B, L, C)
        causal = c.text_attention == "causal"
        mask = None if causal else real[:, None, None, :]  # (B, 1, 1, L): keys that may be attended to
        for block in self.blocks:
            x = block(x, mask, causal)
        x = self.ln_final(x)
        if c.text_pool == "last":
            last = real.long().sum(dim=1) - 1  # (B,) real tokens come first
            x = x[torch.arange(B, device=x.device), last]  # (B, C)
        else:
            weights = real.unsqueeze(-1).to(x.dtype)
            x = (x * weights).sum(dim=1) / weights.sum(dim=1)  # (B, C)
        return self.proj(x)  # (B, D)


# --- CLIP ----------------------------------------------------------------------------------------


def contrastive_loss(logits_per_image: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE: the mean of the cross-entropies over texts (rows) and over images (columns).

    ``logits_per_image[i, j]`` scores image ``i`` against text ``j``; pair ``i``
    is the positive of row and column ``i`` (Radford et al. 2021, Fig. 3).
    """
    labels = torch.arange(logits_per_image.shape[0], device=logits_per_image.device)
    return 0.5 * (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_image.T, labels))


def retrieval_recall(queries: torch.Tensor, gallery: torch.Tensor, k: int = 1) -> float:
    """Share of queries ``i`` whose gallery item ``i`` is among their ``k`` most similar (dot product).

    With unit-length text embeddings as ``queries`` and image embeddings as
    ``gallery`` this is text→image recall@k. Ties count against the query.
    """
    if queries.shape != gallery.shape or queries.ndim != 2:
        raise ValueError(f"queries {tuple(queries.shape)} and gallery {tuple(gallery.shape)} must be (N, D)")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    scores = queries.float() @ gallery.float().T  # (N, N)
    positive = scores.diagonal().unsqueeze(1)  # (N, 1)
    others = scores.masked_fill(torch.eye(len(scores), dtype=torch.bool, device=scores.device), -math.inf)
    rank = (others >= positive).sum(dim=1)  # items scoring at least as well as the right one
    return float((rank < k).float().mean())


class ClipModel(nn.Module):
    """Image and text encoders into one unit-length embedding space, and a learned temperature."""

    def __init__(self, config: ClipConfig) -> None:
        super().__init__()
        self.config = config
        self.image_encoder = ImageEncoder(config)
        self.text_encoder = TextEncoder(config)
        self.logit_scale = nn.Parameter(torch.tensor(float(config.init_logit_scale)))  # log(1 / temperature)
        self.register_buffer("image_mean", torch.tensor(IMAGE_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("image_std", torch.tensor(IMAGE_STD).view(1, 3, 1, 1), persistent=False)
        self._init_weights()

    def _init_weights(self) -> None:
        """CLIP's initialisation (OpenAI ``clip/model.py``, open_clip ``transformer.py``): stds that scale
        with the width, so that even a narrow model's embeddings differ between inputs from the start."""
        for encoder, width, layers in (
            (self.image_encoder, self.config.vision_width, self.config.vision_layers),
            (self.text_encoder, self.config.text_width, self.config.text_layers),
        ):
            attn_std, fc_std = width**-0.5, (2 * width) ** -0.5
            proj_std = attn_std * (2 * layers) ** -0.5
            for block in encoder.blocks:
                nn.init.normal_(block.attn.qkv.weight, std=attn_std)
                nn.init.normal_(block.attn.proj.weight, std=proj_std)
                nn.init.normal_(block.mlp[0].weight, std=fc_std)
                nn.init.normal_(block.mlp[2].weight, std=proj_std)
                for linear in (block.attn.qkv, block.attn.proj, block.mlp[0], block.mlp[2]):
                    nn.init.zeros_(linear.bias)
            nn.init.normal_(encoder.proj.weight, std=attn_std)
        vision = self.image_encoder
        with torch.no_grad():  # patch positions start as 2-D sin-cos features, then are learned
            grid = sincos_positions_2d(self.config.grid_size, self.config.vision_width)
            vision.position.zero_()[-len(grid) :] = grid
        if vision.class_token is not None:
            nn.init.normal_(vision.class_token, std=self.config.vision_width**-0.5)
        nn.init.normal_(self.text_encoder.token.weight, std=0.02)
        nn.init.normal_(self.text_encoder.position, std=0.01)

    def scale(self) -> torch.Tensor:
        """The logit scale ``exp(logit_scale)``, clipped at ``max_logit_scale`` (no gradient beyond it)."""
        return self.logit_scale.clamp(max=math.log(self.config.max_logit_scale)).exp()

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, S, S) in [0, 1] (or uint8) → unit-length embeddings (B, D)."""
        size = self.config.image_size
        if images.ndim != 4 or images.shape[1] != 3 or images.shape[2:] != (size, size):
            raise ValueError(f"images must have shape (B, 3, {size}, {size}), got {tuple(images.shape)}")
        x = images.float().div(255.0) if images.dtype == torch.uint8 else images
        x = (x - self.image_mean.to(x.dtype)) / self.image_std.to(x.dtype)
        return F.normalize(self.image_encoder(x), dim=-1)

    def encode_text(self, ids: torch.Tensor) -> torch.Tensor:
        """BPE ids (B, text_len), padded with ``text_pad_id`` → unit-length embeddings (B, D)."""
        return F.normalize(self.text_encoder(ids), dim=-1)

    def logits(self, image_features: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
        """Scaled cosine similarities (B_image, B_text) of unit-length embeddings."""
        return self.scale() * image_features @ text_features.T

    def forward(self, images: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(symmetric contrastive loss, logits per image (B, B)) of a batch of matching pairs."""
        logits = self.logits(self.encode_image(images), self.encode_text(ids))
        return contrastive_loss(logits), logits


# --- the exported model ---------------------------------------------------------------------------


def save_clip(model: ClipModel, path: str | Path, tokenizer: Tokenizer | str | Path) -> Path:
    """Write the config, the weights (CPU tensors) and the caption BPE as one ``torch.save`` file.

    ``tokenizer`` is the BPE the model reads captions with (a ``Tokenizer`` or
    the path of its JSON); its JSON is stored in the file, so the file alone
    encodes captions. The file loads with ``torch.load(weights_only=True)``;
    :func:`load_clip` rebuilds the model and the tokenizer.
    """
    from dalle_lightning.stages.bpe import load_bpe

    if not isinstance(tokenizer, Tokenizer):
        tokenizer = load_bpe(str(tokenizer))
    if tokenizer.get_vocab_size() > model.config.text_vocab:
        raise ValueError(
            f"the tokenizer has {tokenizer.get_vocab_size()} tokens, more than the model's "
            f"text_vocab={model.config.text_vocab}"
        )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    saved = {
        "format": FILE_FORMAT,
        "config": asdict(model.config),
        "state_dict": state,
        "tokenizer": tokenizer.to_str(),
    }
    tmp = path.with_name(f".tmp-{path.name}")
    torch.save(saved, tmp)
    tmp.replace(path)
    return path


def load_clip(path: str | Path, map_location: str | torch.device = "cpu") -> tuple[ClipModel, Tokenizer]:
    """The :class:`ClipModel` (in eval mode) and the caption BPE saved by :func:`save_clip` at ``path``.

    ``ValueError`` when the file is not such a checkpoint, or its config and weights do not fit.
    """
    from dalle_lightning.stages.bpe import PAD_TOKEN

    saved = torch.load(path, map_location=map_location, weights_only=True)
    if not isinstance(saved, dict) or saved.get("format") != FILE_FORMAT:
        raise ValueError(f"{path}: not a CLIP file of this project (expected format {FILE_FORMAT!r})")
    config = build(ClipConfig, dict(saved["config"]), where=f"{path} config")
    model = ClipModel(config)
    try:
        model.load_state_dict(saved["state_dict"])
    except RuntimeError as err:
        raise ValueError(f"{path}: the weights do not fit the saved config: {err}") from err
    tokenizer = Tokenizer.from_str(saved["tokenizer"])
    if tokenizer.token_to_id(PAD_TOKEN) != config.text_pad_id:
        raise ValueError(
            f"{path}: the tokenizer's {PAD_TOKEN!r} is not the model's text_pad_id={config.text_pad_id}"
        )
    return model.eval(), tokenizer
