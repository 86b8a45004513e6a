"""The DALL-E transformer (Ramesh et al. 2021, "Zero-Shot Text-to-Image Generation", Section 2.2, Appendix B).

A decoder-only transformer over one stream: a start token, ``text_len`` BPE
text tokens, then the ``grid × grid`` image tokens of the dVAE in raster order.
Logits at position t predict the token at t + 1, so the start token predicts
the first text token and the last text token the first image token::

    input   [start] t_0 … t_{L−1} i_0 … i_{N−2}      (T = L + N positions)
    target   t_0 … t_{L−1} i_0 … i_{N−1}

Reading order:

1. :class:`DalleConfig` — sizes, masks, loss weights; :func:`load_dalle_preset`.
2. :class:`CausalSelfAttention`, :class:`MLP`, :class:`Block` — pre-LN blocks
   (nanoGPT); each layer has its mask from :mod:`.attention_masks` (B.1).
3. :class:`KVCache` and :class:`DalleTransformer` — the embeddings (a learned
   pad token per text position, row and column embeddings for the image), the
   text and image heads, the loss (1/8 text + 7/8 image, B.2), incremental
   decoding and :func:`flops_per_token`.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources

import torch
import torch.nn.functional as F
import yaml
from torch import nn

from dalle_lightning.config_overrides import build
from dalle_lightning.models.attention_masks import (
    ATTENTIONS,
    BACKENDS,
    SequenceLayout,
    layer_mask_kind,
    masked_attention,
)

PRESETS = ("tiny", "small", "paper")


@dataclass(frozen=True)
class DalleConfig:
    """Sizes of the transformer and its loss; defaults are the paper's 12-billion parameter model (B.1)."""

    text_len: int = 256
    """Text positions; shorter captions are filled with each position's own pad token."""
    text_vocab: int = 16384
    """BPE vocabulary size (the pad tokens come on top: the text head has ``text_vocab + text_len`` classes)."""
    text_pad_id: int = 0
    """The id that marks padding in a caption; the model replaces it with the position's pad token."""
    image_vocab: int = 8192
    """Image tokens: the dVAE codebook size."""
    grid_size: int = 32
    """Side of the image token grid (the dVAE's ``grid_size``)."""
    n_layer: int = 64
    """Transformer blocks."""
    n_head: int = 62
    """Attention heads; ``n_embd`` must be a multiple."""
    n_embd: int = 3968
    """Width of the residual stream."""
    dropout: float = 0.0
    """Dropout on the embeddings and on each residual branch (none on attention weights, which flex lacks)."""
    attention: str = "sparse"
    """``sparse``: the paper's row / column / conv masks (B.1); ``full``: causal attention in every layer."""
    attention_backend: str = "dense"
    """``dense``: SDPA with a boolean mask (the reference); ``flex``: block-sparse FlexAttention."""
    conv_kernel: int = 11
    """Side of the last layer's convolutional mask, odd (paper: 11)."""
    text_loss_weight: float = 1 / 8
    """Weight of the text cross-entropy (paper: 1/8, B.2)."""
    image_loss_weight: float = 7 / 8
    """Weight of the image cross-entropy (paper: 7/8); we care mostly about the image."""
    init_std: float = 0.02
    """Std of the initial weights; residual output projections get ``init_std / √(2·n_layer)`` (GPT-2)."""

    def __post_init__(self) -> None:
        for name in ("text_len", "text_vocab", "image_vocab", "grid_size", "n_layer", "n_head", "n_embd"):
            _check_int(name, getattr(self, name), 1)
        _check_int("conv_kernel", self.conv_kernel, 1)
        if self.conv_kernel % 2 == 0:
            raise ValueError(f"conv_kernel must be odd, got {self.conv_kernel}")
        _check_int("text_pad_id", self.text_pad_id, 0)
        if self.text_pad_id >= self.text_vocab:
            raise ValueError(f"text_pad_id must be < text_vocab={self.text_vocab}, got {self.text_pad_id}")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd must be a multiple of n_head={self.n_head}, got {self.n_embd}")
        if self.attention not in ATTENTIONS:
            raise ValueError(f"attention must be one of {ATTENTIONS}, got {self.attention!r}")
        if self.attention_backend not in BACKENDS:
            raise ValueError(f"attention_backend must be one of {BACKENDS}, got {self.attention_backend!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}")
        for name in ("text_loss_weight", "image_loss_weight"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)!r}")
        if self.text_loss_weight + self.image_loss_weight <= 0:
            raise ValueError("text_loss_weight + image_loss_weight must be > 0")
        if not self.init_std > 0:
            raise ValueError(f"init_std must be > 0, got {self.init_std!r}")

    @property
    def image_len(self) -> int:
        """Image tokens per sample: ``grid_size²``."""
        return self.grid_size**2

    @property
    def seq_len(self) -> int:
        """Input positions: the start token, the text, and all image tokens but the last."""
        return self.text_len + self.image_len

    @property
    def text_classes(self) -> int:
        """Classes of the text head: the BPE vocabulary and one pad token per position."""
        return self.text_vocab + self.text_len

    @property
    def layout(self) -> SequenceLayout:
        """The masks' view of the sequence: the start token and the text come before the image."""
        return SequenceLayout(self.text_len + 1, self.grid_size, self.grid_size, self.conv_kernel)

    def layer_kinds(self) -> tuple[str, ...]:
        """The mask of each layer (:func:`~dalle_lightning.models.attention_masks.layer_mask_kind`)."""
        return tuple(layer_mask_kind(i, self.n_layer, self.attention) for i in range(self.n_layer))


