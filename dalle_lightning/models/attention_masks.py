"""The attention masks of the DALL-E transformer (Ramesh et al. 2021, Appendix B.1 and Figure 11).

The transformer attends over one sequence: ``text_len`` text positions, then
the ``grid_h × grid_w`` image tokens in raster (row-major) order. In every mask
text attends causally to text, and an image token attends to every text
position; what differs is which earlier *image* tokens it sees. With ``w`` the
grid width and ``d = q − k ≥ 0`` the raster distance from query to key:

``full``
    Plain causal attention: every earlier image token.
``row`` (Figure 11a)
    The previous ``w + 1`` image tokens in raster order, itself included
    (``d ≤ w``): the extent is chosen so that the last token attended to is
    the one in the same column of the previous row; the window wraps round
    from the start of a row to the end of the one above.
``column`` (Figure 11b, c)
    The image tokens in its own column, above it and itself (``d mod w = 0``).
    The paper transposes the image states before these layers so that a column
    is contiguous and the mask becomes block-diagonal (Figure 11c); the two are
    the same attention with the positions renumbered. The dense masks here are
    in raster order; :func:`masked_attention`'s FlexAttention path transposes,
    so that its block-sparse kernel skips the blocks of other columns.
``conv`` (Figure 11d; the last layer only)
    A causal ``k × k`` convolution with wrap-round like the row mask: the keys
    at raster offsets ``dr·w + dc`` with ``dr ∈ [−k//2, 0]`` rows and
    ``dc ∈ [−k//2, k//2]`` columns, earlier than the query; offsets past the
    end or start of a row wrap to the neighbouring row (paper: 11 × 11).

:func:`layer_mask_kind` gives the paper's schedule over the layers;
:func:`dense_mask` the boolean (T, T) "may attend" matrix of each kind (the
reference); :func:`mask_mod` and :func:`block_mask` the same definitions as
index arithmetic for FlexAttention, which builds block-sparse masks from them
and skips the blocks with nothing to attend to; :func:`masked_attention`
applies a mask with either backend.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

MASK_KINDS = ("full", "row", "column", "conv")
ATTENTIONS = ("sparse", "full")
BACKENDS = ("dense", "flex")


@dataclass(frozen=True)
class SequenceLayout:
    """Where the text and the image sit in the attended sequence, and the conv kernel's size."""

    text_len: int
    """Positions before the image (the transformer's start token and caption)."""
    grid_h: int
    """Rows of image tokens."""
    grid_w: int
    """Columns of image tokens: the raster distance between vertically adjacent tokens."""
    conv_kernel: int = 11
    """Side of the ``conv`` mask's kernel, odd (paper: 11)."""

    def __post_init__(self) -> None:
        for name in ("text_len", "grid_h", "grid_w", "conv_kernel"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if self.conv_kernel % 2 == 0:
            raise ValueError(f"conv_kernel must be odd, got {self.conv_kernel}")

    @property
    def image_len(self) -> int:
        """Image tokens: ``grid_h · grid_w``."""
        return self.grid_h * self.grid_w

    @property
    def seq_len(self) -> int:
        """The whole sequence: ``text_len + image_len``."""
        return self.text_len + self.image_len


def _check_kind(kind: str) -> None:
    if kind not in MASK_KINDS:
        raise ValueError(f"mask kind must be one of {MASK_KINDS}, got {kind!r}")


def layer_mask_kind(layer_index: int, n_layers: int, attention: str = "sparse") -> str:
    """The mask of layer ``layer_index`` (0-based) of ``n_layers`` (Appendix B.1).

    The paper numbers the layers from 1: layer ``i`` uses ``column`` if
    ``(i − 2) mod 4 = 0`` and ``row`` otherwise ("row, column, row, row" for
    the first four), and the last layer uses ``conv``. So here ``column`` where
    ``(layer_index − 1) mod 4 = 0``. ``attention="full"``: ``full`` everywhere.
    """
    if attention not in ATTENTIONS:
        raise ValueError(f"attention must be one of {ATTENTIONS}, got {attention!r}")
    if not 0 <= layer_index < n_layers:
        raise ValueError(f"layer_index must be in [0, {n_layers}), got {layer_index!r}")
    if attention == "full":
        return "full"
    if layer_index == n_layers - 1:
        return "conv"
    i = layer_index + 1  # the paper's numbering
    return "column" if (i - 2) % 4 == 0 else "row"


# --- the definitions, as index arithmetic --------------------------------------------------------


def _image_keys(kind: str, layout: SequenceLayout, d: torch.Tensor) -> torch.Tensor:
    """Whether an image query may attend an image key ``d ≥ 0`` raster positions before it."""
    w, half = layout.grid_w, layout.conv_kernel // 2
    if kind == "full":
        return d >= 0
    if kind == "row":
        return d <= w
    if kind == "column":
        return d % w == 0
    # conv: d = a·w − dc for some a in [0, half] (rows up), dc in [-half, half] (columns right)
    within = d <= half * w + half
    if 2 * half + 1 >= w:  # the kernel is as wide as a row: its rows join up into one window
        return within
    return within & ((d + half) % w <= 2 * half)


def mask_mod(kind: str, layout: SequenceLayout, transposed: bool = False) -> Callable[..., torch.Tensor]:
    """FlexAttention ``mask_mod(b, h, q_idx, kv_idx) → bool`` of mask ``kind``, from index arithmetic.

    ``transposed`` (``column`` only): the indices are those of the sequence
    with its image part in column-major order (see :func:`column_permutation`),
    where column attention is causal attention within blocks of ``grid_h``.
    """
    _check_kind(kind)
    n, h = layout.text_len, layout.grid_h
    if transposed:
        if kind != "column":
            raise ValueError(f"only the column mask has a transposed form, got kind={kind!r}")

        def transposed_column(b, head, q_idx, kv_idx):
            same_column = torch.div(q_idx - n, h, rounding_mode="floor") == torch.div(
                kv_idx - n, h, rounding_mode="floor"
            )
            return (kv_idx <= q_idx) & ((kv_idx < n) | same_column)

        return transposed_column

    def raster(b, head, q_idx, kv_idx):
        return (kv_idx <= q_idx) & ((kv_idx < n) | _image_keys(kind, layout, q_idx - kv_idx))

    return raster


def dense_mask(kind: str, layout: SequenceLayout, device: torch.device | str | None = None) -> torch.Tensor:
    """The (T, T) boolean "may attend" mask of ``kind``, ``T = layout.seq_len``; rows are queries."""
    _check_kind(kind)
    idx = torch.arange(layout.seq_len, device=device)
    return mask_mod(kind, layout)(None, None, idx[:, None], idx[None, :])  # (T, T)


def full_mask(layout: SequenceLayout) -> torch.Tensor:
    """Causal attention over the whole sequence (T, T)."""
    return dense_mask("full", layout)


def row_mask(layout: SequenceLayout) -> torch.Tensor:
    """Row attention (Figure 11a) (T, T)."""
    return dense_mask("row", layout)


def column_mask(layout: SequenceLayout) -> torch.Tensor:
    """Column attention (Figure 11b) in raster order (T, T)."""
    return dense_mask("column", layout)


def conv_mask(layout: SequenceLayout) -> torch.Tensor:
    """Causal ``conv_kernel × conv_kernel`` convolutional attention with wrap-round (Figure 11d) (T, T)."""
    return dense_mask("conv", layout)


@functools.lru_cache(maxsize=64)
def cached_dense_mask(kind: str, layout: SequenceLayout, device: torch.device) -> torch.Tensor:
    """:func:`dense_mask` kept per (kind, layout, device); callers must not modify it."""
    return dense_mask(kind, layout, device)


# --- FlexAttention -------------------------------------------------------------------------------


def _can_transpose(layout: SequenceLayout, seq_len: int) -> bool:
    # the column-major order of a raster prefix is again a prefix only for the whole grid, or the whole
    # grid but its last token (the model's input, whose last image token is never fed)
    return seq_len - layout.text_len in (layout.image_len, layout.image_len - 1)


@functools.lru_cache(maxsize=64)
def column_permutation(layout: SequenceLayout, seq_len: int, device: torch.device) -> torch.Tensor:
    """``perm`` (seq_len,) with ``x[perm]`` the sequence with its image part transposed to column-major.

    Text positions stay; transposed image position ``c·grid_h + r`` holds raster
    position ``r·grid_w + c``. ``seq_len`` must cover the whole grid, or all of
    it but the last token (which is last in both orders).
    """
    if not _can_transpose(layout, seq_len):
        raise ValueError(
            f"seq_len must be text_len + image_len or one less ({layout.seq_len} or {layout.seq_len - 1}), "
            f"got {seq_len}"
        )
    n, h, w = layout.text_len, layout.grid_h, layout.grid_w
    j = torch.arange(seq_len - n, device=device)  # transposed image index
    image = n + (j % h) * w + torch.div(j, h, rounding_mode="floor")
    return torch.cat([torch.arange(n, device=device), image])  # (seq_len,)


@functools.lru_cache(maxsize=64)
def block_mask(
    kind: str,
    layout: SequenceLayout,
    seq_len: int,
    device: torch.device,
    transposed: bool = False,
    block_size: int = 128,
) -> BlockMask:
    """The FlexAttention :class:`BlockMask` of ``kind`` over the first ``seq_len`` positions, cached.

    Built by :func:`create_block_mask` from :func:`mask_mod`, one mask for
    every batch element and head; blocks with nothing to attend are skipped by
    the kernel, and blocks where everything is attended skip the mask.
    """
    return create_block_mask(
        mask_mod(kind, layout, transposed), None, None, seq_len, seq_len, device=device, BLOCK_SIZE=block_size
    )


@functools.cache
def _compiled_flex_attention() -> Callable[..., torch.Tensor]:
    return torch.compile(flex_attention, dynamic=False)


def _flex(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: BlockMask) -> torch.Tensor:
    if q.is_cuda:  # the fused, block-sparse kernel needs torch.compile
        return _compiled_flex_attention()(q, k, v, block_mask=mask)
    with warnings.catch_warnings():  # elsewhere the eager reference: correct, dense in cost
        warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
        return flex_attention(q, k, v, block_mask=mask)


def masked_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kind: str,
    layout: SequenceLayout,
    backend: str = "dense",
    start_pos: int = 0,
) -> torch.Tensor:
    """Softmax attention (B, H, S, D) of queries at positions ``start_pos … start_pos+S−1`` under ``kind``.

    ``k`` and ``v`` (B, H, start_pos+S, D) hold every position up to the last
    query (a KV cache's contents when ``start_pos > 0``). ``dense``:
    :func:`~torch.nn.functional.scaled_dot_product_attention` with the rows of
    the boolean mask, the reference. ``flex``: FlexAttention with the block
    mask (``start_pos`` must be 0); for ``column`` on the whole sequence the
    image part is transposed first, as in the paper (Figure 11c).
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    s, total = q.shape[2], k.shape[2]
    if total != start_pos + s:
        raise ValueError(
            f"expected {start_pos + s} keys for start_pos={start_pos} and {s} queries, got {total}"
        )
    if backend == "dense":
        mask = cached_dense_mask(kind, layout, q.device)[start_pos:total, :total]  # (S, total)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    if start_pos:
        raise ValueError("the flex backend runs whole sequences (start_pos=0); use dense with a KV cache")
    if kind != "column" or not _can_transpose(layout, s):
        return _flex(q, k, v, block_mask(kind, layout, s, q.device))
    perm = column_permutation(layout, s, q.device)  # (S,)
    q, k, v = (t.index_select(2, perm) for t in (q, k, v))  # (B, H, S, D), image transposed
    y = _flex(q, k, v, block_mask(kind, layout, s, q.device, transposed=True))
    return y.index_select(2, torch.argsort(perm))  # (B, H, S, D), back in raster order