def _check_int(name: str, value: object, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def load_dalle_preset(name: str) -> DalleConfig:
    """The ``model:`` section of ``dalle_lightning/presets/dalle/<name>.yaml`` (``tiny``, ``small``, ``paper``).

    Other sections (the training run's) are left to their own loaders.
    """
    if name not in PRESETS:
        raise ValueError(f"unknown DALL-E preset {name!r}; presets are {list(PRESETS)}")
    text = resources.files("dalle_lightning").joinpath("presets", "dalle", f"{name}.yaml").read_text()
    loaded = yaml.safe_load(text) or {}
    return build(DalleConfig, dict(loaded.get("model") or {}), where=f"preset {name!r} model")


def flops_per_token(config: DalleConfig) -> float:
    """Training FLOPs per input token: ``6·N + 12·n_layer·T·n_embd`` (forward and backward).

    ``N`` counts the weights a token is multiplied by: ``12·n_embd²`` per block
    and its head (text or image, averaged over the positions); embedding
    look-ups are free. The attention term counts dense attention over ``T``
    positions, as nanoGPT and PaLM (Appendix B) do, so the sparse masks' saving
    shows up as a higher model-FLOPs utilisation rather than fewer FLOPs.
    """
    c, t = config, config.seq_len
    heads = (c.text_len * c.text_classes + c.image_len * c.image_vocab) * c.n_embd / t
    return 6.0 * (12 * c.n_layer * c.n_embd**2 + heads) + 12.0 * c.n_layer * t * c.n_embd


# --- blocks ---------------------------------------------------------------------------------------


@dataclass
class KVCache:
    """Keys and values of every layer for incremental decoding."""

    keys: torch.Tensor
    """(n_layer, B, n_head, T, head_dim)"""
    values: torch.Tensor
    """(n_layer, B, n_head, T, head_dim)"""


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention under one of the masks of Appendix B.1 (``kind``)."""

    def __init__(self, config: DalleConfig, kind: str) -> None:
        super().__init__()
        self.config, self.kind = config, kind
        self.n_head = config.n_head
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, layer: int, start_pos: int, cache: KVCache | None) -> torch.Tensor:
        B, S, C = x.shape
        D = C // self.n_head
        # (B, H, S, D) each
        q, k, v = (t.view(B, S, self.n_head, D).transpose(1, 2) for t in self.c_attn(x).split(C, dim=2))
        backend = self.config.attention_backend
        if cache is not None:  # write this step's keys and values, attend to everything so far
            cache.keys[layer, :, :, start_pos : start_pos + S] = k
            cache.values[layer, :, :, start_pos : start_pos + S] = v
            k = cache.keys[layer, :, :, : start_pos + S]  # (B, H, start_pos+S, D)
            v = cache.values[layer, :, :, : start_pos + S]
            backend = "dense"
        y = masked_attention(q, k, v, self.kind, self.config.layout, backend, start_pos)  # (B, H, S, D)
        y = y.transpose(1, 2).contiguous().view(B, S, C)
        return self.resid_dropout(self.c_proj(y))  # (B, S, C)


class MLP(nn.Module):
    """C → 4C → GELU → C."""

    def __init__(self, config: DalleConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd)
        self.gelu = nn.GELU()
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))  # (B, S, C)


class Block(nn.Module):
    """x + attn(ln(x)), then x + mlp(ln(x)): a pre-LN block."""

    def __init__(self, config: DalleConfig, kind: str) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd)
        self.attn = CausalSelfAttention(config, kind)
        self.ln_2 = nn.LayerNorm(config.n_embd)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, layer: int, start_pos: int, cache: KVCache | None) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), layer, start_pos, cache)
        return x + self.mlp(self.ln_2(x))  # (B, S, C)


# --- the model ------------------------------------------------------------------------------------


@dataclass
class DalleOutput:
    """What :meth:`DalleTransformer.forward` returns; the losses are scalars."""

    loss: torch.Tensor
    """``text_loss_weight · text_loss + image_loss_weight · image_loss``."""
    text_loss: torch.Tensor
    """Cross-entropy of the text tokens (pads included), mean over them."""
    image_loss: torch.Tensor
    """Cross-entropy of the image tokens, mean over them."""
    text_logits: torch.Tensor
    """(B, text_len, text_vocab + text_len)"""
    image_logits: torch.Tensor
    """(B, grid², image_vocab)"""


class DalleTransformer(nn.Module):
    """The DALL-E transformer; see the module docstring."""

    def __init__(self, config: DalleConfig) -> None:
        super().__init__()
        self.config = config
        c = config
        self.start = nn.Parameter(torch.zeros(c.n_embd))  # the start token's embedding
        self.text_emb = nn.Embedding(c.text_classes, c.n_embd)  # BPE tokens, then one pad per position
        self.text_pos = nn.Embedding(c.text_len + 1, c.n_embd)  # the start token is position 0
        self.image_emb = nn.Embedding(c.image_vocab, c.n_embd)
        self.image_row = nn.Embedding(c.grid_size, c.n_embd)
        self.image_col = nn.Embedding(c.grid_size, c.n_embd)
        self.drop = nn.Dropout(c.dropout)
        self.blocks = nn.ModuleList(Block(c, kind) for kind in c.layer_kinds())
        self.ln_f = nn.LayerNorm(c.n_embd)
        self.text_head = nn.Linear(c.n_embd, c.text_classes, bias=False)
        self.image_head = nn.Linear(c.n_embd, c.image_vocab, bias=False)
        self.apply(self._init_weights)
        nn.init.normal_(self.start, std=c.init_std)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):  # GPT-2: scale the residual branches by depth
                nn.init.normal_(p, std=c.init_std / (2 * c.n_layer) ** 0.5)

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, nn.Linear | nn.Embedding):
            nn.init.normal_(module.weight, std=self.config.init_std)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def text_targets(self, text: torch.Tensor) -> torch.Tensor:
        """``text`` (B, text_len) with each ``text_pad_id`` replaced by its position's pad token id."""
        c = self.config
        pads = c.text_vocab + torch.arange(c.text_len, device=text.device)  # (L,)
        return torch.where(text == c.text_pad_id, pads, text)  # (B, L)

    def _embed(self, tokens: torch.Tensor, start_pos: int) -> torch.Tensor:
        """Embeddings (B, S, C) of input ``tokens`` (B, S) at positions ``start_pos …``.

        Position 0 is the start token (its id is ignored), 1 … text_len the
        text, the rest image tokens in raster order.
        """
        c = self.config
        B, S = tokens.shape
        end, first_image = start_pos + S, c.text_len + 1
        parts = []
        if start_pos == 0:
            parts.append(self.start.expand(B, 1, -1) + self.text_pos.weight[:1])  # (B, 1, C)
        lo, hi = max(start_pos, 1), min(end, first_image)
        if lo < hi:
            pos = torch.arange(lo, hi, device=tokens.device)  # (S_text,)
            ids = tokens[:, lo - start_pos : hi - start_pos]
            ids = torch.where(ids == c.text_pad_id, c.text_vocab + pos - 1, ids)  # a pad token per position
            parts.append(self.text_emb(ids) + self.text_pos(pos))  # (B, S_text, C)
        lo = max(start_pos, first_image)
        if lo < end:
            k = torch.arange(lo - first_image, end - first_image, device=tokens.device)  # raster index
            grid = c.grid_size
            emb = self.image_emb(tokens[:, lo - start_pos :])
            parts.append(emb + self.image_row(k // grid) + self.image_col(k % grid))  # (B, S_image, C)
        return self.drop(torch.cat(parts, dim=1))  # (B, S, C)

    def _hidden(self, tokens: torch.Tensor, start_pos: int, cache: KVCache | None) -> torch.Tensor:
        if start_pos + tokens.shape[1] > self.config.seq_len:
            raise ValueError(
                f"positions {start_pos}…{start_pos + tokens.shape[1] - 1} run past seq_len={self.config.seq_len}"
            )
        x = self._embed(tokens, start_pos)  # (B, S, C)
        for layer, block in enumerate(self.blocks):
            x = block(x, layer, start_pos, cache)
        return self.ln_f(x)  # (B, S, C)

    def forward(self, text: torch.Tensor, image_tokens: torch.Tensor) -> DalleOutput:
        """Logits and losses of ``text`` (B, text_len) and ``image_tokens`` (B, grid²) or (B, grid, grid)."""
        c = self.config
        B = text.shape[0]
        if text.shape != (B, c.text_len):
            raise ValueError(f"expected text of shape (B, {c.text_len}), got {tuple(text.shape)}")
        image = image_tokens.reshape(B, -1)  # (B, N)
        if image.shape[1] != c.image_len:
            raise ValueError(
                f"expected {c.image_len} image tokens per sample, got {tuple(image_tokens.shape)}"
            )
        tokens = torch.cat([text.new_zeros(B, 1), text, image[:, :-1]], dim=1)  # (B, T)
        h = self._hidden(tokens, 0, None)  # (B, T, C)
        text_logits = self.text_head(h[:, : c.text_len])  # (B, L, Vt): predict t_0 … t_{L−1}
        image_logits = self.image_head(h[:, c.text_len :])  # (B, N, Vi): predict i_0 … i_{N−1}
        # each loss is the mean over its own tokens (B.2: normalised by the number of each kind)
        dtype = torch.promote_types(h.dtype, torch.float32)  # the losses in float32 at least
        text_loss = F.cross_entropy(text_logits.flatten(0, 1).to(dtype), self.text_targets(text).flatten())
        image_loss = F.cross_entropy(image_logits.flatten(0, 1).to(dtype), image.flatten())
        loss = c.text_loss_weight * text_loss + c.image_loss_weight * image_loss
        return DalleOutput(loss, text_loss, image_loss, text_logits, image_logits)

    def new_cache(
        self, batch_size: int, device: torch.device | None = None, dtype: torch.dtype | None = None
    ) -> KVCache:
        """An empty :class:`KVCache` for ``batch_size`` sequences (on the model's device and dtype by default)."""
        c, p = self.config, self.text_head.weight
        shape = (c.n_layer, batch_size, c.n_head, c.seq_len, c.n_embd // c.n_head)
        kw = {"device": device or p.device, "dtype": dtype or p.dtype}
        return KVCache(torch.zeros(shape, **kw), torch.zeros(shape, **kw))

    def forward_with_cache(
        self, tokens: torch.Tensor, cache: KVCache | None, start_pos: int = 0
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits of input ``tokens`` (B, S) at positions ``start_pos … start_pos+S−1`` (see :meth:`_embed`).

        With ``cache`` the keys and values of earlier positions come from it and
        those of these positions go into it (dense attention with the same mask
        rows); without, ``start_pos`` must be 0 and the whole prefix is run.
        Returns ``(text_logits (B, S_text, Vt), image_logits (B, S_image, Vi))``:
        positions before ``text_len`` predict text, the others image tokens.
        """
        if cache is None and start_pos != 0:
            raise ValueError(f"without a cache start_pos must be 0, got {start_pos}")
        h = self._hidden(tokens, start_pos, cache)  # (B, S, C)
        n_text = max(0, min(tokens.shape[1], self.config.text_len - start_pos))
        return self.text_head(h[:, :n_text]), self.image_head(h[:, n_text:])

    def flops_per_token(self) -> float:
        """:func:`flops_per_token` of this model's config."""
        return flops_per_token(self.config)
